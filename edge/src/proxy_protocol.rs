//! The PROXY protocol (HAProxy's, versions 1 and 2) on the edge's ports
//! (`edge.proxy_protocol`).
//!
//! A TCP load balancer in front of the edge (HAProxy, AWS NLB/ELB, GCP's, F5...) connects from
//! its own address; with the PROXY protocol it first sends a header naming the client's. The
//! edge reads that header before anything else (before TLS), and the client's address becomes
//! the connection's peer: what `X-Forwarded-For` starts from, what limits and `allowed_ips`
//! see and what events carry as `client_ip`. A `LOCAL` header (the balancer's own health
//! checks) or an `UNKNOWN`/unspecified family keeps the TCP peer.
//!
//! The header is read exactly: nothing after it is consumed (version 2 says its length; a
//! version 1 line is found with `peek` and then read to its `\r\n`). A connection that does
//! not start with a valid header within `edge.header_read_timeout_ms` is closed: with the
//! setting on, every connection must come through the balancer (a client that could connect
//! directly could otherwise claim any address).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The 12 bytes that open a version 2 header.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// A version 1 line is at most this long, `\r\n` included.
const V1_MAX: usize = 107;

/// Why a connection's PROXY header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    #[error("no PROXY protocol header within {0:?}")]
    TimedOut(Duration),
    #[error("the connection closed before its PROXY protocol header was complete")]
    Closed,
    #[error("invalid PROXY protocol header: {0}")]
    Invalid(&'static str),
    #[error("reading the PROXY protocol header failed: {0}")]
    Io(String),
}

/// What a complete header says: the client's address (`None`: keep the TCP peer), and how
/// many bytes the header took.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Complete {
        client: Option<SocketAddr>,
        len: usize,
    },
    /// More bytes are needed (at least this many in all).
    Incomplete(usize),
}

/// Reads the PROXY header at the start of `stream` within `timeout`: the client's address, or
/// `None` when the header names none (`LOCAL`, `UNKNOWN`).
pub async fn read_header(stream: &mut TcpStream, timeout: Duration) -> Result<Option<SocketAddr>, Refused> {
    match tokio::time::timeout(timeout, read(stream)).await {
        Ok(r) => r,
        Err(_) => Err(Refused::TimedOut(timeout)),
    }
}

async fn read(stream: &mut TcpStream) -> Result<Option<SocketAddr>, Refused> {
    let io = |e: std::io::Error| Refused::Io(e.to_string());
    let mut buf = [0u8; 16];
    // 16 bytes: a version 2 header's fixed part, and no version 1 line is shorter than 15
    // ("PROXY UNKNOWN\r\n"), which is peeked at rather than read.
    let mut seen = peek_at_least(stream, &mut buf, 15).await?;
    if buf[..seen.min(12)] == V2_SIGNATURE[..seen.min(12)] {
        if seen < 16 {
            seen = peek_at_least(stream, &mut buf, 16).await?;
        }
        let len = match parse_v2(&buf[..seen])? {
            Parsed::Incomplete(len) => len,
            // No addresses: the 16 bytes are the whole header.
            Parsed::Complete { client, len } => {
                stream.read_exact(&mut buf[..len]).await.map_err(|_| Refused::Closed)?;
                return Ok(client);
            }
        };
        let mut header = vec![0u8; len];
        stream.read_exact(&mut header).await.map_err(|_| Refused::Closed)?;
        return match parse_v2(&header)? {
            Parsed::Complete { client, .. } => Ok(client),
            Parsed::Incomplete(_) => Err(Refused::Invalid("version 2 header")),
        };
    }
    let mut line = [0u8; V1_MAX];
    let mut seen = peek_at_least(stream, &mut line, 15).await?;
    loop {
        match parse_v1(&line[..seen])? {
            Parsed::Complete { client, len } => {
                stream.read_exact(&mut line[..len]).await.map_err(io)?;
                return Ok(client);
            }
            Parsed::Incomplete(_) => seen = peek_at_least(stream, &mut line, seen + 1).await?,
        }
    }
}

