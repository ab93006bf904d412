//! `tollgate-edge`: the gateway binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tollgate_common::cli;
use tollgate_edge::Config;

const BIN: &str = "tollgate-edge";

// mimalloc: the request path allocates per call (headers, bodies, events); glibc malloc cost
// ~15 % of the edge's CPU under load (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(version, about = "tollgate edge: authenticating, rate-limiting, metering HTTP gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve until SIGTERM/SIGINT.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Write the bound addresses as JSON to this file once listening.
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Validate a config file and exit (0 when valid).
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the SHA-256 of an API key, as `consumers[].keys[].sha256` wants it.
    HashKey { key: String },
    /// Print the SHA-256 fingerprint of a client certificate (the first in a PEM file), as
    /// `consumers[].certificates[].sha256` wants it, with the config entry to add.
    CertFingerprint {
        /// PEM file holding the client's certificate.
        #[arg(long)]
        cert: PathBuf,
        /// Credential id recorded in events (e.g. `acme-cert-2026`).
        #[arg(long, default_value = "cert-1")]
        cert_id: String,
    },
    /// Generate a new API key: prints the key once, and the config entry (its hash) to add.
    GenKey {
        /// The consumer the key is for (only printed in the instructions).
        #[arg(long)]
        consumer: String,
        /// Credential id recorded in events (e.g. `acme-2026-11`).
        #[arg(long)]
        key_id: String,
        /// Environment tag in the key's prefix: `tg_<env>_…`.
        #[arg(long, default_value = "live", value_parser = ["live", "test"])]
        env: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        tollgate_common::logging::init();
    }
    let env = tollgate_common::config::process_env();
    match cli.command {
        Command::HashKey { key } => {
            println!("{}", tollgate_edge::auth::hash_key(&key));
            ExitCode::SUCCESS
        }
        Command::CertFingerprint { cert, cert_id } => {
            let certs = std::fs::read(&cert)
                .map_err(|e| format!("cannot read it: {e}"))
                .and_then(|pem| tollgate_edge::tls::read_pem_certs(&pem));
            match certs.as_deref() {
                Ok([first, ..]) => {
                    let hex = hex::encode(tollgate_edge::auth::fingerprint(first));
                    println!("{hex}");
                    println!("Add to the consumer's `certificates` in the edge config, then reload the edge:");
                    println!("  {{ id = \"{cert_id}\", sha256 = \"{hex}\" }}");
                    println!(
                        "(in a `consumers_file`: \"certificates\": [{{\"id\": \"{cert_id}\", \"sha256\": \"{hex}\"}}])"
                    );
                    println!(
                        "(the edge must trust its issuer: edge.tls_client_ca_file). To revoke it, remove that entry."
                    );
                    ExitCode::SUCCESS
                }
                Ok([]) => cli::refused(BIN, format!("{}: no PEM certificate in it", cert.display())),
                Err(e) => cli::refused(BIN, format!("{}: {e}", cert.display())),
            }
        }
        Command::GenKey { consumer, key_id, env } => {
            let key = tollgate_edge::auth::generate_key(&env);
            println!("API key for consumer `{consumer}` (shown once; give it to the consumer now):");
            println!("  {key}");
            println!("Add to that consumer's `keys` in the edge config, then reload the edge (SIGHUP or save):");
            let hash = tollgate_edge::auth::hash_key(&key);
            println!("  {{ id = \"{key_id}\", sha256 = \"{hash}\" }}");
            println!("(in a `consumers_file`, the same entry is {{\"id\": \"{key_id}\", \"sha256\": \"{hash}\"}})");
            println!("To revoke it later, remove that entry.");
            ExitCode::SUCCESS
        }
        Command::CheckConfig { config } => match Config::load(&config, &env) {
            Ok(c) => {
                println!("{}: ok ({} routes, {} consumers)", config.display(), c.routes.len(), c.consumers.len());
                ExitCode::SUCCESS
            }
            Err(e) => cli::refused(BIN, e),
        },
        Command::Run { config, ready_file } => {
            let cfg = match Config::load(&config, &env) {
                Ok(c) => c,
                Err(e) => return cli::refused(BIN, e),
            };
            // Admin, the producer task, reloads and JWKS refreshes: one thread is plenty (the
            // request path runs on `edge.worker_threads` threads of its own), and each thread
            // costs its own allocator heap.
            let rt = match cli::runtime(BIN, Some(1)) {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            // Logging starts once the config says whether spans are exported too.
            let telemetry = if cfg.telemetry.otlp_endpoint.is_some() {
                let tls = match tollgate_edge::tls::client_config(&cfg.tls_ca) {
                    Ok(t) => t,
                    Err(e) => return cli::refused(BIN, format!("config key `edge.tls_ca_file`: {e}")),
                };
                match tollgate_edge::telemetry::Telemetry::start(&cfg.telemetry, &tls, rt.handle().clone()) {
                    Ok((t, layer)) => {
                        tollgate_common::logging::init_with(Some(Box::new(layer)));
                        Some(t)
                    }
                    Err(e) => {
                        return cli::refused(
                            BIN,
                            format!("config key `telemetry.otlp_endpoint`: cannot start the exporter: {e:#}"),
                        );
                    }
                }
            } else {
                tollgate_common::logging::init();
                None
            };
            let opts = tollgate_edge::server::ServeOptions { ready_file, config_path: Some(config), env };
            let result = rt.block_on(tollgate_edge::serve(cfg, tollgate_common::shutdown::signal(), opts));
            if let Some(t) = telemetry {
                t.shutdown();
            }
            cli::exit(BIN, result)
        }
    }
}
