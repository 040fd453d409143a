//! `hive-bench`: benchmarks that print their figures next to a floor (or a peer) measured in
//! the same run, and the ratio. One module per subcommand; this file only parses and
//! dispatches.

use clap::{Parser, Subcommand};

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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Store(args) => store::run(args).await?,
    }
    Ok(())
}
