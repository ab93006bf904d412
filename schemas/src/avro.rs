//! Avro single-object encoding of [`ApiCall`].
//!
//! Layout of every message: `C3 01` (magic), the 8-byte little-endian CRC-64-AVRO (Rabin)
//! fingerprint of the writer schema's Parsing Canonical Form, then the Avro binary body.
//! The [`Decoder`] knows every schema version this crate has shipped (see [`SCHEMA_VERSIONS`])
//! and resolves old writer schemas to the current reader schema, so old messages stay readable.
//! Bad input is an error value, never a panic.

use std::collections::HashMap;

use apache_avro::Schema;
use apache_avro::rabin::Rabin;
use apache_avro::types::Value;
use uuid::Uuid;

use crate::{ApiCall, ApiCallRef, Outcome};

/// The two magic bytes that start every single-object encoded message.
pub const MAGIC: [u8; 2] = [0xC3, 0x01];
/// Magic plus fingerprint.
pub const HEADER_LEN: usize = 10;

/// The current `ApiCall` schema (the writer schema of this build).
pub const CURRENT_SCHEMA: &str = include_str!("../avro/api_call.avsc");

/// Schema v1 (until `plan_id` was added), frozen.
pub const SCHEMA_V1: &str = include_str!("../avro/api_call.v1.avsc");

/// Schema v2 (until the `edge_shutdown` outcome was added), frozen. Its body layout is the
/// current one: v3 only appended an enum symbol.
pub const SCHEMA_V2: &str = include_str!("../avro/api_call.v2.avsc");

/// Schema v3 (until `upstream_target` was added), frozen. Its body layout is v2's.
pub const SCHEMA_V3: &str = include_str!("../avro/api_call.v3.avsc");

/// Schema v4 (until `grpc_status` was added), frozen.
pub const SCHEMA_V4: &str = include_str!("../avro/api_call.v4.avsc");

/// Every `ApiCall` schema version ever shipped, oldest first; the last one is
/// [`CURRENT_SCHEMA`]. Old versions must stay here so that old messages remain decodable.
pub const SCHEMA_VERSIONS: &[&str] = &[SCHEMA_V1, SCHEMA_V2, SCHEMA_V3, SCHEMA_V4, CURRENT_SCHEMA];

/// Why an event could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("invalid Avro schema `{name}`: {reason}")]
    Schema { name: &'static str, reason: String },
    #[error("cannot encode ApiCall {event_id}: {reason}")]
    Body { event_id: Uuid, reason: String },
}

/// Why a message could not be decoded. Every variant is a property of the input bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("message is {len} bytes, shorter than the 10-byte single-object header")]
    TooShort { len: usize },
    #[error("bad magic {found:02x?}, expected [c3, 01] (not Avro single-object encoding)")]
    BadMagic { found: [u8; 2] },
    #[error("unknown writer schema fingerprint {fingerprint} (not an ApiCall schema this build knows)")]
    UnknownFingerprint { fingerprint: String },
    #[error("invalid Avro body: {reason}")]
    Body { reason: String },
    #[error("{count} trailing bytes after the Avro body")]
    TrailingBytes { count: usize },
    #[error("field `{field}`: {reason}")]
    Field { field: &'static str, reason: String },
}

fn parse(name: &'static str, text: &str) -> Result<Schema, EncodeError> {
    Schema::parse_str(text).map_err(|e| EncodeError::Schema { name, reason: e.to_string() })
}

/// The CRC-64-AVRO fingerprint of a schema, as single-object encoding writes it.
pub(crate) fn fingerprint_of(schema: &Schema) -> [u8; 8] {
    fingerprint(schema)
}

fn fingerprint(schema: &Schema) -> [u8; 8] {
    let fp = schema.fingerprint::<Rabin>();
    let mut out = [0u8; 8];
    // Rabin yields exactly 8 bytes, already little-endian as the spec requires.
    for (o, b) in out.iter_mut().zip(fp.bytes.iter()) {
        *o = *b;
    }
    out
}

