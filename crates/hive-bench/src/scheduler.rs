//! `hive-bench scheduler`: placements per second and submission-to-binding latency of the
//! scheduler's own code ([`Cluster`], [`FairQueue`]) writing its bindings into the real
//! embedded store ([`RedbStore`]), against the design it replaces (one global FIFO, one
//! worker, one binding committed after another), in the same run; then fairness (another
//! tenant's single instance while one tenant has 50,000 queued) in both modes.
//!
//! Simulated nodes: no agents; nodes, networks and instances are API objects in the store,
//! written as the API server writes them. What is bypassed, on purpose: HTTP and the watch
//! (100,000 bindings over HTTP would measure the HTTP stack, which `hive-bench api`
//! measures). A binding is the transaction the API server commits when the scheduler binds an
//! instance: the instance with `spec.node` and its network place, under its revision
//! (compare-and-swap), the claim on its address, a guard on its network's revision, and the
//! scheduler's `Scheduled` Event; a pool node taken also gets its `spec.tenant` under its
//! revision. The fair mode puts several bindings in one transaction (each still its own
//! compare-and-swap) and keeps a few transactions in flight while placing the next. A
//! smaller run through the real API server and the real scheduler loop follows
//! (`--api-instances`, 0 to skip).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Args;
use hive_api::{
    ContainerSpec, EventType, Instance, InstanceNetwork, Network, Node, NodeCapacity, NodeStatus,
    POOL_BOUND_LABEL, Tenant,
};
use hive_client::Client;
use hive_scheduler::{Cluster, FairQueue, NodeInfo, Request, Resources};
use hive_server::controllers::events::new_event;
use hive_server::keys;
use hive_store::{MAX_TXN_OPS, Op, RedbStore, RedbStoreOptions, Store};
use tokio::sync::{Semaphore, mpsc};

#[derive(Debug, Args)]
pub struct SchedulerArgs {
    /// Simulated nodes (16 cores, 64 GiB each, all in the shared pool).
    #[arg(long, default_value_t = 5000)]
    nodes: usize,
    /// Tenants the instances are spread over.
    #[arg(long, default_value_t = 100)]
    tenants: usize,
    /// Instances submitted at once (250m, 256 MiB each).
    #[arg(long, default_value_t = 100_000)]
    instances: usize,
    /// Fair mode: most bindings per store transaction.
    #[arg(long, default_value_t = 32)]
    per_txn: usize,
    /// Fair mode: transactions in flight while the next are placed (the store commits those
    /// waiting together: 16 measured twice the rate of 4 on the project machine).
    #[arg(long, default_value_t = 16)]
    in_flight: usize,
    /// Fairness: instances one tenant has queued while another submits single ones.
    #[arg(long, default_value_t = 50_000)]
    big: usize,
    /// Fairness: milliseconds between the other tenant's single instances.
    #[arg(long, default_value_t = 10)]
    probe_every_ms: u64,
    /// Instances of the smaller run through the real API server and scheduler loop (0: skip).
    #[arg(long, default_value_t = 5000)]
    api_instances: usize,
    /// Nodes of that run.
    #[arg(long, default_value_t = 250)]
    api_nodes: usize,
    /// Tenants of that run.
    #[arg(long, default_value_t = 10)]
    api_tenants: usize,
    /// Modes to run, in this order (the last line names only their figures): `fair-batched`,
    /// `fair-1-per-txn`, `serial-fifo`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "fair-batched,fair-1-per-txn,serial-fifo"
    )]
    modes: Vec<String>,
    /// Fair modes: instances each tenant's queue gives per turn (the server's scheduler uses
    /// `hive_server`'s own figure).
    #[arg(long, default_value_t = 1)]
    quantum: u32,
}

const CPU: u64 = 16_000;
const MEM: u64 = 64 << 30;
const REQ_CPU: u64 = 250;
const REQ_MEM: u64 = 256 << 20;
/// Probe instances created for the fairness run (more than can be submitted).
const PROBES: usize = 4000;

