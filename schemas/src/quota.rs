//! `QuotaState` (`avro/quota_state.avsc`): what the aggregator tells every edge about a
//! consumer's monthly quota, in Avro single-object encoding like `ApiCall`.

use apache_avro::Schema;
use apache_avro::types::Value;

use crate::avro::{DecodeError, EncodeError, HEADER_LEN, MAGIC};

/// The current `QuotaState` schema.
pub const QUOTA_STATE_SCHEMA: &str = include_str!("../avro/quota_state.avsc");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuotaStatus {
    Ok,
    Warning,
    Exceeded,
}

impl QuotaStatus {
    pub const ALL: [QuotaStatus; 3] = [QuotaStatus::Ok, QuotaStatus::Warning, QuotaStatus::Exceeded];

    pub fn as_str(self) -> &'static str {
        match self {
            QuotaStatus::Ok => "ok",
            QuotaStatus::Warning => "warning",
            QuotaStatus::Exceeded => "exceeded",
        }
    }

    /// The status of `used` calls against `quota` with a warning from `warning_percent`.
    pub fn of(used: u64, quota: u64, warning_percent: u8) -> Self {
        if used >= quota {
            QuotaStatus::Exceeded
        } else if u128::from(used) * 100 >= u128::from(quota) * u128::from(warning_percent) {
            QuotaStatus::Warning
        } else {
            QuotaStatus::Ok
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Enforcement {
    /// Reject calls once exceeded.
    Hard,
    /// Let calls through, with a warning header.
    Soft,
}

impl Enforcement {
    pub const ALL: [Enforcement; 2] = [Enforcement::Hard, Enforcement::Soft];

    pub fn as_str(self) -> &'static str {
        match self {
            Enforcement::Hard => "hard",
            Enforcement::Soft => "soft",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Enforcement::ALL.into_iter().find(|e| e.as_str() == s)
    }
}

/// One consumer's quota state for one period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaState {
    pub consumer_id: String,
    pub plan_id: String,
    pub period: String,
    pub period_start_us: i64,
    pub period_end_us: i64,
    pub quota: u64,
    pub used: u64,
    pub status: QuotaStatus,
    pub enforcement: Enforcement,
    pub warning_percent: u8,
    pub covered_until_us: i64,
    pub computed_at_us: i64,
}

/// Encodes and decodes [`QuotaState`] messages (not on a hot path: apache-avro's writer).
#[derive(Debug)]
pub struct QuotaCodec {
    schema: Schema,
    header: [u8; HEADER_LEN],
}

fn long(n: u64) -> Value {
    Value::Long(i64::try_from(n).unwrap_or(i64::MAX))
}

impl QuotaCodec {
    pub fn new() -> Result<Self, EncodeError> {
        let schema = Schema::parse_str(QUOTA_STATE_SCHEMA)
            .map_err(|e| EncodeError::Schema { name: "quota_state.avsc", reason: e.to_string() })?;
        let mut header = [0u8; HEADER_LEN];
        header[..2].copy_from_slice(&MAGIC);
        header[2..].copy_from_slice(&crate::avro::fingerprint_of(&schema));
        Ok(Self { schema, header })
    }

    pub fn encode(&self, s: &QuotaState) -> Result<Vec<u8>, EncodeError> {
        let value = Value::Record(vec![
            ("consumer_id".into(), Value::String(s.consumer_id.clone())),
            ("plan_id".into(), Value::String(s.plan_id.clone())),
            ("period".into(), Value::String(s.period.clone())),
            ("period_start_us".into(), Value::Long(s.period_start_us)),
            ("period_end_us".into(), Value::Long(s.period_end_us)),
            ("quota".into(), long(s.quota)),
            ("used".into(), long(s.used)),
            ("status".into(), Value::Enum(s.status as u32, s.status.as_str().to_owned())),
            ("enforcement".into(), Value::Enum(s.enforcement as u32, s.enforcement.as_str().to_owned())),
            ("warning_percent".into(), Value::Int(i32::from(s.warning_percent))),
            ("covered_until_us".into(), Value::Long(s.covered_until_us)),
            ("computed_at_us".into(), Value::Long(s.computed_at_us)),
        ]);
        let body = apache_avro::to_avro_datum(&self.schema, value)
            .map_err(|e| EncodeError::Body { event_id: uuid::Uuid::nil(), reason: e.to_string() })?;
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.extend_from_slice(&self.header);
        out.extend_from_slice(&body);
        Ok(out)
    }

    pub fn decode(&self, bytes: &[u8]) -> Result<QuotaState, DecodeError> {
        if bytes.len() < HEADER_LEN {
            return Err(DecodeError::TooShort { len: bytes.len() });
        }
        if bytes[..2] != MAGIC {
            return Err(DecodeError::BadMagic { found: [bytes[0], bytes[1]] });
        }
        if bytes[..HEADER_LEN] != self.header {
            return Err(DecodeError::UnknownFingerprint {
                fingerprint: bytes[2..HEADER_LEN].iter().map(|b| format!("{b:02x}")).collect(),
            });
        }
        let mut body = &bytes[HEADER_LEN..];
        let value = apache_avro::from_avro_datum(&self.schema, &mut body, None)
            .map_err(|e| DecodeError::Body { reason: e.to_string() })?;
        if !body.is_empty() {
            return Err(DecodeError::TrailingBytes { count: body.len() });
        }
        let Value::Record(fields) = value else {
            return Err(DecodeError::Body { reason: "not a record".into() });
        };
        let mut f: std::collections::HashMap<String, Value> = fields.into_iter().collect();
        let mut take =
            |name: &'static str| f.remove(name).ok_or(DecodeError::Field { field: name, reason: "missing".into() });
        let bad = |field: &'static str| DecodeError::Field { field, reason: "wrong type or out of range".into() };
        let string = |v: Value, name| if let Value::String(s) = v { Ok(s) } else { Err(bad(name)) };
        let long = |v: Value, name| if let Value::Long(n) = v { Ok(n) } else { Err(bad(name)) };
        let unsigned = |v: Value, name| long(v, name).and_then(|n| u64::try_from(n).map_err(|_| bad(name)));
        Ok(QuotaState {
            consumer_id: string(take("consumer_id")?, "consumer_id")?,
            plan_id: string(take("plan_id")?, "plan_id")?,
            period: string(take("period")?, "period")?,
            period_start_us: long(take("period_start_us")?, "period_start_us")?,
            period_end_us: long(take("period_end_us")?, "period_end_us")?,
            quota: unsigned(take("quota")?, "quota")?,
            used: unsigned(take("used")?, "used")?,
            status: match take("status")? {
                Value::Enum(i, _) => QuotaStatus::ALL.get(i as usize).copied().ok_or_else(|| bad("status"))?,
                _ => return Err(bad("status")),
            },
            enforcement: match take("enforcement")? {
                Value::Enum(i, _) => Enforcement::ALL.get(i as usize).copied().ok_or_else(|| bad("enforcement"))?,
                _ => return Err(bad("enforcement")),
            },
            warning_percent: match take("warning_percent")? {
                Value::Int(n) => u8::try_from(n).map_err(|_| bad("warning_percent"))?,
                _ => return Err(bad("warning_percent")),
            },
            covered_until_us: long(take("covered_until_us")?, "covered_until_us")?,
            computed_at_us: long(take("computed_at_us")?, "computed_at_us")?,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    pub(crate) fn sample() -> QuotaState {
        QuotaState {
            consumer_id: "acme".into(),
            plan_id: "free".into(),
            period: "2026-11".into(),
            period_start_us: 1_793_491_200_000_000,
            period_end_us: 1_796_083_200_000_000,
            quota: 100,
            used: 85,
            status: QuotaStatus::Warning,
            enforcement: Enforcement::Hard,
            warning_percent: 80,
            covered_until_us: 1_795_651_260_000_000,
            computed_at_us: 1_795_651_270_123_456,
        }
    }

    #[test]
    fn round_trips_and_refuses_bad_bytes() {
        let codec = QuotaCodec::new().unwrap();
        let bytes = codec.encode(&sample()).unwrap();
        assert_eq!(codec.decode(&bytes).unwrap(), sample());
        for len in 0..bytes.len() {
            assert!(codec.decode(&bytes[..len]).is_err(), "truncated at {len}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(codec.decode(&longer), Err(DecodeError::TrailingBytes { count: 1 }));
        // An ApiCall is not a QuotaState.
        let call = crate::Encoder::new().unwrap();
        assert!(codec.decode(&call.fingerprint().repeat(3)).is_err());
    }

    #[test]
    fn status_thresholds() {
        assert_eq!(QuotaStatus::of(79, 100, 80), QuotaStatus::Ok);
        assert_eq!(QuotaStatus::of(80, 100, 80), QuotaStatus::Warning);
        assert_eq!(QuotaStatus::of(100, 100, 80), QuotaStatus::Exceeded);
        assert_eq!(QuotaStatus::of(0, 0, 80), QuotaStatus::Exceeded);
        assert_eq!(QuotaStatus::of(u64::MAX - 1, u64::MAX, 99), QuotaStatus::Warning);
        assert_eq!(QuotaStatus::of(u64::MAX - 1, u64::MAX, 100), QuotaStatus::Ok);
    }
}
