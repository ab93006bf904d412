//! `tollgate-demo`: the demo upstream and the demo traffic generator.

use std::net::SocketAddr;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tollgate_demo::{traffic, upstream};

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
        /// Multiplies the mix (scale 1 = 113 requests).
        #[arg(long, default_value_t = 5)]
        scale: usize,
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
    }
    Ok(())
}

fn tollgate_common_log() {
    let _ = tracing_subscriber::fmt().with_writer(std::io::stderr).try_init();
}
