//! `hive-bench api`: the API server over real HTTP on loopback, with the embedded store.
//!
//! Creates/s and gets/s with 64 concurrent clients, and watch delivery latency (write
//! acknowledged → event read by a watcher) with 1,000 watchers. The floor printed beside the
//! HTTP figures is the same operation straight on the store in the same run (what the HTTP,
//! JSON, auth and tenancy layers cost).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use hive_api::{ContainerSpec, Service, ServiceSpec, Tenant, WatchEventType};
use hive_client::Client;
use hive_server::{RateLimit, ServerConfig};
use hive_store::{Op, Store};
use tokio::sync::Mutex;

#[derive(Debug, clap::Args)]
pub struct ApiArgs {
    /// Concurrent clients for creates and gets.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Seconds per throughput phase.
    #[arg(long, default_value_t = 5)]
    pub duration_secs: u64,
    /// Watch streams open at once.
    #[arg(long, default_value_t = 1000)]
    pub watchers: usize,
    /// Writes whose delivery to every watcher is timed.
    #[arg(long, default_value_t = 50)]
    pub watch_writes: usize,
}

fn service(name: String) -> Service {
    Service {
        name,
        spec: ServiceSpec {
            replicas: 2,
            template: ContainerSpec {
                image: "busybox".into(),
                args: vec!["sleep".into(), "1000".into()],
                ..Default::default()
            },
            ..Default::default()
        },
        ..Default::default()
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

/// Runs `op(i)` from `clients` tasks for `secs` seconds; returns completed operations per second.
pub(crate) async fn throughput<F, Fut>(clients: usize, secs: u64, op: F) -> Result<f64>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let op = op.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                op(next.fetch_add(1, Ordering::Relaxed)).await?;
                n += 1;
            }
            anyhow::Ok(n)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// An API server on 127.0.0.1 with no rate limit, on a 2-thread runtime of its own (so
/// client and server work show apart), its data in `data_dir`.
pub(crate) fn launch_unlimited(
    data_dir: &std::path::Path,
) -> Result<(tokio::runtime::Runtime, hive_server::Launched)> {
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let config = ServerConfig {
        data_dir: data_dir.to_owned(),
        rate_limit: RateLimit {
            per_sec: 0.0,
            burst: 0.0,
        },
        ..Default::default()
    };
    let server = server_rt.block_on(hive_server::launch(
        config,
        "127.0.0.1:0".parse()?,
        std::future::pending(),
    ))?;
    Ok((server_rt, server))
}

pub fn run(args: ApiArgs) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("hive-bench-api-")
        .tempdir()?;
    // The server gets its own runtime so client and server work are both visible as such.
    let (server_rt, server) = crate::api::launch_unlimited(dir.path())?;
    let (url, admin, store) = (
        server.url.clone(),
        server.admin_token.clone(),
        server.store.clone(),
    );
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = client_rt.block_on(measure(&args, &url, &admin, store.clone()));
    drop(client_rt);
    drop(server_rt);
    result
}