/// Encodes [`ApiCall`]s with the current schema. Cheap to clone? No: build one and share it.
#[derive(Debug)]
pub struct Encoder {
    schema: Schema,
    header: [u8; HEADER_LEN],
}

impl Encoder {
    /// Parses the current schema.
    pub fn new() -> Result<Self, EncodeError> {
        let schema = parse("api_call.avsc", CURRENT_SCHEMA)?;
        let mut header = [0u8; HEADER_LEN];
        header[..2].copy_from_slice(&MAGIC);
        header[2..].copy_from_slice(&fingerprint(&schema));
        Ok(Self { schema, header })
    }

    /// The fingerprint of the schema this encoder writes.
    pub fn fingerprint(&self) -> [u8; 8] {
        let mut fp = [0u8; 8];
        fp.copy_from_slice(&self.header[2..]);
        fp
    }

    /// Encodes one event as a single-object encoded message.
    pub fn encode(&self, call: &ApiCall) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::with_capacity(256);
        self.encode_into(call, &mut out)?;
        Ok(out)
    }

    /// Appends one single-object encoded message to `out`: the header, then the body written
    /// field by field in the current schema's order (no intermediate `Value` tree; the edge
    /// encodes every call). Byte-identical to apache-avro's writer, which the tests check on
    /// generated events, and decodable by it.
    pub fn encode_into(&self, call: &ApiCall, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        self.encode_ref_into(&call.as_ref(), out);
        Ok(())
    }

    /// [`Encoder::encode_into`] for an event with borrowed fields (cannot fail).
    pub fn encode_ref_into(&self, call: &ApiCallRef<'_>, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.header);
        write_body(call, out);
    }

    /// Like [`Encoder::encode_into`], through apache-avro's generic `Value` writer (with schema
    /// validation): the reference the direct writer is tested and benchmarked against.
    pub fn encode_with_apache_avro(&self, call: &ApiCall, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        out.extend_from_slice(&self.header);
        let value = to_value(call);
        let body = apache_avro::to_avro_datum(&self.schema, value)
            .map_err(|e| EncodeError::Body { event_id: call.event_id, reason: e.to_string() })?;
        out.extend_from_slice(&body);
        Ok(())
    }
}

/// Avro `long`/`int`: zig-zag, then base-128 varint.
fn write_long(n: i64, out: &mut Vec<u8>) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8 & 0x7f) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

fn write_str(s: &str, out: &mut Vec<u8>) {
    write_long(s.len() as i64, out);
    out.extend_from_slice(s.as_bytes());
}

/// `["null", "string"]`.
fn write_opt_str(v: Option<&str>, out: &mut Vec<u8>) {
    match v {
        None => write_long(0, out),
        Some(s) => {
            write_long(1, out);
            write_str(s, out);
        }
    }
}

/// The body of an `ApiCall` in `api_call.avsc` (v5) field order.
fn write_body(c: &ApiCallRef<'_>, out: &mut Vec<u8>) {
    let mut uuid = [0u8; uuid::fmt::Hyphenated::LENGTH];
    write_str(c.event_id.hyphenated().encode_lower(&mut uuid), out);
    write_long(c.start_time_us, out);
    write_str(c.edge_id, out);
    write_opt_str(c.consumer_id, out);
    write_opt_str(c.credential_id, out);
    write_opt_str(c.route_id, out);
    write_str(c.method, out);
    write_str(c.host, out);
    write_str(c.path, out);
    write_long(i64::from(c.status), out);
    write_long(i64::from(c.outcome.index()), out);
    write_long(saturating_i64(c.latency_us), out);
    match c.upstream_latency_us {
        None => write_long(0, out),
        Some(n) => {
            write_long(1, out);
            write_long(saturating_i64(n), out);
        }
    }
    write_long(saturating_i64(c.request_bytes), out);
    write_long(saturating_i64(c.response_bytes), out);
    write_str(c.client_ip, out);
    write_opt_str(c.user_agent, out);
    write_opt_str(c.trace_id, out);
    write_opt_str(c.plan_id, out);
    write_opt_str(c.upstream_target, out);
    match c.grpc_status {
        None => write_long(0, out),
        Some(code) => {
            write_long(1, out);
            write_long(i64::from(code), out);
        }
    }
}

