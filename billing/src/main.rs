//! `tollgate-billing`: monthly invoices per consumer.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tollgate_billing::config::Config;
use tollgate_billing::invoice;
use tollgate_billing::period::Period;

#[derive(Parser)]
#[command(version, about = "tollgate billing: monthly invoices per consumer from metered usage")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the invoices of a period (drafts while it is open) as CSV, JSON or HTML.
    Invoice {
        #[arg(long, short)]
        config: PathBuf,
        /// The billing period, YYYY-MM (calendar month, UTC).
        #[arg(long)]
        period: String,
        /// Only this consumer.
        #[arg(long)]
        consumer: Option<String>,
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
    },
    /// Create the database and apply pending ClickHouse migrations, then exit.
    Migrate {
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Csv,
    Json,
    Html,
}

fn main() -> ExitCode {
    tollgate_common::logging::init();
    let cli = Cli::parse();
    let config_path = match &cli.command {
        Command::Invoice { config, .. } | Command::Migrate { config } => config,
    };
    let cfg = match Config::load(config_path, &tollgate_common::config::process_env()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tollgate-billing: {e}");
            return ExitCode::from(2);
        }
    };
    let period = match &cli.command {
        Command::Invoice { period, .. } => match Period::parse(period) {
            Some(p) => Some(p),
            None => {
                eprintln!("tollgate-billing: --period: `{period}` is not a month like 2026-11");
                return ExitCode::from(2);
            }
        },
        Command::Migrate { .. } => None,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tollgate-billing: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        let client = tollgate_schemas::store::client(&cfg.clickhouse);
        match (&cli.command, period) {
            (Command::Invoice { consumer, format, .. }, Some(period)) => {
                let (invoices, unpriced) = tollgate_billing::draft::drafts(&cfg, &client, &period, consumer.as_deref()).await?;
                for (c, p) in unpriced {
                    eprintln!("tollgate-billing: consumer `{c}` is on plan `{p}`, which has no prices in the config: no invoice");
                }
                let out = match format {
                    Format::Csv => invoice::to_csv(&invoices),
                    Format::Json => invoice::to_json(&invoices),
                    Format::Html => invoice::to_html(&invoices),
                };
                print!("{out}");
                Ok(())
            }
            _ => tollgate_schemas::store::prepare(&cfg.clickhouse).await.map_err(anyhow::Error::from),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate-billing: {e:#}");
            ExitCode::FAILURE
        }
    }
}
