//! Billing periods: calendar months, UTC, named `YYYY-MM`.

use tollgate_common::time;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Period {
    pub label: String,
    /// Unix seconds, inclusive.
    pub start: i64,
    /// Unix seconds, exclusive.
    pub end: i64,
}

impl Period {
    /// Parses `YYYY-MM`.
    pub fn parse(s: &str) -> Option<Self> {
        let (y, m) = s.split_once('-')?;
        if y.len() != 4 || m.len() != 2 {
            return None;
        }
        let start = time::parse_utc(&format!("{y}-{m}-01")).ok()?;
        Some(Self { label: time::month_label(start), start, end: time::next_month_start(start) })
    }

    pub fn next(&self) -> Self {
        Self { label: time::month_label(self.end), start: self.end, end: time::next_month_start(self.end) }
    }

    pub fn previous(&self) -> Self {
        let start = time::month_start(self.start - 1);
        Self { label: time::month_label(start), start, end: self.start }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_months() {
        let p = Period::parse("2026-12").unwrap();
        assert_eq!(time::format_utc(p.start), "2026-12-01T00:00:00Z");
        assert_eq!(time::format_utc(p.end), "2027-01-01T00:00:00Z");
        assert_eq!(p.next().label, "2027-01");
        assert_eq!(p.previous().label, "2026-11");
        for bad in ["2026-13", "2026-1", "26-11", "2026/11", "november"] {
            assert!(Period::parse(bad).is_none(), "{bad}");
        }
    }
}
