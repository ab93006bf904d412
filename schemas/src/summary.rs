//! A direct reader of the `ApiCall` fields that aggregation needs, straight from the message
//! bytes (strings borrowed, no `Value` tree): the aggregator reads every event of the log, and
//! apache-avro's generic reader costs several microseconds per event.
//!
//! It accepts exactly what [`Decoder::decode`] accepts (same errors for truncation, trailing
//! bytes, bad unions, enums, UTF-8, statuses and negative numbers; tests compare the two on
//! varied events, every truncation and every flipped bit). Schemas it has no direct layout for
//! go through the full decoder.

use std::borrow::Cow;

use uuid::Uuid;

use crate::Outcome;
use crate::avro::{DecodeError, Decoder, HEADER_LEN, MAGIC};

/// What aggregation reads of an `ApiCall`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallSummary<'a> {
    pub event_id: Uuid,
    pub start_time_us: i64,
    pub consumer_id: Option<Cow<'a, str>>,
    pub route_id: Option<Cow<'a, str>>,
    pub status: u16,
    pub outcome: Outcome,
    pub latency_us: u64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub plan_id: Option<Cow<'a, str>>,
}

/// The writer layouts the direct reader knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// Schema v1: no `plan_id`.
    V1,
    /// Schemas v2 and v3 (v3 appended the `edge_shutdown` outcome): `plan_id` last.
    V2,
    /// Schema v4: `plan_id`, then `upstream_target` (not read).
    V4,
    /// Schema v5: v4's fields, then `grpc_status` (checked, not read).
    V5,
}

struct Reader<'a> {
    rest: &'a [u8],
}

fn body_err(reason: &str) -> DecodeError {
    DecodeError::Body { reason: reason.to_owned() }
}

impl<'a> Reader<'a> {
    fn long(&mut self) -> Result<i64, DecodeError> {
        let mut z: u64 = 0;
        for i in 0..10 {
            let (&b, rest) =
                self.rest.split_first().ok_or_else(|| body_err("truncated: the body ends inside a value"))?;
            self.rest = rest;
            z |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(((z >> 1) as i64) ^ -((z & 1) as i64));
            }
        }
        Err(body_err("a varint longer than 10 bytes"))
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.long()?;
        let len = usize::try_from(len).map_err(|_| body_err("negative length"))?;
        if len > self.rest.len() {
            return Err(body_err("truncated: the body ends inside a value"));
        }
        let (s, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(s)
    }

    fn str(&mut self) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes()?).map_err(|e| body_err(&format!("invalid UTF-8: {e}")))
    }

    fn union_index(&mut self) -> Result<bool, DecodeError> {
        match self.long()? {
            0 => Ok(false),
            1 => Ok(true),
            n => Err(body_err(&format!("union index {n} out of range"))),
        }
    }

    fn opt_str(&mut self) -> Result<Option<&'a str>, DecodeError> {
        if self.union_index()? { self.str().map(Some) } else { Ok(None) }
    }

    fn unsigned(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let n = self.long()?;
        u64::try_from(n).map_err(|_| DecodeError::Field { field, reason: format!("negative value {n}") })
    }
}

/// Reads the body of a message of `layout` (header already checked).
pub(crate) fn read(layout: Layout, body: &[u8]) -> Result<CallSummary<'_>, DecodeError> {
    let mut r = Reader { rest: body };
    let event_id = r.str()?;
    let event_id =
        Uuid::parse_str(event_id).map_err(|e| DecodeError::Field { field: "event_id", reason: e.to_string() })?;
    let start_time_us = r.long()?;
    r.str()?; // edge_id
    let consumer_id = r.opt_str()?;
    r.opt_str()?; // credential_id
    let route_id = r.opt_str()?;
    r.str()?; // method
    r.str()?; // host
    r.str()?; // path
    let status = r.long()?;
    // Avro `int`: beyond 32 bits is invalid before it is an invalid status.
    let status = i32::try_from(status).map_err(|_| body_err("int out of range"))?;
    let outcome = r.long()?;
    let outcome = usize::try_from(outcome)
        .ok()
        .and_then(|i| Outcome::ALL.get(i).copied())
        .ok_or_else(|| body_err(&format!("enum index {outcome} out of range")))?;
    let latency_us = r.long()?;
    if r.union_index()? {
        r.unsigned("upstream_latency_us")?;
    }
    let request_bytes = r.long()?;
    let response_bytes = r.long()?;
    r.str()?; // client_ip
    r.opt_str()?; // user_agent
    r.opt_str()?; // trace_id
    let mut grpc_status = None;
    let plan_id = match layout {
        Layout::V1 => None,
        Layout::V2 => r.opt_str()?,
        Layout::V4 | Layout::V5 => {
            let plan_id = r.opt_str()?;
            r.opt_str()?; // upstream_target
            if layout == Layout::V5 && r.union_index()? {
                // Avro `int`: beyond 32 bits is invalid before it is an invalid code.
                let code = r.long()?;
                grpc_status = Some(i32::try_from(code).map_err(|_| body_err("int out of range"))?);
            }
            plan_id
        }
    };
    if !r.rest.is_empty() {
        return Err(DecodeError::TrailingBytes { count: r.rest.len() });
    }
    // Field checks in the full decoder's order.
    let status = u16::try_from(status)
        .ok()
        .filter(|s| (100..=999).contains(s))
        .ok_or(DecodeError::Field { field: "status", reason: format!("{status} is not an HTTP status") })?;
    let unsigned = |n: i64, field| {
        u64::try_from(n).map_err(|_| DecodeError::Field { field, reason: format!("negative value {n}") })
    };
    let summary = CallSummary {
        event_id,
        start_time_us,
        consumer_id: consumer_id.map(Cow::Borrowed),
        route_id: route_id.map(Cow::Borrowed),
        status,
        outcome,
        latency_us: unsigned(latency_us, "latency_us")?,
        request_bytes: unsigned(request_bytes, "request_bytes")?,
        response_bytes: unsigned(response_bytes, "response_bytes")?,
        plan_id: plan_id.map(Cow::Borrowed),
    };
    if let Some(code) = grpc_status
        && u16::try_from(code).is_err()
    {
        return Err(DecodeError::Field { field: "grpc_status", reason: format!("{code} is out of range 0..=65535") });
    }
    Ok(summary)
}