fn opt_string(v: &Option<String>) -> Value {
    match v {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(s) => Value::Union(1, Box::new(Value::String(s.clone()))),
    }
}

fn opt_long(v: Option<u64>) -> Value {
    match v {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(n) => Value::Union(1, Box::new(Value::Long(saturating_i64(n)))),
    }
}

fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_value(c: &ApiCall) -> Value {
    Value::Record(vec![
        ("event_id".into(), Value::Uuid(c.event_id)),
        ("start_time_us".into(), Value::TimestampMicros(c.start_time_us)),
        ("edge_id".into(), Value::String(c.edge_id.clone())),
        ("consumer_id".into(), opt_string(&c.consumer_id)),
        ("credential_id".into(), opt_string(&c.credential_id)),
        ("route_id".into(), opt_string(&c.route_id)),
        ("method".into(), Value::String(c.method.clone())),
        ("host".into(), Value::String(c.host.clone())),
        ("path".into(), Value::String(c.path.clone())),
        ("status".into(), Value::Int(i32::from(c.status))),
        ("outcome".into(), Value::Enum(c.outcome.index(), c.outcome.as_str().to_owned())),
        ("latency_us".into(), Value::Long(saturating_i64(c.latency_us))),
        ("upstream_latency_us".into(), opt_long(c.upstream_latency_us)),
        ("request_bytes".into(), Value::Long(saturating_i64(c.request_bytes))),
        ("response_bytes".into(), Value::Long(saturating_i64(c.response_bytes))),
        ("client_ip".into(), Value::String(c.client_ip.clone())),
        ("user_agent".into(), opt_string(&c.user_agent)),
        ("trace_id".into(), opt_string(&c.trace_id)),
        ("plan_id".into(), opt_string(&c.plan_id)),
        ("upstream_target".into(), opt_string(&c.upstream_target)),
        (
            "grpc_status".into(),
            match c.grpc_status {
                None => Value::Union(0, Box::new(Value::Null)),
                Some(code) => Value::Union(1, Box::new(Value::Int(i32::from(code)))),
            },
        ),
    ])
}

/// Decodes single-object encoded [`ApiCall`]s written with any known schema version.
#[derive(Debug)]
pub struct Decoder {
    reader: Schema,
    reader_fp: [u8; 8],
    writers: HashMap<[u8; 8], Schema>,
    /// Fingerprints whose layout the direct reader (`summarize`) knows.
    layouts: Vec<([u8; 8], crate::summary::Layout)>,
}

impl Decoder {
    /// Parses every known schema version.
    pub fn new() -> Result<Self, EncodeError> {
        Self::with_writer_schemas(SCHEMA_VERSIONS)
    }

    /// A decoder that knows the given writer schemas (JSON texts) and reads into the current
    /// schema. Used by compatibility tests.
    pub fn with_writer_schemas(writer_schemas: &[&str]) -> Result<Self, EncodeError> {
        let reader = parse("api_call.avsc", CURRENT_SCHEMA)?;
        let reader_fp = fingerprint(&reader);
        let mut writers = HashMap::new();
        for text in writer_schemas {
            let schema = parse("writer schema", text)?;
            writers.insert(fingerprint(&schema), schema);
        }
        writers.insert(reader_fp, reader.clone());
        let v1 = fingerprint(&parse("api_call.v1.avsc", SCHEMA_V1)?);
        let v2 = fingerprint(&parse("api_call.v2.avsc", SCHEMA_V2)?);
        let v3 = fingerprint(&parse("api_call.v3.avsc", SCHEMA_V3)?);
        let v4 = fingerprint(&parse("api_call.v4.avsc", SCHEMA_V4)?);
        let layouts = [
            (v1, crate::summary::Layout::V1),
            (v2, crate::summary::Layout::V2),
            (v3, crate::summary::Layout::V2),
            (v4, crate::summary::Layout::V4),
            (reader_fp, crate::summary::Layout::V5),
        ]
        .into_iter()
        .filter(|(fp, _)| writers.contains_key(fp))
        .collect();
        Ok(Self { reader, reader_fp, writers, layouts })
    }

