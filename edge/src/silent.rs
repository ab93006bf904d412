//! A deadline for a new connection's first bytes.
//!
//! hyper's `header_read_timeout` starts only once hyper-util's `auto` server has read enough to
//! tell HTTP/1 from HTTP/2 (the first byte that is not the HTTP/2 preface's, or the whole
//! 24-byte preface); a client that connects and sends nothing, or only the start of the
//! preface, was held open for ever, and enough of them exhaust the process's file descriptors
//! (slowloris). [`FirstBytes`] fails the connection's reads with `TimedOut` when that point is
//! not reached in time; after it, reads and writes pass straight through and hyper's own timer
//! takes over for the rest of the request head.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What an HTTP/2 client with prior knowledge sends first (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An accepted stream whose first bytes must arrive within a deadline (see the module doc).
#[derive(Debug)]
pub struct FirstBytes<S> {
    inner: S,
    /// Until the protocol can be told: the deadline (a timer entry only once a read waits).
    deadline: Option<(Duration, Option<Pin<Box<tokio::time::Sleep>>>)>,
    /// Bytes read so far, all of them the preface's.
    matched: usize,
    /// Set when the deadline passes (for servers that do not see the error: hyper's HTTP/1
    /// server takes a failed read before any byte for a connection closed by the client).
    expired: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl<S> FirstBytes<S> {
    pub fn new(inner: S, within: Duration) -> Self {
        Self { inner, deadline: Some((within, None)), matched: 0, expired: None }
    }

    /// Also sets `expired` when the deadline passes.
    pub fn flagging(mut self, expired: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.expired = Some(expired);
        self
    }

    /// Takes the bytes a read returned: once they are enough to tell the protocol, the
    /// deadline is gone.
    fn seen(&mut self, got: &[u8]) {
        let rest = &PREFACE[self.matched..];
        let n = got.len().min(rest.len());
        if got.is_empty() || got[..n] != rest[..n] || self.matched + got.len() >= PREFACE.len() {
            self.deadline = None;
        } else {
            self.matched += got.len();
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FirstBytes<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some((within, sleep)) = this.deadline.as_mut() else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.seen(&buf.filled()[before..]);
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let sleep = sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(*within)));
                if sleep.as_mut().poll(cx).is_ready() {
                    this.deadline = None;
                    if let Some(flag) = &this.expired {
                        flag.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no request within header_read_timeout_ms of connecting",
                    )));
                }
                Poll::Pending
            }
            err => err,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FirstBytes<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Reads through a [`FirstBytes`] over a pipe whose other end sends `chunks` (a pause
    /// before each), with a 200 ms deadline (real time: tokio's `test-util` is not built): what was read, and the error that ended it.
    async fn read_all(chunks: &[(u64, &[u8])]) -> (Vec<u8>, Option<io::ErrorKind>) {
        let (client, server) = tokio::io::duplex(64);
        let chunks: Vec<(u64, Vec<u8>)> = chunks.iter().map(|(ms, c)| (*ms, c.to_vec())).collect();
        let writer = tokio::spawn(async move {
            let mut client = client;
            for (ms, c) in chunks {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                client.write_all(&c).await.unwrap();
            }
            // Keep the connection open (a silent client), then hang up.
            tokio::time::sleep(Duration::from_millis(400)).await;
        });
        let mut s = FirstBytes::new(server, Duration::from_millis(200));
        let mut got = Vec::new();
        let mut buf = [0u8; 8];
        let err = loop {
            match s.read(&mut buf).await {
                Ok(0) => break None,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => break Some(e.kind()),
            }
        };
        writer.abort();
        (got, err)
    }

    #[tokio::test]
    async fn silence_or_a_stalled_preface_times_out_and_a_request_does_not() {
        // Nothing at all.
        assert_eq!(read_all(&[]).await, (vec![], Some(io::ErrorKind::TimedOut)));
        // The start of the HTTP/2 preface, then nothing.
        assert_eq!(read_all(&[(0, b"PRI * HT")]).await, (b"PRI * HT".to_vec(), Some(io::ErrorKind::TimedOut)));
        // An HTTP/1 request's first byte settles it: later silence is hyper's business.
        assert_eq!(read_all(&[(0, b"G"), (350, b"ET /")]).await, (b"GET /".to_vec(), None));
        // "P" could be the preface, "PO" cannot.
        assert_eq!(read_all(&[(0, b"P"), (100, b"OST"), (350, b" /")]).await, (b"POST /".to_vec(), None));
        // The whole preface, in pieces within the deadline.
        let (got, err) = read_all(&[(0, &PREFACE[..10]), (100, &PREFACE[10..]), (350, b"x")]).await;
        assert_eq!((got.len(), err), (25, None));
        // Bytes that came late: timed out first.
        assert_eq!(read_all(&[(300, b"GET /")]).await, (vec![], Some(io::ErrorKind::TimedOut)));
    }
}
