//! `tollgate-ingest`: Kafka `api-calls` → ClickHouse `api_calls`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tollgate_common::cli;
use tollgate_ingest::Config;

const BIN: &str = "tollgate-ingest";

#[derive(Parser)]
#[command(version, about = "tollgate ingest: writes raw API-call events from Kafka to ClickHouse")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume and ingest until SIGTERM/SIGINT.
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
}

fn main() -> std::process::ExitCode {
    tollgate_common::logging::init();
    let cli = Cli::parse();
    let config_path = match &cli.command {
        Command::Run { config } | Command::Migrate { config } | Command::CheckConfig { config } => config,
    };
    let cfg = match Config::load(config_path, &tollgate_common::config::process_env()) {
        Ok(c) => c,
        Err(e) => return cli::refused(BIN, e),
    };
    if matches!(cli.command, Command::CheckConfig { .. }) {
        println!("{}: ok", config_path.display());
        return std::process::ExitCode::SUCCESS;
    }
    let rt = match cli::runtime(BIN, None) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Run { .. } => {
                let metrics = std::sync::Arc::new(tollgate_ingest::metrics::Metrics::default());
                if let Some(addr) = cfg.admin_listen {
                    let listener = tollgate_common::admin::listen(addr).await.map_err(anyhow::Error::msg)?;
                    tokio::spawn(tollgate_common::admin::serve(listener, std::sync::Arc::clone(&metrics)));
                }
                tollgate_ingest::run(cfg, metrics, tollgate_common::shutdown::signal()).await
            }
            Command::Migrate { .. } | Command::CheckConfig { .. } => {
                tollgate_ingest::sink::prepare(&cfg.clickhouse).await.map_err(anyhow::Error::from)
            }
        }
    });
    // A Kafka client that cannot close (a broker gone mid-rebalance) must not hold the exit.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    cli::exit(BIN, result)
}