    pub(crate) fn layout(&self, fp: &[u8]) -> Option<crate::summary::Layout> {
        self.layouts.iter().find(|(f, _)| f[..] == *fp).map(|(_, l)| *l)
    }

    /// Decodes one message.
    pub fn decode(&self, bytes: &[u8]) -> Result<ApiCall, DecodeError> {
        if bytes.len() < HEADER_LEN {
            return Err(DecodeError::TooShort { len: bytes.len() });
        }
        if bytes[..2] != MAGIC {
            return Err(DecodeError::BadMagic { found: [bytes[0], bytes[1]] });
        }
        let mut fp = [0u8; 8];
        fp.copy_from_slice(&bytes[2..HEADER_LEN]);
        let writer =
            self.writers.get(&fp).ok_or_else(|| DecodeError::UnknownFingerprint { fingerprint: hex_string(&fp) })?;
        let mut body = EofWatch { rest: &bytes[HEADER_LEN..], hit_eof: false };
        let reader_schema = (fp != self.reader_fp).then_some(&self.reader);
        let value = apache_avro::from_avro_datum(writer, &mut body, reader_schema)
            .map_err(|e| DecodeError::Body { reason: e.to_string() })?;
        if body.hit_eof {
            return Err(DecodeError::Body { reason: "truncated: the body ends inside a value".into() });
        }
        if !body.rest.is_empty() {
            return Err(DecodeError::TrailingBytes { count: body.rest.len() });
        }
        from_value(value)
    }
}

/// A byte-slice reader that remembers whether anyone asked for more bytes than were left.
/// apache-avro turns some end-of-input errors into values (a truncated string reads as
/// `Null`), so truncation is detected here instead of trusting the decoder's result.
struct EofWatch<'a> {
    rest: &'a [u8],
    hit_eof: bool,
}

impl std::io::Read for EofWatch<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.len() > self.rest.len() {
            self.hit_eof = true;
        }
        let n = buf.len().min(self.rest.len());
        buf[..n].copy_from_slice(&self.rest[..n]);
        self.rest = &self.rest[n..];
        Ok(n)
    }
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct Fields(HashMap<String, Value>);

impl Fields {
    fn take(&mut self, field: &'static str) -> Result<Value, DecodeError> {
        self.0.remove(field).ok_or(DecodeError::Field { field, reason: "missing".into() })
    }

    fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        match self.take(field)? {
            Value::String(s) => Ok(s),
            other => Err(wrong(field, "string", &other)),
        }
    }

    fn opt_string(&mut self, field: &'static str) -> Result<Option<String>, DecodeError> {
        match union_branch(self.take(field)?) {
            (0, Value::Null) => Ok(None),
            (1, Value::String(s)) => Ok(Some(s)),
            (_, other) => Err(wrong(field, "null or string", &other)),
        }
    }

    fn long(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        match self.take(field)? {
            Value::Long(n) | Value::TimestampMicros(n) => Ok(n),
            Value::Int(n) => Ok(i64::from(n)),
            other => Err(wrong(field, "long", &other)),
        }
    }

    fn unsigned(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let n = self.long(field)?;
        u64::try_from(n).map_err(|_| DecodeError::Field { field, reason: format!("negative value {n}") })
    }

    fn opt_unsigned(&mut self, field: &'static str) -> Result<Option<u64>, DecodeError> {
        match union_branch(self.take(field)?) {
            (0, Value::Null) => Ok(None),
            (1, Value::Long(n)) => u64::try_from(n)
                .map(Some)
                .map_err(|_| DecodeError::Field { field, reason: format!("negative value {n}") }),
            (_, other) => Err(wrong(field, "null or long", &other)),
        }
    }

    /// `["null", "int"]` holding 0..=65535.
    fn opt_u16(&mut self, field: &'static str) -> Result<Option<u16>, DecodeError> {
        match union_branch(self.take(field)?) {
            (0, Value::Null) => Ok(None),
            (1, Value::Int(n)) => u16::try_from(n)
                .map(Some)
                .map_err(|_| DecodeError::Field { field, reason: format!("{n} is out of range 0..=65535") }),
            (_, other) => Err(wrong(field, "null or int", &other)),
        }
    }
}