/// Peeks until at least `want` bytes (at most `buf.len()`) are waiting: how many there are.
/// A balancer sends its header in one segment, so this nearly always returns at once; when
/// only part has come, it looks again every few milliseconds (data already waiting keeps the
/// socket readable, so waiting for readiness would spin).
async fn peek_at_least(stream: &TcpStream, buf: &mut [u8], want: usize) -> Result<usize, Refused> {
    loop {
        let n = stream.peek(buf).await.map_err(|e| Refused::Io(e.to_string()))?;
        if n == 0 {
            return Err(Refused::Closed);
        }
        if n >= want.min(buf.len()) {
            return Ok(n);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A version 1 line (`PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\r\n`) at the start of `b`.
fn parse_v1(b: &[u8]) -> Result<Parsed, Refused> {
    const PREFIX: &[u8] = b"PROXY ";
    if b[..b.len().min(PREFIX.len())] != PREFIX[..b.len().min(PREFIX.len())] {
        return Err(Refused::Invalid("neither a version 1 nor a version 2 header"));
    }
    let Some(end) = b.windows(2).position(|w| w == b"\r\n") else {
        return if b.len() >= V1_MAX {
            Err(Refused::Invalid("version 1 line too long"))
        } else {
            Ok(Parsed::Incomplete(b.len() + 1))
        };
    };
    let len = end + 2;
    let text = std::str::from_utf8(&b[PREFIX.len()..end]).map_err(|_| Refused::Invalid("version 1 line"))?;
    let fields: Vec<&str> = text.split(' ').collect();
    let client = match fields.as_slice() {
        ["UNKNOWN", ..] => None,
        [proto @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
            let ip: IpAddr = src.parse().map_err(|_| Refused::Invalid("version 1 source address"))?;
            if ip.is_ipv4() != (*proto == "TCP4") {
                return Err(Refused::Invalid("version 1 address of the other family"));
            }
            let port: u16 = sport.parse().map_err(|_| Refused::Invalid("version 1 source port"))?;
            Some(SocketAddr::new(ip, port))
        }
        _ => return Err(Refused::Invalid("version 1 line")),
    };
    Ok(Parsed::Complete { client, len })
}

/// A version 2 header: given its first 16 bytes, `Incomplete` with its whole length; given
/// all of it, what it says.
fn parse_v2(b: &[u8]) -> Result<Parsed, Refused> {
    if b.len() < 16 || b[..12] != V2_SIGNATURE {
        return Err(Refused::Invalid("version 2 signature"));
    }
    let (version, command, family) = (b[12] >> 4, b[12] & 0x0f, b[13]);
    if version != 2 {
        return Err(Refused::Invalid("version 2 header of another version"));
    }
    let len = 16 + usize::from(u16::from_be_bytes([b[14], b[15]]));
    if b.len() < len {
        return Ok(Parsed::Incomplete(len));
    }
    let addresses = &b[16..len];
    let client = match (command, family >> 4) {
        // LOCAL: the balancer's own connection (health checks).
        (0, _) => None,
        (1, 0x1) if addresses.len() >= 12 => {
            let ip = Ipv4Addr::new(addresses[0], addresses[1], addresses[2], addresses[3]);
            Some(SocketAddr::new(ip.into(), u16::from_be_bytes([addresses[8], addresses[9]])))
        }
        (1, 0x2) if addresses.len() >= 36 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&addresses[..16]);
            Some(SocketAddr::new(Ipv6Addr::from(octets).into(), u16::from_be_bytes([addresses[32], addresses[33]])))
        }
        (1, 0x1 | 0x2) => return Err(Refused::Invalid("version 2 addresses shorter than their family")),
        // Unspecified or UNIX sockets: no address to take.
        (1, _) => None,
        _ => return Err(Refused::Invalid("version 2 command")),
    };
    Ok(Parsed::Complete { client, len })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
        let mut b = V2_SIGNATURE.to_vec();
        b.push(0x20 | command);
        b.push(family);
        b.extend_from_slice(&u16::try_from(addresses.len()).unwrap().to_be_bytes());
        b.extend_from_slice(addresses);
        b
    }

    #[test]
    fn version_1_lines() {
        let complete = |s: &str| parse_v1(s.as_bytes());
        assert_eq!(
            complete("PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\r\nGET / HTTP/1.1\r\n"),
            Ok(Parsed::Complete { client: Some("203.0.113.7:56324".parse().unwrap()), len: 44 })
        );
        assert_eq!(
            complete("PROXY TCP6 2001:db8::7 2001:db8::1 4000 443\r\n"),
            Ok(Parsed::Complete { client: Some("[2001:db8::7]:4000".parse().unwrap()), len: 45 })
        );
        assert_eq!(complete("PROXY UNKNOWN\r\n"), Ok(Parsed::Complete { client: None, len: 15 }));
        assert_eq!(complete("PROXY UNKNOWN 1 2 3 4\r\n"), Ok(Parsed::Complete { client: None, len: 23 }));
        assert_eq!(complete("PROXY TCP4 203.0.113.7"), Ok(Parsed::Incomplete(23)));
        for bad in [
            "GET / HTTP/1.1\r\n",
            "PROXY TCP4 203.0.113.7 192.0.2.1 56324\r\n",
            "PROXY TCP4 2001:db8::7 192.0.2.1 1 2\r\n",
            "PROXY TCP6 203.0.113.7 192.0.2.1 1 2\r\n",
            "PROXY TCP4 203.0.113.7 192.0.2.1 70000 443\r\n",
            "PROXY TCP4 not-an-ip 192.0.2.1 1 2\r\n",
            "PROXY UDP4 203.0.113.7 192.0.2.1 1 2\r\n",
        ] {
            assert!(matches!(complete(bad), Err(Refused::Invalid(_))), "{bad:?}");
        }
        let long = format!("PROXY TCP4 {}", "1".repeat(V1_MAX));
        assert!(matches!(complete(&long), Err(Refused::Invalid(_))));
    }

    #[test]
    fn version_2_headers() {
        let v4 = [203, 0, 113, 7, 192, 0, 2, 1, 0xdc, 0x04, 0x01, 0xbb];
        let header = v2(1, 0x11, &v4);
        assert_eq!(parse_v2(&header[..16]), Ok(Parsed::Incomplete(28)));
        assert_eq!(
            parse_v2(&header),
            Ok(Parsed::Complete { client: Some("203.0.113.7:56324".parse().unwrap()), len: 28 })
        );
        let mut v6 = "2001:db8::7".parse::<Ipv6Addr>().unwrap().octets().to_vec();
        v6.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[0x0f, 0xa0, 0x01, 0xbb]);
        // TLVs after the addresses (AWS puts its endpoint id there) are skipped.
        v6.extend_from_slice(&[0xea, 0x00, 0x03, b'v', b'p', b'c']);
        assert_eq!(
            parse_v2(&v2(1, 0x21, &v6)),
            Ok(Parsed::Complete { client: Some("[2001:db8::7]:4000".parse().unwrap()), len: 16 + v6.len() })
        );
        assert_eq!(parse_v2(&v2(0, 0x11, &v4)), Ok(Parsed::Complete { client: None, len: 28 }));
        assert_eq!(parse_v2(&v2(1, 0x00, &[])), Ok(Parsed::Complete { client: None, len: 16 }));
        assert!(matches!(parse_v2(&v2(1, 0x11, &v4[..8])), Err(Refused::Invalid(_))));
        assert!(matches!(parse_v2(&v2(2, 0x11, &v4)), Err(Refused::Invalid(_))));
        let mut v1_version = v2(1, 0x11, &v4);
        v1_version[12] = 0x11;
        assert!(matches!(parse_v2(&v1_version), Err(Refused::Invalid(_))));
    }

    #[tokio::test]
    async fn the_header_is_read_exactly_and_in_pieces() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let v4 = [203, 0, 113, 7, 192, 0, 2, 1, 0xdc, 0x04, 0x01, 0xbb];
        type Case = (Vec<Vec<u8>>, Result<Option<SocketAddr>, Refused>);
        let cases: Vec<Case> = vec![
            (
                vec![b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\r\nGET".to_vec()],
                Ok(Some("203.0.113.7:56324".parse().unwrap())),
            ),
            // Split across segments, in both versions.
            (
                vec![b"PROXY TCP4 203.0.1".to_vec(), b"13.7 192.0.2.1 56324 443\r\nGET".to_vec()],
                Ok(Some("203.0.113.7:56324".parse().unwrap())),
            ),
            (
                vec![v2(1, 0x11, &v4)[..10].to_vec(), [&v2(1, 0x11, &v4)[10..], b"GET"].concat()],
                Ok(Some("203.0.113.7:56324".parse().unwrap())),
            ),
            (vec![b"GET / HTTP/1.1\r\n".to_vec()], Err(Refused::Invalid("neither a version 1 nor a version 2 header"))),
            (vec![b"PROXY TCP4".to_vec()], Err(Refused::TimedOut(Duration::from_millis(300)))),
        ];
        for (pieces, want) in cases {
            let client = tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                for p in pieces {
                    s.write_all(&p).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            });
            let (mut s, _) = listener.accept().await.unwrap();
            let got = read_header(&mut s, Duration::from_millis(300)).await;
            assert_eq!(got, want);
            if want.is_ok() {
                // Nothing after the header was taken.
                let mut rest = [0u8; 3];
                s.read_exact(&mut rest).await.unwrap();
                assert_eq!(&rest, b"GET");
            }
            client.abort();
        }
    }
}
