//! `hive-bench ha`: the control plane on a 3-member etcd on loopback (Debian's `etcd`), with
//! real `hive server` processes.
//!
//! - **Reads:** gets/s and lists/s over HTTP (load from `wrk`) from a server reading through
//!   its watch cache, against a server started with `--no-watch-cache` (every read straight
//!   from etcd), same objects and concurrency; and the same two reads at the store level (`WatchCache` against
//!   `EtcdStore`, no HTTP), what the cache itself saves.
//! - **Writes:** creates/s through three servers at once, beside etcd's own figure in the same
//!   run: transactions of one `Create` of the same value straight through the etcd client, same
//!   concurrency (Debian ships no etcd `benchmark` tool; this is the floor Hive's writes sit on).
//! - **Failover:** three servers electing a leader, a simulated node whose lease the
//!   benchmark renews; the leading server is killed (SIGKILL) and a service created at once;
//!   the time until the new leader's scheduler has placed its instance.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::{StreamExt, TryStreamExt};
use hive_api::{
    ContainerSpec, Instance, Node, NodeCapacity, NodeStatus, Service, ServiceSpec, Tenant,
};
use hive_client::Client;
use hive_store::{EtcdStore, EtcdStoreOptions, Op, Store, WatchCache, WatchCacheOptions};

use crate::api::throughput;
use crate::runtime::hive_binary;
use crate::start::{HiveUp, spawn_api};

#[derive(Debug, clap::Args)]
pub struct HaArgs {
    /// Concurrent clients for reads and writes.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// Seconds per throughput phase.
    #[arg(long, default_value_t = 5)]
    pub duration_secs: u64,
    /// Objects read (services of one tenant); lists read pages of 100 of them.
    #[arg(long, default_value_t = 1000)]
    pub objects: usize,
    /// Failovers measured (each kills the leading server and starts it again).
    #[arg(long, default_value_t = 3)]
    pub failovers: usize,
    /// The `hive` binary; default: next to this program.
    #[arg(long)]
    pub hive: Option<PathBuf>,
    /// The etcd binary.
    #[arg(long, default_value = "/usr/bin/etcd")]
    pub etcd: PathBuf,
}