fn node_obj(name: &str) -> Node {
    let cap = NodeCapacity {
        cpu_millis: CPU,
        memory_bytes: MEM,
        network_bps: 10_000_000_000,
    };
    Node {
        name: name.into(),
        status: NodeStatus {
            capacity: cap.clone(),
            allocatable: cap,
            ready: true,
            lease_renewed_at: Some(chrono::Utc::now()),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn instance_obj(tenant: &str, name: &str) -> Instance {
    let mut i = Instance {
        name: name.into(),
        tenant: tenant.into(),
        uid: format!("uid-{tenant}-{name}"),
        labels: BTreeMap::from([("hive.dev/service".into(), "web".into())]),
        ..Default::default()
    };
    i.spec.service = "web".into();
    i.spec.template = ContainerSpec {
        image: "registry.local/acme/web:1.4".into(),
        ..Default::default()
    };
    i.spec.template.resources.requests.cpu_millis = Some(REQ_CPU);
    i.spec.template.resources.requests.memory_bytes = Some(REQ_MEM);
    i
}

fn json<R: serde::Serialize>(v: &R) -> Bytes {
    Bytes::from(serde_json::to_vec(v).expect("encode"))
}

/// One stored instance the scheduler will bind.
struct Inst {
    tenant: String,
    obj: Instance,
    rev: u64,
}

/// What the store holds and what the scheduler knows of it.
struct World {
    store: Arc<RedbStore>,
    nodes: HashMap<String, (Node, u64)>,
    network_rev: HashMap<String, u64>,
    insts: Vec<Inst>,
    next_ip: HashMap<String, u32>,
    cluster: Cluster,
}

impl World {
    async fn open(path: &Path, nodes: usize) -> Result<World> {
        let store = Arc::new(RedbStore::open(path, RedbStoreOptions::default())?);
        let mut w = World {
            store,
            nodes: HashMap::new(),
            network_rev: HashMap::new(),
            insts: Vec::new(),
            next_ip: HashMap::new(),
            cluster: Cluster::new(),
        };
        let all: Vec<Node> = (0..nodes).map(|i| node_obj(&format!("n{i:05}"))).collect();
        for chunk in all.chunks(MAX_TXN_OPS) {
            let ops = chunk
                .iter()
                .map(|n| Op::Create {
                    key: keys::object::<Node>(None, &n.name),
                    value: json(n),
                })
                .collect();
            let rev = w.store.txn(ops).await?.revision;
            for n in chunk {
                w.cluster.upsert_node(NodeInfo {
                    name: n.name.clone(),
                    allocatable: Resources {
                        cpu_millis: CPU,
                        memory_bytes: MEM,
                        network_bps: 10_000_000_000,
                    },
                    ready: true,
                    ..Default::default()
                });
                w.nodes.insert(n.name.clone(), (n.clone(), rev));
            }
        }
        Ok(w)
    }

    /// Stores `count` pending instances of `tenant` (and its network); returns their indexes.
    async fn add(&mut self, tenant: &str, count: usize) -> Result<Vec<usize>> {
        if !self.network_rev.contains_key(tenant) {
            let mut net = Network {
                name: "default".into(),
                tenant: tenant.into(),
                ..Default::default()
            };
            net.spec.subnet = "10.0.0.0/8".into();
            net.status.vni = 1000 + self.network_rev.len() as u32;
            let key = keys::object::<Network>(Some(tenant), "default");
            let rev = self
                .store
                .txn(vec![Op::Create {
                    key,
                    value: json(&net),
                }])
                .await?
                .revision;
            self.network_rev.insert(tenant.to_owned(), rev);
        }
        let first = self.insts.len();
        let objs: Vec<Instance> = (0..count)
            .map(|i| instance_obj(tenant, &format!("web-{:06}", first + i)))
            .collect();
        for chunk in objs.chunks(MAX_TXN_OPS) {
            let ops = chunk
                .iter()
                .map(|o| Op::Create {
                    key: keys::object::<Instance>(Some(tenant), &o.name),
                    value: json(o),
                })
                .collect();
            let rev = self.store.txn(ops).await?.revision;
            for o in chunk {
                self.insts.push(Inst {
                    tenant: tenant.to_owned(),
                    obj: o.clone(),
                    rev,
                });
            }
        }
        Ok((first..first + count).collect())
    }

    fn request(&self, idx: usize) -> Request {
        let i = &self.insts[idx];
        Request {
            tenant: i.tenant.clone(),
            service: i.obj.spec.service.clone(),
            requests: Resources {
                cpu_millis: REQ_CPU,
                memory_bytes: REQ_MEM,
                network_bps: 0,
            },
            ..Default::default()
        }
    }

    /// Places instance `idx` and returns the writes of its binding, as the API server makes
    /// them (the network guard is returned apart: one per network per transaction).
    fn place(&mut self, idx: usize) -> Result<(Vec<Op>, (String, u64))> {
        let req = self.request(idx);
        let p = self
            .cluster
            .place(&req)
            .map_err(|e| anyhow::anyhow!("instance {idx}: {e}"))?;
        let tenant = req.tenant;
        let n = self.next_ip.entry(tenant.clone()).or_insert(0);
        *n += 1;
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 2)) + *n);
        let inst = &self.insts[idx];
        let mut bound = inst.obj.clone();
        bound.spec.node = Some(p.node.clone());
        bound.spec.network = Some(InstanceNetwork {
            name: "default".into(),
            vni: 1000,
            ip: ip.to_string(),
            prefix_len: 8,
            gateway: "10.0.0.1".into(),
            mac: String::new(),
        });
        bound.revision = 0;
        let mut ops = vec![
            Op::Update {
                key: keys::object::<Instance>(Some(&tenant), &bound.name),
                value: json(&bound),
                mod_revision: inst.rev,
            },
            Op::Create {
                key: keys::ip_claim(&tenant, "default", ip),
                value: Bytes::from(bound.uid.clone()),
            },
        ];
        let ev = new_event(
            EventType::Normal,
            "scheduler",
            "Scheduled",
            "instance",
            &bound.name,
            format!("instance {} placed on node {}", bound.name, p.node),
        );
        ops.push(Op::Create {
            key: format!(
                "{}{}",
                keys::collection::<hive_api::Event>(Some(&tenant)),
                ev.name
            ),
            value: json(&ev),
        });
        if p.binds_tenant
            && let Some((node, rev)) = self.nodes.get(&p.node)
        {
            let mut node = node.clone();
            node.spec.tenant = Some(tenant.clone());
            node.labels
                .insert(POOL_BOUND_LABEL.to_owned(), tenant.clone());
            ops.push(Op::Update {
                key: keys::object::<Node>(None, &node.name),
                value: json(&node),
                mod_revision: *rev,
            });
        }
        let net = keys::object::<Network>(Some(&tenant), "default");
        let net_rev = self.network_rev[&tenant];
        Ok((ops, (net, net_rev)))
    }
}

