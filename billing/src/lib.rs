//! tollgate billing: monthly invoices per consumer from the usage the pipeline metered.
//!
//! - [`money`]: currencies, the rounding rule;
//! - [`pricing`]: plans (fee, included units, graduated or volume tiers, route weights,
//!   billable outcomes, minimum charge, SLA credits) → invoice lines;
//! - [`invoice`]: invoices, deterministic numbers, CSV / JSON / HTML exports.

pub mod close;
pub mod config;
pub mod draft;
pub mod invoice;
pub mod money;
pub mod period;
pub mod pricing;
pub mod usage;
