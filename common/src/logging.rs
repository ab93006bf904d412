//! `tracing` subscriber set-up shared by the binaries.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// A layer under the log output, e.g. OpenTelemetry export.
pub type ExtraLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// Installs a subscriber writing to stderr. `RUST_LOG` filters (default `info`);
/// `TOLLGATE_LOG_FORMAT=json` switches to JSON lines.
pub fn init() {
    init_with(None);
}

/// For command-line tools whose output is the point: like [`init`], `warn` by default.
pub fn init_cli() {
    install(None, "warn");
}

/// Like [`init`], with `extra` (which sees the spans and events `RUST_LOG` lets through).
pub fn init_with(extra: Option<ExtraLayer>) {
    install(extra, "info");
}

fn install(extra: Option<ExtraLayer>, default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let json = std::env::var("TOLLGATE_LOG_FORMAT").as_deref() == Ok("json");
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt: Box<dyn Layer<_> + Send + Sync> = if json { Box::new(fmt.json()) } else { Box::new(fmt) };
    // A subscriber already installed (tests) is fine.
    let _ = tracing_subscriber::registry().with(extra).with(fmt).with(filter).try_init();
}