/// When each instance's binding was committed.
type Committed = Arc<Mutex<Vec<(usize, Instant)>>>;

/// How the queue is served.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// Per-tenant queues in turn (`quantum` each per turn); `per_txn` bindings per
    /// transaction, `in_flight` at once.
    Fair {
        per_txn: usize,
        in_flight: usize,
        quantum: u32,
    },
    /// One global FIFO, one worker, one binding committed after another.
    Serial,
}

/// Places and binds `items` (submitted together at the start) and whatever arrives on
/// `more` meanwhile (with its submission time); returns each binding's commit time.
async fn drive(
    w: &mut World,
    mode: Mode,
    items: &[usize],
    mut more: Option<mpsc::UnboundedReceiver<usize>>,
    stop_probes: Option<(Arc<AtomicBool>, String)>,
) -> Result<Vec<(usize, Instant)>> {
    let committed: Committed = Arc::new(Mutex::new(Vec::with_capacity(items.len())));
    let mut fair: FairQueue<usize> = FairQueue::with_quantum(match mode {
        Mode::Fair { quantum, .. } => quantum,
        Mode::Serial => 1,
    });
    let mut fifo: VecDeque<usize> = VecDeque::new();
    for &i in items {
        match mode {
            Mode::Fair { .. } => fair.push(&w.insts[i].tenant, 0, i),
            Mode::Serial => fifo.push_back(i),
        }
    }
    let (per_txn, in_flight) = match mode {
        Mode::Fair {
            per_txn, in_flight, ..
        } => (per_txn, in_flight),
        Mode::Serial => (1, 1),
    };
    let permits = Arc::new(Semaphore::new(in_flight));
    let mut carried: Option<(usize, Vec<Op>, (String, u64))> = None;
    let mut big_left: usize = match &stop_probes {
        Some((_, big)) => items.iter().filter(|&&i| w.insts[i].tenant == *big).count(),
        None => 0,
    };
    loop {
        // New submissions join the queue between transactions, as in the scheduler loop.
        if let Some(rx) = more.as_mut() {
            loop {
                match rx.try_recv() {
                    Ok(i) => match mode {
                        Mode::Fair { .. } => fair.push(&w.insts[i].tenant, 0, i),
                        Mode::Serial => fifo.push_back(i),
                    },
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        more = None;
                        break;
                    }
                }
            }
        }
        let mut ops: Vec<Op> = Vec::new();
        let mut guards: HashSet<String> = HashSet::new();
        let mut batch: Vec<usize> = Vec::new();
        loop {
            let next = match carried.take() {
                Some(c) => Some(c),
                None if batch.len() >= per_txn => None,
                None => {
                    let popped = match mode {
                        Mode::Fair { .. } => fair.pop().map(|(_, i)| i),
                        Mode::Serial => fifo.pop_front(),
                    };
                    match popped {
                        Some(i) => {
                            if let Some((_, big)) = &stop_probes
                                && w.insts[i].tenant == *big
                            {
                                big_left -= 1;
                            }
                            let (o, g) = w.place(i)?;
                            Some((i, o, g))
                        }
                        None => None,
                    }
                }
            };
            let Some((i, o, (gk, grev))) = next else {
                break;
            };
            let extra = o.len() + usize::from(!guards.contains(&gk));
            if !batch.is_empty() && ops.len() + extra > MAX_TXN_OPS {
                carried = Some((i, o, (gk, grev)));
                break;
            }
            if guards.insert(gk.clone()) {
                ops.push(Op::Require {
                    key: gk,
                    mod_revision: grev,
                });
            }
            ops.extend(o);
            batch.push(i);
        }
        if let Some((stop, _)) = &stop_probes
            && big_left == 0
        {
            stop.store(true, Ordering::Relaxed);
        }
        if batch.is_empty() {
            if more.is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
            continue;
        }
        let permit = permits.clone().acquire_owned().await?;
        let store = w.store.clone();
        let committed = committed.clone();
        let write = async move {
            let r = store.txn(ops).await;
            let now = Instant::now();
            let r = r.map(|_| {
                committed
                    .lock()
                    .expect("lock")
                    .extend(batch.into_iter().map(|i| (i, now)))
            });
            // Only once recorded: the end of the run waits for every permit.
            drop(permit);
            r
        };
        if in_flight == 1 {
            write.await?;
        } else {
            tokio::spawn(async move {
                if let Err(e) = write.await {
                    eprintln!("binding transaction failed: {e}");
                }
            });
        }
    }
    // Every transaction in flight is done once all permits are back.
    let _all = permits.acquire_many(in_flight as u32).await?;
    let out = std::mem::take(&mut *committed.lock().expect("lock"));
    Ok(out)
}

