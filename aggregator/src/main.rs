//! `tollgate-aggregator`: per-minute usage and latency percentiles from `api-calls`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use tollgate_aggregator::Config;
use tollgate_aggregator::store::{self, Usage, UsageFilter};
use tollgate_common::{cli, time};

const BIN: &str = "tollgate-aggregator";

#[derive(Parser)]
#[command(version, about = "tollgate aggregator: per-minute usage and latency percentiles from api-calls")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume api-calls and write usage_minute until SIGTERM/SIGINT.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Create the database and apply pending ClickHouse migrations, then exit.
    Migrate {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and exit (0 when valid, 2 with the error naming the key).
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print calls, errors and P50/P95/P99 latency per consumer over a window, from the
    /// merged per-minute histograms.
    Usage {
        #[arg(long, short)]
        config: PathBuf,
        /// Only this consumer (default: every consumer).
        #[arg(long)]
        consumer: Option<String>,
        /// Only this route id.
        #[arg(long)]
        route: Option<String>,
        /// Start, inclusive (UTC: 2026-11-01, 2026-11-01T10:00[:00][Z], or Unix seconds).
        /// Default: the start of the current month.
        #[arg(long)]
        from: Option<String>,
        /// End, exclusive (same forms). Default: now.
        #[arg(long)]
        to: Option<String>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Usage { .. } => tollgate_common::logging::init_cli(),
        _ => tollgate_common::logging::init(),
    }
    let config_path = match &cli.command {
        Command::Run { config }
        | Command::Migrate { config }
        | Command::CheckConfig { config }
        | Command::Usage { config, .. } => config,
    };
    let cfg = match Config::load(config_path, &tollgate_common::config::process_env()) {
        Ok(c) => c,
        Err(e) => return cli::refused(BIN, e),
    };
    if matches!(cli.command, Command::CheckConfig { .. }) {
        println!("{}: ok ({} SLO objectives)", config_path.display(), cfg.slo.objectives.len());
        return ExitCode::SUCCESS;
    }
    let filter = match &cli.command {
        Command::Usage { consumer, route, from, to, .. } => match window(from.as_deref(), to.as_deref()) {
            Ok((from, to)) => Some(UsageFilter { consumer: consumer.clone(), route: route.clone(), from, to }),
            Err(e) => return cli::refused(BIN, e),
        },
        _ => None,
    };
    let rt = match cli::runtime(BIN, None) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Run { .. } => run(cfg).await,
            Command::Migrate { .. } | Command::CheckConfig { .. } => {
                tollgate_schemas::store::prepare(&cfg.clickhouse).await.map_err(anyhow::Error::from)
            }
            Command::Usage { format, .. } => {
                let Some(filter) = filter else { return Ok(()) };
                let client = tollgate_schemas::store::client(&cfg.clickhouse);
                let rows = store::usage(&client, &filter).await?;
                print!("{}", render(&rows, &filter, format));
                Ok(())
            }
        }
    });
    // A Kafka client that cannot close (a broker gone mid-rebalance) must not hold the exit.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    cli::exit(BIN, result)
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    let metrics = Arc::new(tollgate_aggregator::metrics::Metrics::default());
    if let Some(addr) = cfg.admin_listen {
        let listener = tollgate_common::admin::listen(addr).await.map_err(anyhow::Error::msg)?;
        tokio::spawn(tollgate_common::admin::serve(listener, Arc::clone(&metrics)));
    }
    tollgate_aggregator::pipeline::run(cfg, metrics, tollgate_common::shutdown::signal()).await
}

fn window(from: Option<&str>, to: Option<&str>) -> anyhow::Result<(i64, i64)> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
    let from = match from {
        Some(s) => time::parse_utc(s).map_err(|e| anyhow::anyhow!("--from: {e}"))?,
        None => time::month_start(now),
    };
    let to = match to {
        Some(s) => time::parse_utc(s).map_err(|e| anyhow::anyhow!("--to: {e}"))?,
        None => now + 1,
    };
    if to <= from {
        anyhow::bail!("--to ({}) must be after --from ({})", time::format_utc(to), time::format_utc(from));
    }
    Ok((from, to))
}

fn ms(us: Option<u64>) -> String {
    us.map_or_else(|| "-".to_owned(), |v| format!("{:.2}", v as f64 / 1000.0))
}

fn render(rows: &[Usage], f: &UsageFilter, format: Format) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    match format {
        Format::Json => {
            let _ = write!(out, "[");
            for (i, r) in rows.iter().enumerate() {
                let opt = |v: Option<u64>| v.map_or_else(|| "null".to_owned(), |v| v.to_string());
                let _ = write!(
                    out,
                    "{}{{\"consumer\":{:?},\"from\":\"{}\",\"to\":\"{}\",\"requests\":{},\"errors_4xx\":{},\"errors_5xx\":{},\
                     \"request_bytes\":{},\"response_bytes\":{},\"p50_us\":{},\"p95_us\":{},\"p99_us\":{}}}",
                    if i == 0 { "" } else { "," },
                    r.consumer_id,
                    time::format_utc(f.from),
                    time::format_utc(f.to),
                    r.requests,
                    r.errors_4xx,
                    r.errors_5xx,
                    r.request_bytes,
                    r.response_bytes,
                    opt(r.p50_us),
                    opt(r.p95_us),
                    opt(r.p99_us)
                );
            }
            let _ = writeln!(out, "]");
        }
        Format::Table => {
            let _ = writeln!(out, "usage from {} to {}", time::format_utc(f.from), time::format_utc(f.to));
            let _ = writeln!(
                out,
                "{:<24} {:>10} {:>8} {:>8} {:>9} {:>9} {:>9}",
                "consumer", "requests", "4xx", "5xx", "p50_ms", "p95_ms", "p99_ms"
            );
            for r in rows {
                let name = if r.consumer_id.is_empty() { "(unauthenticated)" } else { &r.consumer_id };
                let _ = writeln!(
                    out,
                    "{:<24} {:>10} {:>8} {:>8} {:>9} {:>9} {:>9}",
                    name,
                    r.requests,
                    r.errors_4xx,
                    r.errors_5xx,
                    ms(r.p50_us),
                    ms(r.p95_us),
                    ms(r.p99_us)
                );
            }
            if rows.is_empty() {
                let _ = writeln!(out, "(no usage in this window)");
            }
        }
    }
    out
}