impl Decoder {
    /// The fields aggregation needs, read directly for the known layouts (through
    /// [`Decoder::decode`] for other writer schemas). Errors as [`Decoder::decode`]'s.
    pub fn summarize<'a>(&self, bytes: &'a [u8]) -> Result<CallSummary<'a>, DecodeError> {
        if bytes.len() < HEADER_LEN {
            return Err(DecodeError::TooShort { len: bytes.len() });
        }
        if bytes[..2] != MAGIC {
            return Err(DecodeError::BadMagic { found: [bytes[0], bytes[1]] });
        }
        match self.layout(&bytes[2..HEADER_LEN]) {
            Some(layout) => read(layout, &bytes[HEADER_LEN..]),
            None => {
                let c = self.decode(bytes)?;
                Ok(CallSummary {
                    event_id: c.event_id,
                    start_time_us: c.start_time_us,
                    consumer_id: c.consumer_id.map(Cow::Owned),
                    route_id: c.route_id.map(Cow::Owned),
                    status: c.status,
                    outcome: c.outcome,
                    latency_us: c.latency_us,
                    request_bytes: c.request_bytes,
                    response_bytes: c.response_bytes,
                    plan_id: c.plan_id.map(Cow::Owned),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::avro::tests::{sample, varied_events};
    use crate::{ApiCall, Encoder};

    fn summary_of(c: &ApiCall) -> CallSummary<'static> {
        CallSummary {
            event_id: c.event_id,
            start_time_us: c.start_time_us,
            consumer_id: c.consumer_id.clone().map(Cow::Owned),
            route_id: c.route_id.clone().map(Cow::Owned),
            status: c.status,
            outcome: c.outcome,
            latency_us: c.latency_us,
            request_bytes: c.request_bytes,
            response_bytes: c.response_bytes,
            plan_id: c.plan_id.clone().map(Cow::Owned),
        }
    }

    /// Same acceptance and same fields as the full decoder.
    fn agree(dec: &Decoder, bytes: &[u8]) {
        match (dec.decode(bytes), dec.summarize(bytes)) {
            (Ok(full), Ok(s)) => assert_eq!(s, summary_of(&full)),
            (Err(_), Err(_)) => {}
            (full, s) => panic!("decode {full:?} but summarize {s:?} for {bytes:02x?}"),
        }
    }

    #[test]
    fn agrees_with_the_full_decoder_on_varied_events_truncations_and_flipped_bits() {
        let enc = Encoder::new().unwrap();
        let dec = Decoder::new().unwrap();
        for e in varied_events() {
            agree(&dec, &enc.encode(&e).unwrap());
        }
        let good = enc.encode(&sample()).unwrap();
        assert!(dec.summarize(&good).is_ok());
        for len in 0..good.len() {
            agree(&dec, &good[..len]);
        }
        for i in HEADER_LEN..good.len() {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[i] ^= 1 << bit;
                agree(&dec, &bad);
            }
        }
        let mut long = good.clone();
        long.push(0);
        agree(&dec, &long);
    }

    #[test]
    fn reads_v1_messages() {
        let v1 = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/api_call.v1.bin")).unwrap();
        let dec = Decoder::new().unwrap();
        agree(&dec, &v1);
        assert_eq!(dec.summarize(&v1).unwrap().plan_id, None);
        assert!(matches!(dec.summarize(&v1).unwrap().consumer_id, Some(Cow::Borrowed("acme"))));
    }
}
