//! Currencies and the rounding rule.
//!
//! Every line amount is rounded once, to the currency's minor unit, **half away from zero**
//! (0.125 USD → 0.13, −0.125 → −0.13); the total is the sum of the rounded lines, so the lines
//! always add up to it exactly. Amounts are `rust_decimal::Decimal`, never floats.

use rust_decimal::{Decimal, RoundingStrategy};

/// An ISO 4217 currency code and its number of decimals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Currency {
    pub code: String,
    pub decimals: u32,
}

impl Currency {
    /// A currency from its ISO 4217 code: 0 decimals for JPY, KRW, VND, CLP, ISK, HUF-like
    /// zero-decimal currencies, 3 for BHD, KWD, OMR, JOD, TND, 2 otherwise.
    pub fn parse(code: &str) -> Option<Self> {
        if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_uppercase()) {
            return None;
        }
        let decimals = match code {
            "JPY" | "KRW" | "VND" | "CLP" | "ISK" | "UGX" | "XAF" | "XOF" | "PYG" | "RWF" => 0,
            "BHD" | "KWD" | "OMR" | "JOD" | "TND" | "LYD" | "IQD" => 3,
            _ => 2,
        };
        Some(Self { code: code.to_owned(), decimals })
    }

    /// Rounds to the minor unit, half away from zero.
    pub fn round(&self, amount: Decimal) -> Decimal {
        let mut r = amount.round_dp_with_strategy(self.decimals, RoundingStrategy::MidpointAwayFromZero);
        r.rescale(self.decimals);
        r
    }

    /// The amount with exactly the currency's decimals (`12.50`, `1250` for JPY).
    pub fn format(&self, amount: Decimal) -> String {
        let mut a = amount;
        a.rescale(self.decimals);
        a.to_string()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::str::FromStr;

    use super::*;

    #[test]
    fn rounding_is_half_away_from_zero_to_the_minor_unit() {
        let usd = Currency::parse("USD").unwrap();
        let jpy = Currency::parse("JPY").unwrap();
        let d = |s: &str| Decimal::from_str(s).unwrap();
        assert_eq!(usd.format(usd.round(d("0.125"))), "0.13");
        assert_eq!(usd.format(usd.round(d("-0.125"))), "-0.13");
        assert_eq!(usd.format(usd.round(d("0.124999"))), "0.12");
        assert_eq!(usd.format(usd.round(d("7"))), "7.00");
        assert_eq!(jpy.format(jpy.round(d("1234.5"))), "1235");
        assert_eq!(jpy.format(jpy.round(d("0.4"))), "0");
        assert_eq!(Currency::parse("KWD").unwrap().decimals, 3);
        assert!(Currency::parse("usd").is_none());
        assert!(Currency::parse("DOLLARS").is_none());
    }
}