/// etcd members started by the benchmark, killed (by pid) when dropped.
struct Etcd {
    members: Vec<Child>,
    client_ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for m in &mut self.members {
            let _ = m.kill();
            let _ = m.wait();
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Etcd {
    fn start(binary: &Path, size: usize) -> Result<Self> {
        anyhow::ensure!(
            binary.is_file(),
            "{} not found (Debian: apt-get install etcd-server)",
            binary.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("hive-bench-etcd-")
            .tempdir()?;
        let ports: Vec<(u16, u16)> = (0..size)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<Result<_>>()?;
        let cluster: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let mut etcd = Self {
            members: Vec::new(),
            client_ports: ports.iter().map(|p| p.0).collect(),
            _dir: dir,
        };
        for (i, (client, peer)) in ports.iter().enumerate() {
            let client = format!("http://127.0.0.1:{client}");
            let peer = format!("http://127.0.0.1:{peer}");
            let child = Command::new(binary)
                .args(["--name", &format!("m{i}")])
                .arg("--data-dir")
                .arg(etcd._dir.path().join(format!("m{i}")))
                .args(["--listen-client-urls", &client])
                .args(["--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &cluster.join(",")])
                .args(["--initial-cluster-state", "new"])
                .args(["--max-request-bytes", "4194304"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("start {}", binary.display()))?;
            etcd.members.push(child);
        }
        Ok(etcd)
    }

    fn url(&self) -> String {
        let hosts: Vec<String> = self
            .client_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("etcd://{}", hosts.join(","))
    }

    fn options(&self) -> Result<EtcdStoreOptions> {
        Ok(EtcdStoreOptions::from_url(&self.url())?)
    }
}

/// A `hive server` on `etcd`; every server after the first gets the first one's admin token.
fn server(
    hive: &Path,
    etcd: &Etcd,
    data: &Path,
    token_from: Option<&Path>,
    extra: &[&str],
) -> Result<HiveUp> {
    std::fs::create_dir_all(data)?;
    if let Some(first) = token_from {
        std::fs::copy(first.join("admin.token"), data.join("admin.token"))?;
    }
    let mut cmd = Command::new(hive);
    cmd.args(["server", "--store", &etcd.url(), "--listen", "127.0.0.1:0"])
        .args(["--rate-limit", "0", "--data-dir"])
        .arg(data)
        .args(extra);
    spawn_api(cmd, "hive server: API at ", data)
}

fn service(name: &str, replicas: u32) -> Service {
    Service {
        name: name.into(),
        spec: ServiceSpec {
            replicas,
            template: ContainerSpec {
                image: "registry.invalid/app:1".into(),
                ..Default::default()
            },
            ..Default::default()
        },
        ..Default::default()
    }
}

pub fn run(args: HaArgs) -> Result<()> {
    let hive = hive_binary(args.hive.clone())?;
    let etcd = Etcd::start(&args.etcd, 3)?;
    let dir = tempfile::Builder::new()
        .prefix("hive-bench-ha-")
        .tempdir()?;
    let data = |i: usize| dir.path().join(format!("server-{i}"));
    // Controllers only where the failover is measured: the read and write figures are the
    // API's alone.
    let mut servers = vec![server(&hive, &etcd, &data(0), None, &["--no-controllers"])?];
    for i in 1..3 {
        servers.push(server(
            &hive,
            &etcd,
            &data(i),
            Some(&data(0)),
            &["--no-controllers"],
        )?);
    }
    let uncached = server(
        &hive,
        &etcd,
        &data(3),
        Some(&data(0)),
        &["--no-controllers", "--no-watch-cache"],
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!(
        "hive-bench ha: 3-member etcd, {} clients, {} s per phase, {} objects; load {}",
        args.clients,
        args.duration_secs,
        args.objects,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let reads = rt.block_on(reads(&args, &etcd, &servers[0], &uncached))?;
    let writes = rt.block_on(write_rates(&args, &etcd, &servers, "w"))?;
    let uncached_writes = rt.block_on(write_rates(
        &args,
        &etcd,
        std::slice::from_ref(&uncached),
        "u",
    ))?;
    drop(uncached);
    drop(servers);
    let failover = match args.failovers {
        0 => Vec::new(),
        _ => rt.block_on(failovers(&args, &hive, &etcd, dir.path()))?,
    };

    println!();
    println!("{:<44} {:>12} {:>12} {:>7}", "", "cache", "etcd", "ratio");
    let row = |what: &str, (a, b): (f64, f64)| {
        println!("{what:<44} {a:>12.0} {b:>12.0} {:>7.1}", a / b);
    };
    row("HTTP gets/s (one object)", reads.http_gets);
    row("HTTP lists/s (pages of 100)", reads.http_lists);
    row("store gets/s (no HTTP)", reads.store_gets);
    row("store lists/s (no HTTP)", reads.store_lists);
    println!(
        "{:<44} {:>12.0} {:>12.0} {:>7.2}",
        "writes/s: 3 servers | etcd client alone",
        writes.0,
        writes.1,
        writes.0 / writes.1
    );
    println!(
        "{:<44} {:>12.0}",
        "writes/s: 1 server without the cache", uncached_writes.0
    );
    let fo: Vec<String> = failover
        .iter()
        .map(|d| format!("{:.2}", d.as_secs_f64()))
        .collect();
    let worst = failover.iter().max().copied().unwrap_or_default();
    println!(
        "failover, leader killed → placed by the next (s): {}",
        fo.join(" ")
    );
    let ratio = |(a, b): (f64, f64)| a / b;
    println!(
        "cache_read_ratio={:.1} list_ratio={:.1} store_get_ratio={:.1} store_list_ratio={:.1} \
         http_gets_per_s={:.0} etcd_gets_per_s={:.0} writes_per_s={:.0} etcd_writes_per_s={:.0} \
         failover_s={:.2}",
        ratio(reads.http_gets),
        ratio(reads.http_lists),
        ratio(reads.store_gets),
        ratio(reads.store_lists),
        reads.http_gets.0,
        reads.http_gets.1,
        writes.0,
        writes.1,
        worst.as_secs_f64()
    );
    Ok(())
}

/// Each pair: (through the watch cache, straight from etcd).
struct Reads {
    http_gets: (f64, f64),
    http_lists: (f64, f64),
    store_gets: (f64, f64),
    store_lists: (f64, f64),
}

async fn reads(args: &HaArgs, etcd: &Etcd, cached: &HiveUp, uncached: &HiveUp) -> Result<Reads> {
    let admin = Client::new(&cached.url, Some(cached.token.clone()))?;
    admin
        .create(
            None,
            &Tenant {
                name: "bench".into(),
                ..Default::default()
            },
        )
        .await?;
    let n = args.objects.max(1);
    let c = admin.clone();
    let created: Vec<Service> = futures_util::stream::iter(0..n)
        .map(|i| {
            let c = c.clone();
            async move { c.create(Some("bench"), &service(&format!("s{i}"), 0)).await }
        })
        .buffer_unordered(args.clients.max(1))
        .try_collect()
        .await?;
    anyhow::ensure!(created.len() == n);
    let secs = args.duration_secs;
    // Over HTTP the load comes from wrk (C, one thread, keep-alive connections): an
    // in-process Rust client took about half of the two cores the servers are measured on.
    let mut pairs = Vec::new();
    for up in [cached, uncached] {
        let base = "/api/v1/tenants/bench/services";
        let gets = wrk(
            &up.url,
            &up.token,
            args.clients,
            secs,
            &format!("\"{base}/s\" .. math.random(0, {})", n - 1),
        )
        .context("gets")?;
        let lists = wrk(
            &up.url,
            &up.token,
            args.clients,
            secs,
            &format!("\"{base}?limit=100\""),
        )
        .context("lists")?;
        pairs.push((gets, lists));
    }

    // The store level: the cache against the etcd client it sits on.
    let store: Arc<dyn Store> = Arc::new(EtcdStore::connect(etcd.options()?).await?);
    let cache: Arc<dyn Store> =
        Arc::new(WatchCache::start(store.clone(), WatchCacheOptions::default()).await?);
    let mut store_pairs = Vec::new();
    for s in [cache, store] {
        let g = s.clone();
        let gets = throughput(args.clients, secs, move |i| {
            let g = g.clone();
            async move {
                g.get(&format!("/t/bench/services/s{}", i % n)).await?;
                Ok(())
            }
        })
        .await?;
        let l = s.clone();
        let lists = throughput(args.clients, secs, move |_| {
            let l = l.clone();
            async move {
                l.list("/t/bench/services/", None, 100).await?;
                Ok(())
            }
        })
        .await?;
        store_pairs.push((gets, lists));
    }
    Ok(Reads {
        http_gets: (pairs[0].0, pairs[1].0),
        http_lists: (pairs[0].1, pairs[1].1),
        store_gets: (store_pairs[0].0, store_pairs[1].0),
        store_lists: (store_pairs[0].1, store_pairs[1].1),
    })
}

/// Requests/s of `wrk` against `url` for `secs` seconds over `clients` connections, each
/// request's path the Lua expression `path`; fails on any answer but 2xx.
fn wrk(url: &str, token: &str, clients: usize, secs: u64, path: &str) -> Result<f64> {
    let script = tempfile::Builder::new().suffix(".lua").tempfile()?;
    std::fs::write(
        script.path(),
        format!("request = function()\n  return wrk.format(nil, {path})\nend\n"),
    )?;
    let out = Command::new("wrk")
        .args(["-t", "1", "-c", &clients.max(1).to_string()])
        .args(["-d", &format!("{secs}s"), "-H"])
        .arg(format!("Authorization: Bearer {token}"))
        .arg("-s")
        .arg(script.path())
        .arg(url)
        .stderr(Stdio::inherit())
        .output()
        .context("run wrk (Debian package wrk; scripts/deps.sh installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(out.status.success(), "wrk failed: {text}");
    anyhow::ensure!(
        !text.contains("Non-2xx") && !text.contains("Socket errors"),
        "wrk saw failed requests: {text}"
    );
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("wrk printed no Requests/sec: {text}"))
}

/// Creates/s through all three servers at once, and etcd's own figure (same value, same
/// concurrency, straight through the etcd client).
async fn write_rates(
    args: &HaArgs,
    etcd: &Etcd,
    servers: &[HiveUp],
    prefix: &'static str,
) -> Result<(f64, f64)> {
    let clients: Vec<Client> = servers
        .iter()
        .map(|s| Client::new(&s.url, Some(s.token.clone())))
        .collect::<Result<_, _>>()?;
    let through = throughput(args.clients, args.duration_secs, move |i| {
        let c = clients[i % clients.len()].clone();
        async move {
            c.create(Some("bench"), &service(&format!("{prefix}{i}"), 0))
                .await?;
            Ok(())
        }
    })
    .await
    .context("writes through the servers")?;
    let store = Arc::new(EtcdStore::connect(etcd.options()?).await?);
    let value = bytes::Bytes::from(serde_json::to_vec(&service("floor", 0))?);
    let floor = throughput(args.clients, args.duration_secs, move |i| {
        let (s, value) = (store.clone(), value.clone());
        async move {
            s.txn(vec![Op::Create {
                key: format!("/floor/{prefix}{i}"),
                value,
            }])
            .await?;
            Ok(())
        }
    })
    .await
    .context("writes straight to etcd")?;
    Ok((through, floor))
}

/// Three servers with controllers and a simulated node; each round kills the leading server,
/// creates a service at once and times its placement, then starts the killed server again.
async fn failovers(args: &HaArgs, hive: &Path, etcd: &Etcd, dir: &Path) -> Result<Vec<Duration>> {
    let data = |i: usize| dir.join(format!("ctl-{i}"));
    let first = dir.join("server-0");
    let mut servers: Vec<Option<HiveUp>> = Vec::new();
    for i in 0..3 {
        servers.push(Some(server(hive, etcd, &data(i), Some(&first), &[])?));
    }
    let token = servers[0]
        .as_ref()
        .map(|s| s.token.clone())
        .unwrap_or_default();
    let client = |s: &HiveUp| Client::new(&s.url, Some(token.clone()));
    let mut clients: Vec<Client> = servers
        .iter()
        .flatten()
        .map(client)
        .collect::<Result<_, _>>()?;
    let cap = NodeCapacity {
        cpu_millis: 64_000,
        memory_bytes: 256 << 30,
        network_bps: 10_000_000_000,
    };
    let mut node = clients[0]
        .create(
            None,
            &Node {
                name: "sim".into(),
                ..Default::default()
            },
        )
        .await?;
    node.spec.shared = true;
    node.revision = 0;
    clients[0].update(None, &node).await?;
    // The simulated node's lease, renewed through whichever server answers.
    let stop = Arc::new(AtomicBool::new(false));
    let lease = {
        let (clients, stop) = (clients.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                for k in 0..clients.len() {
                    let c = &clients[(i + k) % clients.len()];
                    let Ok(mut n) = c.get::<Node>(None, "sim").await else {
                        continue;
                    };
                    n.status = NodeStatus {
                        capacity: cap.clone(),
                        allocatable: cap.clone(),
                        ready: true,
                        lease_renewed_at: Some(chrono::Utc::now()),
                        ..n.status
                    };
                    n.revision = 0;
                    if c.update_status(None, &n).await.is_ok() {
                        break;
                    }
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let placed = |c: Client, name: String| async move {
        let t0 = Instant::now();
        loop {
            if let Ok(list) = c.list::<Instance>(Some("bench")).await
                && list
                    .items
                    .iter()
                    .any(|i| i.spec.service == name && i.spec.node.as_deref() == Some("sim"))
            {
                return Ok(());
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("{name} not placed in 60 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let warm = "failover-warm".to_owned();
    clients[0].create(Some("bench"), &service(&warm, 1)).await?;
    placed(clients[0].clone(), warm).await?;

    let store = EtcdStore::connect(etcd.options()?).await?;
    let mut times = Vec::new();
    for round in 0..args.failovers {
        let term = store
            .get(hive_server::leader::LEADER_KEY)
            .await?
            .kv
            .context("no leader")?;
        let holder: serde_json::Value = serde_json::from_slice(&term.value)?;
        let holder = holder["holder"].as_str().unwrap_or_default().to_owned();
        let leading = servers
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| holder.starts_with(&s.url)))
            .context("the leader is none of the three")?;
        let survivor = clients[(leading + 1) % clients.len()].clone();
        drop(servers[leading].take());
        let killed = Instant::now();
        let name = format!("failover-{round}");
        survivor.create(Some("bench"), &service(&name, 1)).await?;
        placed(survivor, name).await?;
        times.push(killed.elapsed());
        // Back to three servers (same data dir, a new port). The lease task keeps its
        // clients: the dead one fails and it renews through the others.
        let up = server(hive, etcd, &data(leading), None, &[])?;
        clients[leading] = client(&up)?;
        servers[leading] = Some(up);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = lease.await;
    Ok(times)
}
