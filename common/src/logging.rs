//! `tracing` subscriber set-up shared by the binaries.

use tracing_subscriber::EnvFilter;

/// Installs a subscriber writing to stderr. `RUST_LOG` filters (default `info`);
/// `TOLLGATE_LOG_FORMAT=json` switches to JSON lines.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = if std::env::var("TOLLGATE_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    // A subscriber already installed (tests) is fine.
    drop(result);
}
