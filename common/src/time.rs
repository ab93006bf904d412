//! UTC calendar arithmetic on Unix seconds (proleptic Gregorian, no leap seconds), enough for
//! minutes, months and RFC 3339 timestamps without a date-time dependency.

/// A timestamp the CLIs could not read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{input}` is not a UTC time: expected YYYY-MM-DD, YYYY-MM-DDTHH:MM[:SS][Z] or Unix seconds")]
pub struct TimeError {
    pub input: String,
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's `days_from_civil`).
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date (year, month 1..=12, day 1..=31) of a day number since 1970-01-01.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The start (Unix seconds) of the UTC month that contains `secs`.
pub fn month_start(secs: i64) -> i64 {
    let (y, m, _) = civil_from_days(secs.div_euclid(86_400));
    days_from_civil(y, m, 1) * 86_400
}

/// The start of the UTC month after the one that contains `secs`.
pub fn next_month_start(secs: i64) -> i64 {
    let (y, m, _) = civil_from_days(secs.div_euclid(86_400));
    let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    days_from_civil(y, m, 1) * 86_400
}

/// The start (Unix seconds, UTC midnight) of the monthly period containing `secs` whose
/// periods start on day `anchor_day` (1..=28) of every month: with 1, calendar months.
pub fn period_start(secs: i64, anchor_day: u32) -> i64 {
    let day = anchor_day.clamp(1, 28);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let (y, m) = if d >= day {
        (y, m)
    } else if m == 1 {
        (y - 1, 12)
    } else {
        (y, m - 1)
    };
    days_from_civil(y, m, day) * 86_400
}

/// The same day and time one month after `secs` (for a day of month up to 28).
pub fn add_month(secs: i64) -> i64 {
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    days_from_civil(y, m, d.min(28)) * 86_400 + secs.rem_euclid(86_400)
}

/// `YYYY-MM` of the month that contains `secs`.
pub fn month_label(secs: i64) -> String {
    let (y, m, _) = civil_from_days(secs.div_euclid(86_400));
    format!("{y:04}-{m:02}")
}

/// RFC 3339 UTC with second precision: `2026-11-26T00:30:09Z`.
pub fn format_utc(secs: i64) -> String {
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!("{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z", s / 3600, s / 60 % 60, s % 60)
}

/// RFC 3339 UTC with microseconds: `2026-11-26T00:30:09.000250Z`. (The edge's access log
/// writes its timestamps digit by digit on the request path; its tests check them against
/// this.)
pub fn format_utc_micros(us: i64) -> String {
    let secs = us.div_euclid(1_000_000);
    let mut s = format_utc(secs);
    s.pop(); // the `Z`
    format!("{s}.{:06}Z", us.rem_euclid(1_000_000))
}

/// Reads `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM`, `YYYY-MM-DDTHH:MM:SS` (optionally ending in `Z`;
/// a space may replace the `T`) as UTC, or a plain number of Unix seconds.
pub fn parse_utc(input: &str) -> Result<i64, TimeError> {
    let err = || TimeError { input: input.to_owned() };
    let s = input.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse::<i64>().map_err(|_| err());
    }
    let s = s.strip_suffix('Z').unwrap_or(s);
    let (date, time) = match s.split_once(['T', ' ']) {
        Some((d, t)) => (d, Some(t)),
        None => (s, None),
    };
    let num = |part: &str, lo: u32, hi: u32| -> Result<u32, TimeError> {
        let v: u32 = if part.bytes().all(|b| b.is_ascii_digit()) && !part.is_empty() {
            part.parse().map_err(|_| err())?
        } else {
            return Err(err());
        };
        if (lo..=hi).contains(&v) { Ok(v) } else { Err(err()) }
    };
    let mut d = date.split('-');
    let (Some(y), Some(mo), Some(day), None) = (d.next(), d.next(), d.next(), d.next()) else {
        return Err(err());
    };
    if y.len() != 4 || mo.len() != 2 || day.len() != 2 {
        return Err(err());
    }
    let (year, month) = (i64::from(num(y, 1970, 9999)?), num(mo, 1, 12)?);
    let day = num(day, 1, 31)?;
    let days = days_from_civil(year, month, day);
    if civil_from_days(days) != (year, month, day) {
        return Err(err()); // 2026-02-30
    }
    let mut secs = days * 86_400;
    if let Some(t) = time {
        let mut p = t.split(':');
        let h = num(p.next().ok_or_else(err)?, 0, 23)?;
        let m = num(p.next().ok_or_else(err)?, 0, 59)?;
        let sec = p.next().map(|x| num(x, 0, 59)).transpose()?.unwrap_or(0);
        if p.next().is_some() {
            return Err(err());
        }
        secs += i64::from(h * 3600 + m * 60 + sec);
    }
    Ok(secs)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn micros_keep_six_digits_and_round_down_before_the_epoch() {
        assert_eq!(format_utc_micros(1_795_999_809_000_250), "2026-11-30T00:50:09.000250Z");
        assert_eq!(format_utc_micros(0), "1970-01-01T00:00:00.000000Z");
        // A microsecond before the epoch is in the last second of 1969.
        assert_eq!(format_utc_micros(-1), "1969-12-31T23:59:59.999999Z");
    }

