//! `hive-bench`: benchmarks that print their figures next to a floor (or a peer) measured in
//! the same run, and the ratio. One module per subcommand; this file only parses and
//! dispatches.

use clap::{Parser, Subcommand};

mod api;
mod ha;
mod images;
mod net;
mod registry;
mod restart;
mod runtime;
mod scheduler;
mod start;
mod store;

#[derive(Debug, Parser)]
#[command(
    name = "hive-bench",
    version,
    about = "Benchmarks of Hive's components"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Durable writes per second through the embedded store, against plain redb.
    Store(store::StoreArgs),
    /// API creates/s, gets/s and watch latency over HTTP, against the store itself.
    Api(api::ApiArgs),
    /// Container start latency of the runtime layer: bare runc and crun against the agent's
    /// supervised path with each.
    Runtime(runtime::RuntimeArgs),
    /// Push, pull and manifest reads through skopeo and hey, against distribution 2.8.
    Registry(registry::RegistryArgs),
    /// Container start through Hive (warm, cold, density), against the bare runtimes and
    /// podman.
    Start(start::StartArgs),
    /// Restart of `hive up` with containers running: time until the agent's instance cache
    /// is complete again (resumed from its saved revision).
    Restart(restart::RestartArgs),
    /// Tenant networks: overlay TCP throughput against the underlay, per-instance setup
    /// time, rule update time with 1,000 instances on a node.
    Net(net::NetArgs),
    /// Placements/s and submission-to-binding latency of the scheduler's code on the real
    /// store (5,000 simulated nodes, 100,000 instances), against one global FIFO served by
    /// one worker; fairness under a 50,000-instance burst; a smaller run over HTTP.
    Scheduler(scheduler::SchedulerArgs),
    /// Several API servers on a 3-member etcd: reads through the watch cache against reads
    /// straight from etcd, writes through three servers beside etcd's own, leader failover.
    Ha(ha::HaArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Store(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(store::run(args))
            .map_err(Into::into),
        // Runs its own runtimes: one for the server, one for the clients.
        Command::Api(args) => api::run(args),
        Command::Runtime(args) => runtime::run(args),
        Command::Registry(args) => registry::run(args),
        Command::Start(args) => start::run(args),
        Command::Restart(args) => restart::run(args),
        Command::Net(args) => net::run(args),
        Command::Scheduler(args) => scheduler::run(args),
        Command::Ha(args) => ha::run(args),
    }
}