async fn measure(args: &ApiArgs, url: &str, admin: &str, store: Arc<dyn Store>) -> Result<()> {
    let client = Client::new(url, Some(admin.to_owned()))?;
    client
        .create(
            None,
            &Tenant {
                name: "bench".into(),
                ..Default::default()
            },
        )
        .await?;
    println!(
        "hive-bench api: {} clients, {} s per phase, {} watchers; load {}",
        args.clients,
        args.duration_secs,
        args.watchers,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );

    let c = client.clone();
    let creates = throughput(args.clients, args.duration_secs, move |i| {
        let c = c.clone();
        async move {
            c.create(Some("bench"), &service(format!("s{i}"))).await?;
            Ok(())
        }
    })
    .await
    .context("creates")?;
    let created = client
        .list_page::<Service>(Some("bench"), Some(1000), None)
        .await?
        .items
        .len();
    let c = client.clone();
    let gets = throughput(args.clients, args.duration_secs, move |i| {
        let c = c.clone();
        async move {
            c.get::<Service>(Some("bench"), &format!("s{}", i % created.max(1)))
                .await?;
            Ok(())
        }
    })
    .await
    .context("gets")?;

    // Floors: the same writes and reads straight on the store, same concurrency.
    let body = bytes::Bytes::from(serde_json::to_vec(&service("floor".into()))?);
    let s = store.clone();
    let store_creates = throughput(args.clients, args.duration_secs, move |i| {
        let s = s.clone();
        let body = body.clone();
        async move {
            s.txn(vec![Op::Create {
                key: format!("/floor/{i}"),
                value: body,
            }])
            .await?;
            Ok(())
        }
    })
    .await?;
    let s = store.clone();
    let store_gets = throughput(args.clients, args.duration_secs, move |i| {
        let s = s.clone();
        async move {
            s.get(&format!("/t/bench/services/s{}", i % created.max(1)))
                .await?;
            Ok(())
        }
    })
    .await?;

    // Watch latency: N watchers on the collection; each write's acknowledgement time is
    // recorded, each watcher records when it read the event of that revision.
    let list = client
        .list_page::<Service>(Some("bench"), Some(1), None)
        .await?;
    let from = list.revision;
    let received: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::new(Mutex::new(Vec::new()));
    let ready = Arc::new(AtomicUsize::new(0));
    let mut watchers = Vec::new();
    for _ in 0..args.watchers {
        let c = client.clone();
        let received = received.clone();
        let ready = ready.clone();
        let want = args.watch_writes;
        watchers.push(tokio::spawn(async move {
            let mut stream = c.watch::<Service>(Some("bench"), Some(from)).await?;
            ready.fetch_add(1, Ordering::SeqCst);
            let mut local = Vec::with_capacity(want);
            while local.len() < want {
                match tokio::time::timeout(Duration::from_secs(60), stream.next()).await {
                    Ok(Some(Ok(ev))) if ev.type_ == WatchEventType::Modified => {
                        local.push((ev.revision, Instant::now()))
                    }
                    Ok(Some(Ok(_))) => {}
                    Ok(Some(Err(e))) => return Err(e.into()),
                    Ok(None) | Err(_) => {
                        anyhow::bail!("watch ended after {} of {want} events", local.len())
                    }
                }
            }
            received.lock().await.extend(local);
            anyhow::Ok(())
        }));
    }
    let t0 = Instant::now();
    while ready.load(Ordering::SeqCst) < args.watchers {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(60),
            "watchers did not all connect in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut sent = std::collections::HashMap::new();
    let mut svc = client.get::<Service>(Some("bench"), "s0").await?;
    for i in 0..args.watch_writes {
        svc.spec.replicas = (i % 50) as u32 + 1;
        svc.revision = 0;
        let start = Instant::now();
        let out = client.update(Some("bench"), &svc).await?;
        sent.insert(out.revision, start);
        // Spaced writes: latency, not a burst's queueing, is what is measured.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for w in watchers {
        w.await??;
    }
    let received = received.lock().await;
    let mut lat: Vec<f64> = received
        .iter()
        .filter_map(|(rev, at)| {
            sent.get(rev)
                .map(|s| at.duration_since(*s).as_secs_f64() * 1000.0)
        })
        .collect();
    anyhow::ensure!(
        lat.len() == args.watchers * args.watch_writes,
        "missing deliveries: {} of {}",
        lat.len(),
        args.watchers * args.watch_writes
    );
    lat.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&lat, 0.50), percentile(&lat, 0.99));

    println!();
    println!(
        "{:<44} {:>12} {:>14}",
        "operation", "hive API/s", "store floor/s"
    );
    println!(
        "{:<44} {:>12.0} {:>14.0}",
        format!("create service ({} clients)", args.clients),
        creates,
        store_creates
    );
    println!(
        "{:<44} {:>12.0} {:>14.0}",
        format!("get service ({} clients)", args.clients),
        gets,
        store_gets
    );
    println!(
        "watch delivery, {} watchers x {} writes: p50 {p50:.1} ms, p99 {p99:.1} ms (goal p99 <= 50 ms)",
        args.watchers, args.watch_writes
    );
    println!(
        "creates_per_s={creates:.0} gets_per_s={gets:.0} store_creates_per_s={store_creates:.0} store_gets_per_s={store_gets:.0} watch_p50_ms={p50:.1} watch_p99_ms={p99:.1} watchers={}",
        args.watchers
    );
    Ok(())
}