struct ModeResult {
    name: String,
    bound: usize,
    elapsed: Duration,
    p50_ms: f64,
    p99_ms: f64,
    fair_p50_ms: f64,
    fair_p99_ms: f64,
    probes: usize,
    big_per_s: f64,
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn run_mode(args: &SchedulerArgs, dir: &Path, name: &str, mode: Mode) -> Result<ModeResult> {
    let path = dir.join(format!("{name}.redb"));
    let populating = Instant::now();
    let mut w = World::open(&path, args.nodes).await?;
    let mut items = Vec::with_capacity(args.instances);
    let per_tenant = args.instances.div_ceil(args.tenants);
    for t in 0..args.tenants {
        let n = per_tenant.min(args.instances - items.len());
        items.extend(w.add(&format!("t{t:03}"), n).await?);
    }
    let big = w.add("big", args.big).await?;
    let probes = w.add("probe", PROBES).await?;

    println!(
        "  {name}: store populated in {:.2} s",
        populating.elapsed().as_secs_f64()
    );
    // All at once.
    let t0 = Instant::now();
    let done = drive(&mut w, mode, &items, None, None).await?;
    let elapsed = t0.elapsed();
    if done.len() != items.len() {
        bail!(
            "{name}: {} of {} bindings committed",
            done.len(),
            items.len()
        );
    }
    let mut lat: Vec<f64> = done
        .iter()
        .map(|(_, at)| (*at - t0).as_secs_f64() * 1000.0)
        .collect();
    lat.sort_by(f64::total_cmp);

    // Fairness: `big` queued at once, another tenant's single instance every few ms.
    let (tx, rx) = mpsc::unbounded_channel();
    let stop = Arc::new(AtomicBool::new(false));
    let sent: Arc<Mutex<HashMap<usize, Instant>>> = Arc::default();
    let sender = {
        let (stop, sent) = (stop.clone(), sent.clone());
        let every = Duration::from_millis(args.probe_every_ms);
        tokio::spawn(async move {
            for i in probes {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                sent.lock().expect("lock").insert(i, Instant::now());
                if tx.send(i).is_err() {
                    break;
                }
                tokio::time::sleep(every).await;
            }
        })
    };
    let t1 = Instant::now();
    let done = drive(&mut w, mode, &big, Some(rx), Some((stop, "big".into()))).await?;
    sender.await?;
    let sent = sent.lock().expect("lock").clone();
    let mut big_done = 0usize;
    let mut big_end = t1;
    let mut fair: Vec<f64> = Vec::new();
    for (i, at) in &done {
        match sent.get(i) {
            Some(s) => fair.push((*at - *s).as_secs_f64() * 1000.0),
            None => {
                big_done += 1;
                big_end = big_end.max(*at);
            }
        }
    }
    fair.sort_by(f64::total_cmp);
    drop(w);
    let _ = std::fs::remove_file(&path);
    Ok(ModeResult {
        name: name.into(),
        bound: items.len(),
        elapsed,
        p50_ms: pct(&lat, 0.5),
        p99_ms: pct(&lat, 0.99),
        fair_p50_ms: pct(&fair, 0.5),
        fair_p99_ms: pct(&fair, 0.99),
        probes: fair.len(),
        big_per_s: big_done as f64 / (big_end - t1).as_secs_f64(),
    })
}

impl ModeResult {
    fn per_s(&self) -> f64 {
        self.bound as f64 / self.elapsed.as_secs_f64()
    }
}

pub fn run(args: SchedulerArgs) -> Result<()> {
    if args.tenants == 0 || args.instances < args.tenants || args.per_txn == 0 {
        bail!("need at least one tenant, one instance per tenant and one binding per txn");
    }
    let dir = tempfile::Builder::new()
        .prefix("hive-bench-scheduler-")
        .tempdir()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!(
        "scheduler benchmark: {} simulated nodes, {} tenants, {} instances submitted at once; \
         placement code + embedded store (no HTTP), in {}",
        args.nodes,
        args.tenants,
        args.instances,
        dir.path().display()
    );
    // Every name checked before the first (long) mode runs.
    let modes = args
        .modes
        .iter()
        .map(|name| {
            let mode = match name.as_str() {
                "fair-batched" => Mode::Fair {
                    per_txn: args.per_txn,
                    in_flight: args.in_flight,
                    quantum: args.quantum,
                },
                "fair-1-per-txn" => Mode::Fair {
                    per_txn: 1,
                    in_flight: 64,
                    quantum: args.quantum,
                },
                "serial-fifo" => Mode::Serial,
                other => {
                    bail!("unknown mode {other}: fair-batched, fair-1-per-txn or serial-fifo")
                }
            };
            Ok((name.as_str(), mode))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut results: Vec<ModeResult> = Vec::new();
    for (name, mode) in modes {
        let r = rt
            .block_on(run_mode(&args, dir.path(), name, mode))
            .with_context(|| format!("mode {name}"))?;
        println!(
            "  {name}: {} bound in {:.2} s",
            r.bound,
            r.elapsed.as_secs_f64()
        );
        results.push(r);
    }
    drop(rt);
    println!();
    println!(
        "{:<16} {:>12} {:>9} {:>9} {:>13} {:>13} {:>7} {:>12}",
        "mode", "placements/s", "p50 ms", "p99 ms", "fair p50 ms", "fair p99 ms", "probes", "big/s"
    );
    for r in &results {
        println!(
            "{:<16} {:>12.0} {:>9.1} {:>9.1} {:>13.1} {:>13.1} {:>7} {:>12.0}",
            r.name,
            r.per_s(),
            r.p50_ms,
            r.p99_ms,
            r.fair_p50_ms,
            r.fair_p99_ms,
            r.probes,
            r.big_per_s
        );
    }
    let api = if args.api_instances > 0 {
        Some(api_run(&args)?)
    } else {
        None
    };
    let find = |name: &str| results.iter().find(|r| r.name == name);
    let mut fields: Vec<String> = Vec::new();
    if let Some(fair) = find("fair-batched") {
        fields.push(format!("placements_per_s={:.0}", fair.per_s()));
    }
    if let Some(serial) = find("serial-fifo") {
        fields.push(format!("serial_per_s={:.0}", serial.per_s()));
        if let Some(fair) = find("fair-batched") {
            fields.push(format!("ratio={:.1}", fair.per_s() / serial.per_s()));
        }
    }
    if let Some(fair) = find("fair-batched") {
        fields.push(format!(
            "p50_ms={:.1} p99_ms={:.1} fair_p99_ms={:.1}",
            fair.p50_ms, fair.p99_ms, fair.fair_p99_ms
        ));
    }
    if let Some(serial) = find("serial-fifo") {
        fields.push(format!("serial_fair_p99_ms={:.0}", serial.fair_p99_ms));
    }
    if let Some(one) = find("fair-1-per-txn") {
        fields.push(format!("per_txn_1_per_s={:.0}", one.per_s()));
    }
    fields.push(format!(
        "nodes={} tenants={} instances={}",
        args.nodes, args.tenants, args.instances
    ));
    let mut last = fields.join(" ");
    if let Some(a) = api {
        last.push_str(&format!(
            " api_per_s={a:.0} api_instances={}",
            args.api_instances
        ));
    }
    println!("{last}");
    Ok(())
}

/// The real API server and the real scheduler loop: nodes, tenants and pending instances
/// created over HTTP first, then the scheduler started; placements/s until every instance is
/// seen bound.
fn api_run(args: &SchedulerArgs) -> Result<f64> {
    let dir = tempfile::Builder::new()
        .prefix("hive-bench-scheduler-api-")
        .tempdir()?;
    let (server_rt, server) = crate::api::launch_unlimited(dir.path())?;
    let client = Client::new(&server.url, Some(server.admin_token.clone()))?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let r = client_rt.block_on(async {
        let c = &client;
        let tenants: Vec<String> = (0..args.api_tenants).map(|t| format!("t{t:03}")).collect();
        for t in &tenants {
            c.create(
                None,
                &Tenant {
                    name: t.clone(),
                    ..Default::default()
                },
            )
            .await?;
        }
        let per_tenant = args.api_instances.div_ceil(args.api_tenants);
        let mut creates = Vec::new();
        for t in &tenants {
            for i in 0..per_tenant {
                creates.push((t.clone(), instance_obj(t, &format!("web-{i:06}"))));
            }
        }
        creates.truncate(args.api_instances);
        let total = creates.len();
        let sem = Arc::new(Semaphore::new(32));
        let mut tasks = Vec::new();
        for (t, mut o) in creates {
            o.tenant = String::new();
            o.uid = String::new();
            let c = c.clone();
            let permit = sem.clone().acquire_owned().await?;
            tasks.push(tokio::spawn(async move {
                let r = c.create(Some(&t), &o).await;
                drop(permit);
                r
            }));
        }
        for t in tasks {
            t.await??;
        }
        for i in 0..args.api_nodes {
            let n = c
                .create(
                    None,
                    &Node {
                        name: format!("n{i:05}"),
                        ..Default::default()
                    },
                )
                .await?;
            let mut with_status = node_obj(&n.name);
            with_status.revision = n.revision;
            c.update_status(None, &with_status).await?;
        }
        let t0 = Instant::now();
        let sched = tokio::spawn(hive_server::controllers::Scheduler::new(c.clone()).run());
        loop {
            let mut bound = 0;
            for t in &tenants {
                bound += c
                    .list::<Instance>(Some(t))
                    .await?
                    .items
                    .iter()
                    .filter(|i| i.spec.node.is_some())
                    .count();
            }
            if bound == total {
                break;
            }
            if t0.elapsed() > Duration::from_secs(120) {
                bail!("api run: {bound} of {total} bound after 120 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let secs = t0.elapsed().as_secs_f64();
        sched.abort();
        let per_s = total as f64 / secs;
        println!(
            "\nthrough the API server and the scheduler loop (HTTP, {} nodes, {} tenants): \
             {total} instances bound in {secs:.2} s: {per_s:.0} placements/s",
            args.api_nodes, args.api_tenants
        );
        Ok::<f64, anyhow::Error>(per_s)
    });
    drop(client_rt);
    drop(server_rt);
    r
}
