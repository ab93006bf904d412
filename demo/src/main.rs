//! `tollgate-demo`: the demo upstream, the demo traffic generator and a webhook receiver for
//! the demo's SLO alerts.

use std::net::SocketAddr;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

use tollgate_demo::{traffic, upstream, webhook};

#[derive(Parser)]
#[command(version, about = "tollgate demo upstream and traffic generator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the echo upstream.
    Upstream {
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
    },
    /// Send the demo mix through the edge and print what the client saw.
    Traffic {
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        edge: String,
        /// Multiplies the mix (scale 1 = 117 requests).
        #[arg(long, default_value_t = 5)]
        scale: usize,
    },
    /// Receive SLO alert notifications (POSTed JSON) and append each as a line to a file.
    Webhook {
        #[arg(long, default_value = "127.0.0.1:8082")]
        listen: SocketAddr,
        #[arg(long)]
        out: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tollgate_common_log();
    match Cli::parse().command {
        Command::Upstream { listen } => {
            let listener = tokio::net::TcpListener::bind(listen).await?;
            tracing::info!(%listen, "demo upstream listening");
            upstream::serve(listener, Arc::new(upstream::EchoStats::default())).await;
        }
        Command::Traffic { edge, scale } => {
            let tally = traffic::run(&edge, traffic::demo_mix(scale)).await;
            println!("{:<10} {:>6} {:>6}", "caller", "status", "count");
            for ((label, status), n) in &tally.by_status {
                println!("{label:<10} {status:>6} {n:>6}");
            }
            println!("sent {} requests, {} without a response", tally.total(), tally.transport_errors);
        }
        Command::Webhook { listen, out } => {
            let listener = tokio::net::TcpListener::bind(listen).await?;
            tracing::info!(%listen, out = %out.display(), "demo webhook listening");
            webhook::serve(listener, out).await?;
        }
    }
    Ok(())
}

fn tollgate_common_log() {
    let _ = tracing_subscriber::fmt().with_writer(std::io::stderr).try_init();
}
