//! `hive-bench store`: durable writes per second through [`RedbStore`] with 1 and with many
//! concurrent writers, against the floor of plain redb committing (and fsyncing) once per
//! write, all in one run on the same disk.
//!
//! Each write is what the API server does to create an object: a txn of one `Create` of a
//! ~200-byte value under a fresh key, acknowledged only once durable. The last line printed
//! is machine-readable `key=value` pairs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use hive_store::{Op, RedbStore, RedbStoreOptions, Store, StoreError};
use redb::{Durability, TableDefinition};

#[derive(Debug, Args)]
pub struct StoreArgs {
    /// Directory to create the benchmark's files in (inside a fresh temporary directory that
    /// is removed afterwards); defaults to /tmp.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Seconds each case runs.
    #[arg(long, default_value_t = 5)]
    duration_secs: u64,
    /// Numbers of concurrent writer tasks to measure; `writes_per_s` reports the largest,
    /// `writes_1_per_s` the smallest.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    writers_list: Vec<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreBenchError {
    #[error("invalid arguments: {0}")]
    Args(String),
    #[error("create temporary directory in {dir}: {source}")]
    TempDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("store case with {writers} writers: {source}")]
    Store { writers: usize, source: StoreError },
    #[error("redb floor: {0}")]
    Floor(String),
    #[error("benchmark task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// One measured case.
struct Measured {
    name: &'static str,
    writers: usize,
    writes: u64,
    elapsed: Duration,
    /// Per-write latencies, sorted.
    latencies: Vec<Duration>,
}

impl Measured {
    fn per_second(&self) -> f64 {
        self.writes as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        let index = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        self.latencies[index].as_secs_f64() * 1000.0
    }
}

/// A value the size and shape of a small API object.
fn object_value(key: &str) -> Bytes {
    let mut text = format!(
        r#"{{"kind":"Instance","metadata":{{"name":"{key}","tenant":"bench"}},"spec":{{"image":"registry.local/app:1","cpu":"250m","memory":"128Mi"}},"pad":""#
    );
    while text.len() < 198 {
        text.push('x');
    }
    text.push_str("\"}");
    Bytes::from(text)
}

pub async fn run(args: StoreArgs) -> Result<(), StoreBenchError> {
    let (Some(&fewest), Some(&most)) = (
        args.writers_list.iter().min(),
        args.writers_list.iter().max(),
    ) else {
        return Err(StoreBenchError::Args("--writers-list is empty".into()));
    };
    if fewest == 0 {
        return Err(StoreBenchError::Args(
            "a writer count must be at least 1".into(),
        ));
    }
    if args.duration_secs == 0 {
        return Err(StoreBenchError::Args(
            "--duration-secs must be at least 1".into(),
        ));
    }
    let parent = args.dir.clone().unwrap_or_else(|| PathBuf::from("/tmp"));
    let dir = tempfile::Builder::new()
        .prefix("hive-bench-store-")
        .tempdir_in(&parent)
        .map_err(|source| StoreBenchError::TempDir {
            dir: parent.clone(),
            source,
        })?;
    let duration = Duration::from_secs(args.duration_secs);
    println!(
        "store benchmark: durable writes (txn of one Create, {}-byte value), {}s per case, in {}",
        object_value("/k").len(),
        args.duration_secs,
        dir.path().display()
    );

    let mut results = Vec::new();
    for &writers in &args.writers_list {
        let path = dir.path().join(format!("store-{writers}.redb"));
        results.push(
            store_case(path, writers, duration)
                .await
                .map_err(|source| StoreBenchError::Store { writers, source })?,
        );
    }
    let floor_path = dir.path().join("floor.redb");
    let floor = tokio::task::spawn_blocking(move || floor_case(floor_path, duration))
        .await?
        .map_err(StoreBenchError::Floor)?;

    println!();
    println!(
        "{:<34} {:>7} {:>9} {:>8} {:>10} {:>8} {:>8}",
        "case", "writers", "writes", "seconds", "writes/s", "p50 ms", "p99 ms"
    );
    for m in results.iter().chain(std::iter::once(&floor)) {
        println!(
            "{:<34} {:>7} {:>9} {:>8.2} {:>10.0} {:>8.2} {:>8.2}",
            m.name,
            m.writers,
            m.writes,
            m.elapsed.as_secs_f64(),
            m.per_second(),
            m.percentile_ms(0.5),
            m.percentile_ms(0.99)
        );
    }
    let figure = |writers: usize| {
        results
            .iter()
            .find(|m| m.writers == writers)
            .map_or(0.0, Measured::per_second)
    };
    let (writes, writes_1, floor_per_s) = (figure(most), figure(fewest), floor.per_second());
    let ratio = if floor_per_s > 0.0 {
        writes / floor_per_s
    } else {
        0.0
    };
    println!();
    println!(
        "writes_per_s={writes:.0} writes_1_per_s={writes_1:.0} floor_per_s={floor_per_s:.0} ratio={ratio:.1}"
    );
    // `dir` is removed here, with everything the cases wrote.
    Ok(())
}

async fn store_case(
    path: PathBuf,
    writers: usize,
    duration: Duration,
) -> Result<Measured, StoreError> {
    let store = Arc::new(RedbStore::open(&path, RedbStoreOptions::default())?);
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::with_capacity(writers);
    for writer in 0..writers {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = 0u64;
            while Instant::now() < deadline {
                let key = format!("/bench/instances/w{writer}/{n:08}");
                let value = object_value(&key);
                let sent = Instant::now();
                store.txn(vec![Op::Create { key, value }]).await?;
                latencies.push(sent.elapsed());
                n += 1;
            }
            Ok::<_, StoreError>(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        let task_latencies = task
            .await
            .map_err(|e| StoreError::Backend(format!("writer task failed: {e}")))??;
        latencies.extend(task_latencies);
    }
    let elapsed = start.elapsed();
    latencies.sort_unstable();
    Ok(Measured {
        name: "RedbStore (group commit)",
        writers,
        writes: latencies.len() as u64,
        elapsed,
        latencies,
    })
}

/// Plain redb, one durable write transaction per write: what a store without group commit
/// could at best do on this disk.
fn floor_case(path: PathBuf, duration: Duration) -> Result<Measured, String> {
    const TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
    let db =
        redb::Database::create(&path).map_err(|e| format!("create {}: {e}", path.display()))?;
    let start = Instant::now();
    let deadline = start + duration;
    let mut latencies = Vec::new();
    let mut n = 0u64;
    while Instant::now() < deadline {
        let key = format!("/bench/instances/floor/{n:08}");
        let value = object_value(&key);
        let sent = Instant::now();
        let mut wtxn = db.begin_write().map_err(|e| format!("begin write: {e}"))?;
        wtxn.set_durability(Durability::Immediate)
            .map_err(|e| format!("durability: {e}"))?;
        {
            let mut table = wtxn
                .open_table(TABLE)
                .map_err(|e| format!("open table: {e}"))?;
            table
                .insert(key.as_str(), value.as_ref())
                .map_err(|e| format!("insert {key}: {e}"))?;
        }
        wtxn.commit().map_err(|e| format!("commit {key}: {e}"))?;
        latencies.push(sent.elapsed());
        n += 1;
    }
    let elapsed = start.elapsed();
    latencies.sort_unstable();
    Ok(Measured {
        name: "redb floor (1 commit per write)",
        writers: 1,
        writes: n,
        elapsed,
        latencies,
    })
}
