//! tollgate benchmarks. Each prints its figures, medians of several runs, and ratios against a
//! baseline measured in the same run. Nothing here is a test: run them on a quiet machine.
//!
//! `tollgate-bench ingest`     ingest throughput into ClickHouse (Tansu on memory storage);
//!                             baselines: Kafka consume-only and decode+insert-only rates.
//! `tollgate-bench gateway`    requests/s and latency with wrk: direct, nginx, the edge
//!                             with metering off and on; edge RSS with 100,000 consumers.
//! `tollgate-bench freshness`  time from the edge's response to the row being queryable,
//!                             at a fixed request rate through the real edge.
//! `tollgate-bench encode`     ns per event of the edge's Avro writer vs apache-avro's.
//! `tollgate-bench aggregate`  aggregator replay throughput from a full topic; baselines:
//!                             read+decode-only and recompute-only rates.
//! `tollgate-bench billing`    close and export a month of invoices for 10,000 consumers.
//! `tollgate-bench lag`        usage and quota lag after a minute's lateness window, at a
//!                             fixed request rate through edge, ingest and aggregator.
//! `tollgate-bench slo`        one SLO evaluation over 3 days of usage for N consumers;
//!                             baseline: reading the 3-day window.
//! `tollgate-bench queue`      ns per place handed down the edge's queue of N waiting calls;
//!                             baselines: tokio's Semaphore, waking every waiter.
//!
//! Both need `scripts/stack.sh up` (ClickHouse) and release binaries (`cargo build --release`);
//! `bench/run.sh` does all of it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod aggregate;
mod billing;
mod common;
mod encode;
mod freshness;
mod gateway;
mod hyper_proxy;
mod ingest;
mod lag;
mod queue;
mod slo;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "tollgate benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// ClickHouse HTTP URL.
    #[arg(long, global = true, default_value = "http://127.0.0.1:8123")]
    clickhouse: String,
}

#[derive(Subcommand)]
enum Command {
    /// Ingest throughput, events/s.
    Ingest {
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Gateway throughput and latency with wrk: direct, nginx, edge (metering off/on); RSS.
    Gateway {
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long, default_value_t = 32)]
        connections: u32,
    },
    /// The gateway benchmark's framework baseline: a bare hyper reverse proxy (run by `gateway`).
    #[command(hide = true)]
    HyperProxy {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        upstream: std::net::SocketAddr,
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Event encoding, ns/event: direct Avro writer vs apache-avro's Value writer.
    Encode {
        #[arg(long, default_value_t = 200_000)]
        events: usize,
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Aggregator replay throughput, events/s.
    Aggregate {
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Billing: close and export one month for many consumers.
    Billing {
        #[arg(long, default_value_t = 10_000)]
        consumers: u64,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// SLO evaluation time over three days of usage.
    Slo {
        #[arg(long, default_value_t = 1_000)]
        consumers: u64,
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// The edge's queue for places: ns per place handed down a line of waiting calls.
    Queue {
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Usage and quota lag after each minute's lateness window.
    Lag {
        #[arg(long, default_value_t = 2_000)]
        rate: u64,
        #[arg(long, default_value_t = 3)]
        minutes: i64,
        #[arg(long, default_value_t = 10)]
        lateness: u32,
    },
    /// Freshness: edge response → row queryable in ClickHouse.
    Freshness {
        #[arg(long, default_value_t = 2_000)]
        rate: u64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Ingest { events, runs } => ingest::run(&cli.clickhouse, events, runs).await,
        Command::Gateway { seconds, runs, connections } => gateway::run(seconds, runs, connections).await,
        Command::HyperProxy { listen, upstream, threads } => hyper_proxy::run(listen, upstream, threads),
        Command::Encode { events, runs } => encode::run(events, runs),
        Command::Aggregate { events, runs } => aggregate::run(&cli.clickhouse, events, runs).await,
        Command::Billing { consumers, runs } => billing::run(&cli.clickhouse, consumers, runs).await,
        Command::Queue { runs } => queue::run(runs).await,
        Command::Slo { consumers, runs } => slo::run(&cli.clickhouse, consumers, runs).await,
        Command::Lag { rate, minutes, lateness } => lag::run(&cli.clickhouse, rate, minutes, lateness).await,
        Command::Freshness { rate, seconds, runs } => freshness::run(&cli.clickhouse, rate, seconds, runs).await,
    }
}