    #[test]
    fn civil_round_trips_over_centuries() {
        for days in (-800_000..800_000).step_by(7) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }

    #[test]
    fn months() {
        let t = parse_utc("2026-11-26T00:30:09Z").unwrap();
        assert_eq!(t, 1_795_653_009);
        assert_eq!(format_utc(t), "2026-11-26T00:30:09Z");
        assert_eq!(format_utc(month_start(t)), "2026-11-01T00:00:00Z");
        assert_eq!(format_utc(next_month_start(t)), "2026-12-01T00:00:00Z");
        assert_eq!(format_utc(next_month_start(parse_utc("2026-12-31T23:59:59").unwrap())), "2027-01-01T00:00:00Z");
        assert_eq!(format_utc(next_month_start(parse_utc("2028-02-29").unwrap())), "2028-03-01T00:00:00Z");
        assert_eq!(month_label(t), "2026-11");
    }

    #[test]
    fn anchored_periods() {
        let t = parse_utc("2026-11-26T00:30:09Z").unwrap();
        assert_eq!(period_start(t, 1), month_start(t));
        assert_eq!(format_utc(period_start(t, 15)), "2026-11-15T00:00:00Z");
        assert_eq!(format_utc(period_start(t, 28)), "2026-10-28T00:00:00Z");
        assert_eq!(format_utc(period_start(parse_utc("2026-01-03").unwrap(), 15)), "2025-12-15T00:00:00Z");
        assert_eq!(format_utc(add_month(period_start(t, 28))), "2026-11-28T00:00:00Z");
        assert_eq!(format_utc(add_month(parse_utc("2026-12-15").unwrap())), "2027-01-15T00:00:00Z");
        assert_eq!(add_month(month_start(t)), next_month_start(t));
        // Every second of a year falls in exactly one period, and periods chain.
        let mut start = period_start(parse_utc("2026-01-01").unwrap(), 10);
        for _ in 0..13 {
            let end = add_month(start);
            assert_eq!(period_start(start, 10), start);
            assert_eq!(period_start(end - 1, 10), start);
            start = end;
        }
    }

    #[test]
    fn parses_the_documented_forms_only() {
        assert_eq!(parse_utc("2026-11-01").unwrap(), parse_utc("2026-11-01T00:00:00Z").unwrap());
        assert_eq!(parse_utc("2026-11-01 10:05").unwrap(), parse_utc("2026-11-01T10:05:00").unwrap());
        assert_eq!(parse_utc("1795653009").unwrap(), 1_795_653_009);
        for bad in [
            "",
            "2026-13-01",
            "2026-02-30",
            "2026-11-01T24:00",
            "2026-1-01",
            "yesterday",
            "2026-11-01T10",
            "2026-11-01T10:00:00:00",
        ] {
            assert!(parse_utc(bad).is_err(), "{bad}");
        }
    }
}