/// The branch index and value of a `["null", T]` union. apache-avro reports a truncated
/// string as `Null`, so the branch index must agree with the value for the field to be valid.
fn union_branch(v: Value) -> (u32, Value) {
    match v {
        Value::Union(index, inner) => (index, *inner),
        other => (u32::MAX, other),
    }
}

fn wrong(field: &'static str, expected: &str, got: &Value) -> DecodeError {
    DecodeError::Field { field, reason: format!("expected {expected}, got {got:?}") }
}

fn from_value(value: Value) -> Result<ApiCall, DecodeError> {
    let Value::Record(fields) = value else {
        return Err(DecodeError::Body { reason: "top-level value is not a record".into() });
    };
    let mut f = Fields(fields.into_iter().collect());
    let event_id = match f.take("event_id")? {
        Value::Uuid(u) => u,
        Value::String(s) => {
            Uuid::parse_str(&s).map_err(|e| DecodeError::Field { field: "event_id", reason: e.to_string() })?
        }
        other => return Err(wrong("event_id", "uuid", &other)),
    };
    let status = f.long("status")?;
    let status = u16::try_from(status)
        .ok()
        .filter(|s| (100..=999).contains(s))
        .ok_or(DecodeError::Field { field: "status", reason: format!("{status} is not an HTTP status") })?;
    let outcome = match f.take("outcome")? {
        Value::Enum(_, symbol) => Outcome::from_symbol(&symbol)
            .ok_or(DecodeError::Field { field: "outcome", reason: format!("unknown symbol {symbol}") })?,
        other => return Err(wrong("outcome", "enum", &other)),
    };
    Ok(ApiCall {
        event_id,
        start_time_us: f.long("start_time_us")?,
        edge_id: f.string("edge_id")?,
        consumer_id: f.opt_string("consumer_id")?,
        credential_id: f.opt_string("credential_id")?,
        route_id: f.opt_string("route_id")?,
        method: f.string("method")?,
        host: f.string("host")?,
        path: f.string("path")?,
        status,
        outcome,
        latency_us: f.unsigned("latency_us")?,
        upstream_latency_us: f.opt_unsigned("upstream_latency_us")?,
        request_bytes: f.unsigned("request_bytes")?,
        response_bytes: f.unsigned("response_bytes")?,
        client_ip: f.string("client_ip")?,
        user_agent: f.opt_string("user_agent")?,
        trace_id: f.opt_string("trace_id")?,
        plan_id: f.opt_string("plan_id")?,
        upstream_target: f.opt_string("upstream_target")?,
        grpc_status: f.opt_u16("grpc_status")?,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    pub(crate) fn sample() -> ApiCall {
        ApiCall {
            event_id: Uuid::now_v7(),
            start_time_us: 1_764_000_000_123_456,
            edge_id: "edge-1".into(),
            consumer_id: Some("acme".into()),
            credential_id: Some("acme-key-1".into()),
            route_id: Some("echo".into()),
            method: "POST".into(),
            host: "api.example.com".into(),
            path: "/v1/items".into(),
            status: 201,
            outcome: Outcome::Forwarded,
            latency_us: 1234,
            upstream_latency_us: Some(1000),
            request_bytes: 42,
            response_bytes: 4200,
            client_ip: "127.0.0.1".into(),
            user_agent: Some("curl/8".into()),
            trace_id: Some("0af7651916cd43dd8448eb211c80319c".into()),
            plan_id: Some("pro".into()),
            upstream_target: Some("http://127.0.0.1:8081".into()),
            grpc_status: Some(14),
        }
    }

    /// Events covering every optional field absent and present, empty and non-ASCII strings,
    /// every outcome, and numbers at the edges of the varint encoding.
    pub(crate) fn varied_events() -> Vec<ApiCall> {
        let mut events = Vec::new();
        let numbers = [0u64, 1, 63, 64, 127, 128, 8191, 8192, 1 << 31, (1 << 32) + 7, i64::MAX as u64, u64::MAX];
        for (i, outcome) in Outcome::ALL.into_iter().enumerate() {
            for (j, n) in numbers.into_iter().enumerate() {
                let some = (i + j) % 2 == 0;
                let text = |s: &str| if some { Some(format!("{s}-é€😀-{j}")) } else { None };
                events.push(ApiCall {
                    event_id: Uuid::now_v7(),
                    start_time_us: if j % 3 == 0 { -(n as i64 & 0xffff) } else { (n >> 1) as i64 },
                    edge_id: if j == 0 { String::new() } else { format!("edge-{j}") },
                    consumer_id: text("consumer"),
                    credential_id: text("cred"),
                    route_id: if j % 3 == 1 { None } else { Some("r".repeat(j * 20)) },
                    method: "PATCH".into(),
                    host: "h".repeat(200),
                    path: format!("/p/{j}/ü"),
                    status: [100u16, 101, 200, 304, 429, 599][j % 6],
                    outcome,
                    latency_us: n,
                    upstream_latency_us: if some { Some(n) } else { None },
                    request_bytes: n / 3,
                    response_bytes: n.wrapping_mul(7),
                    client_ip: "::1".into(),
                    user_agent: text("agent"),
                    trace_id: if some { None } else { Some("0af7651916cd43dd8448eb211c80319c".into()) },
                    plan_id: text("plan"),
                    upstream_target: if j % 4 == 1 { None } else { Some(format!("https://[::1]:{j}")) },
                    grpc_status: [None, Some(0), Some(14), Some(63), Some(64), Some(8191), Some(65535)][(i + j) % 7],
                });
            }
        }
        events
    }

    #[test]
    fn direct_writer_is_byte_identical_to_apache_avro_and_decodes() {
        let enc = Encoder::new().unwrap();
        let dec = Decoder::new().unwrap();
        let events = varied_events();
        assert_eq!(events.len(), Outcome::ALL.len() * 12);
        for e in &events {
            let (mut direct, mut reference) = (Vec::new(), Vec::new());
            enc.encode_into(e, &mut direct).unwrap();
            enc.encode_with_apache_avro(e, &mut reference).unwrap();
            assert_eq!(direct, reference, "{e:?}");
            let mut back = dec.decode(&direct).unwrap();
            // Avro longs are signed: values above i64::MAX are written saturated.
            let clamp = |n: u64| n.min(i64::MAX as u64);
            let mut want = e.clone();
            want.latency_us = clamp(want.latency_us);
            want.upstream_latency_us = want.upstream_latency_us.map(clamp);
            want.request_bytes = clamp(want.request_bytes);
            want.response_bytes = clamp(want.response_bytes);
            back.event_id = e.event_id;
            assert_eq!(back, want);
        }
    }

    /// CRC-64-AVRO written from the specification's reference algorithm, independent of
    /// apache-avro, to check the fingerprint bytes and their order.
    fn spec_fingerprint(canonical: &str) -> [u8; 8] {
        const EMPTY: u64 = 0xc15d_213a_a4d7_a795;
        let mut table = [0u64; 256];
        for (i, slot) in table.iter_mut().enumerate() {
            let mut fp = i as u64;
            for _ in 0..8 {
                fp = (fp >> 1) ^ (EMPTY & 0u64.wrapping_sub(fp & 1));
            }
            *slot = fp;
        }
        let mut fp = EMPTY;
        for b in canonical.bytes() {
            fp = (fp >> 8) ^ table[((fp ^ u64::from(b)) & 0xff) as usize];
        }
        fp.to_le_bytes()
    }

    #[test]
    fn round_trip_all_outcomes_and_nulls() {
        let enc = Encoder::new().unwrap();
        let dec = Decoder::new().unwrap();
        for outcome in Outcome::ALL {
            let mut call = sample();
            call.outcome = outcome;
            assert_eq!(dec.decode(&enc.encode(&call).unwrap()).unwrap(), call);
        }
        let mut call = sample();
        call.consumer_id = None;
        call.credential_id = None;
        call.route_id = None;
        call.upstream_latency_us = None;
        call.user_agent = None;
        call.trace_id = None;
        call.upstream_target = None;
        call.grpc_status = None;
        assert_eq!(dec.decode(&enc.encode(&call).unwrap()).unwrap(), call);
    }

    #[test]
    fn a_grpc_status_outside_0_to_65535_is_refused_by_both_readers() {
        let enc = Encoder::new().unwrap();
        let dec = Decoder::new().unwrap();
        let good = enc.encode(&sample()).unwrap();
        // The body ends with the union branch 1 (0x02) and 14 as a zigzag varint (0x1c).
        assert_eq!(good[good.len() - 2..], [0x02, 0x1c]);
        // -1 (zigzag 1) and 70,000 (zigzag 140,000: e0 c5 08).
        for tail in [&[0x01][..], &[0xe0, 0xc5, 0x08]] {
            let mut bad = good[..good.len() - 1].to_vec();
            bad.extend_from_slice(tail);
            for err in [dec.decode(&bad).unwrap_err(), dec.summarize(&bad).unwrap_err()] {
                assert!(matches!(err, DecodeError::Field { field: "grpc_status", .. }), "{tail:02x?}: {err}");
            }
        }
    }

    #[test]
    fn header_is_magic_and_spec_fingerprint() {
        let enc = Encoder::new().unwrap();
        let bytes = enc.encode(&sample()).unwrap();
        assert_eq!(&bytes[..2], &[0xC3, 0x01]);
        let schema = Schema::parse_str(CURRENT_SCHEMA).unwrap();
        assert_eq!(&bytes[2..10], &spec_fingerprint(&schema.canonical_form()));
    }

    #[test]
    fn unknown_fingerprint_is_an_error() {
        let enc = Encoder::new().unwrap();
        let mut bytes = enc.encode(&sample()).unwrap();
        bytes[5] ^= 0xff;
        assert!(matches!(Decoder::new().unwrap().decode(&bytes), Err(DecodeError::UnknownFingerprint { .. })));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let enc = Encoder::new().unwrap();
        let dec = Decoder::new().unwrap();
        let bytes = enc.encode(&sample()).unwrap();
        for len in 0..bytes.len() {
            let r = dec.decode(&bytes[..len]);
            assert!(r.is_err(), "truncated to {len} bytes decoded: {r:?}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(dec.decode(&long), Err(DecodeError::TrailingBytes { count: 1 }));
    }

    #[test]
    fn bad_magic_and_garbage_are_errors_not_panics() {
        let dec = Decoder::new().unwrap();
        assert_eq!(dec.decode(b"{\"json\":1}"), Err(DecodeError::BadMagic { found: [b'{', b'"'] }));
        let enc = Encoder::new().unwrap();
        let good = enc.encode(&sample()).unwrap();
        // Flip every bit of the body once: each result is Ok or Err, never a panic.
        for i in HEADER_LEN..good.len() {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[i] ^= 1 << bit;
                let _ = dec.decode(&bad);
            }
        }
        // A huge string length must not allocate or panic.
        let mut huge = good[..HEADER_LEN].to_vec();
        huge.extend_from_slice(&[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        assert!(dec.decode(&huge).is_err());
    }
}
