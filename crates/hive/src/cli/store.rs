//! `hive store migrate`: a stopped server's embedded store into etcd.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use super::up::EtcdArgs;

#[derive(Debug, Subcommand)]
pub enum StoreCmd {
    /// Copy every key of a stopped server's embedded store into an empty etcd. Values are kept
    /// byte for byte and checked after the copy; revisions renumber (etcd's own), so watchers
    /// relist. Then start the servers with `--store` and the same etcd.
    Migrate(MigrateArgs),
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Data dir of the server whose embedded store to copy (stop that server first).
    #[arg(long)]
    pub from: PathBuf,
    /// The etcd to copy into: etcd://HOST:PORT[,HOST:PORT…] or etcds://….
    #[arg(long)]
    pub to: String,
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

pub async fn run(cmd: StoreCmd) -> Result<()> {
    match cmd {
        StoreCmd::Migrate(args) => {
            let to = args.etcd.backend(&args.to)?;
            let report = hive_server::migrate_store(&args.from, &to).await?;
            println!(
                "copied {} keys ({} bytes) from {} (revision {}) to {} (now at revision {}); \
                 revisions renumber, so watchers relist",
                report.keys,
                report.bytes,
                args.from.display(),
                report.source_revision,
                args.to,
                report.destination_revision
            );
            Ok(())
        }
    }
}
