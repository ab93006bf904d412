//! `tollgate-billing`: monthly invoices per consumer.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tollgate_billing::config::Config;
use tollgate_billing::period::Period;
use tollgate_billing::{close, invoice};
use tollgate_common::cli;

const BIN: &str = "tollgate-billing";

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
    /// Finalize a period's invoices (once its end plus billing.grace_hours has passed). Safe to
    /// run again, or twice at once: one invoice per consumer, never changed afterwards.
    Close {
        #[arg(long, short)]
        config: PathBuf,
        /// The billing period, YYYY-MM.
        #[arg(long)]
        period: String,
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

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Csv,
    Json,
    Html,
}

fn main() -> ExitCode {
    tollgate_common::logging::init_cli();
    let cli = Cli::parse();
    let config_path = match &cli.command {
        Command::Invoice { config, .. }
        | Command::Close { config, .. }
        | Command::Migrate { config }
        | Command::CheckConfig { config } => config,
    };
    let cfg = match Config::load(config_path, &tollgate_common::config::process_env()) {
        Ok(c) => c,
        Err(e) => return cli::refused(BIN, e),
    };
    if matches!(cli.command, Command::CheckConfig { .. }) {
        println!("{}: ok", config_path.display());
        return ExitCode::SUCCESS;
    }
    let period = match &cli.command {
        Command::Invoice { period, .. } | Command::Close { period, .. } => match Period::parse(period) {
            Some(p) => Some(p),
            None => return cli::refused(BIN, format!("--period: `{period}` is not a month like 2026-11")),
        },
        Command::Migrate { .. } | Command::CheckConfig { .. } => None,
    };
    let rt = match cli::runtime(BIN, None) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result = rt.block_on(async {
        if cfg.clickhouse.migrate_on_start || matches!(cli.command, Command::Migrate { .. }) {
            tollgate_schemas::store::prepare(&cfg.clickhouse).await?;
        }
        let client = tollgate_schemas::store::client(&cfg.clickhouse);
        match (&cli.command, period) {
            (Command::Invoice { consumer, format, .. }, Some(period)) => {
                // A closed period: the stored renderings, byte for byte. Else: drafts.
                let finals = close::stored(&client, &period.label, consumer.as_deref()).await?;
                let parts: Vec<invoice::Parts> = if finals.is_empty() {
                    let (invoices, unpriced) = tollgate_billing::draft::drafts(&cfg, &client, &period, consumer.as_deref()).await?;
                    for (c, p) in unpriced {
                        if p.is_empty() {
                            eprintln!("tollgate-billing: consumer `{c}`: its calls carry no plan (recorded before events had plan_id): no invoice");
                        } else {
                            eprintln!("tollgate-billing: consumer `{c}` is on plan `{p}`, which has no prices in the config: no invoice");
                        }
                    }
                    invoices.iter().map(invoice::Parts::of).collect()
                } else {
                    finals.iter().map(close::StoredInvoice::parts).collect()
                };
                let out = match format {
                    Format::Csv => invoice::csv_export(&parts),
                    Format::Json => invoice::json_export(&parts),
                    Format::Html => invoice::html_export(&parts),
                };
                print!("{out}");
                Ok(())
            }
            (Command::Close { .. }, Some(period)) => {
                let now_us = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_micros() as u64;
                let (written, finals) = close::close(&cfg, &client, &period, now_us).await?;
                println!("period {}: {} invoices final ({written} written by this close)", period.label, finals.len());
                for f in finals {
                    println!("{}\t{}\t{}\t{} {}", f.invoice_number, f.consumer_id, f.plan_id, f.total, f.currency);
                }
                Ok(())
            }
            _ => Ok::<(), anyhow::Error>(()),
        }
    });
    cli::exit(BIN, result)
}
