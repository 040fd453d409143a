//! The scheduler loop: places pending instances on nodes. An API client like the other
//! controllers: it caches nodes and every tenant's instances (list + watch), queues pending
//! instances per tenant ([`FairQueue`]: tenants served in turn, so one tenant's burst does
//! not delay another), places each with [`Cluster`], and binds it by writing `spec.node` under
//! the instance's revision (compare-and-swap: a concurrent change re-queues it, nothing is
//! ever placed twice). A node taken from the shared pool is bound to the tenant (`spec.tenant`
//! of the Node, with the [`POOL_BOUND_LABEL`] naming the tenant); once such a node has run
//! nothing for the pool grace (no instance placed there, and no container its agent reports
//! in `status.containers`: a deleted instance's container may still be stopping) it is
//! returned to the pool. Nodes the operator bound (no label)
//! are never returned. An instance no node can take gets status reason `Unschedulable` with
//! every node's reason counted, and is retried when the nodes change.
//!
//! Placement is one task; binding is not: up to [`BIND_BATCH`] placed instances are written
//! at once, so the store commits them together (group commit) instead of one fsync after
//! another. Every binding is still its own compare-and-swap. Each decision is an Event in the
//! instance's tenant: `Scheduled` once per placement, `FailedScheduling` once per distinct
//! message however often a waiting instance is retried.
//!
//! **Placed as they are created.** The service controller asks first ([`Placer::reserve`]):
//! when nothing is queued (nobody is served out of turn) and the place takes no node from
//! the pool (binding one is a write of its own), the loop places the instance at once,
//! counts it on its node from then on, and the controller creates it already bound (the
//! server checks the node and gives the network place as for any binding). A start then
//! waits for one store commit and one watch delivery less. A reservation is given back when
//! the create fails ([`Placer::release`]) or its instance is not seen within
//! [`RESERVATION_TTL`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::join_all;
use hive_api::{ErrorCode, EventType, Instance, Node, POOL_BOUND_LABEL, Tenant, WatchEventType};
use hive_client::Client;
use hive_scheduler::{
    Cluster, FairQueue, NodeInfo, Occupancy, Placement, PoolReturn, Request, Resources,
};
use tokio::sync::{Mutex, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::events::{Dedup, create, new_event};
use super::nodes::LeaseAges;
use hive_client::reflector::{Store, keep_written, reflect_synced};

/// A node whose lease this scheduler has not seen renewed for this long (on its own clock)
/// is not ready.
pub const LEASE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a node bound from the pool may run nothing before it goes back, by default.
pub const DEFAULT_POOL_GRACE: Duration = Duration::from_secs(60);
/// Most bindings written at once.
pub const BIND_BATCH: usize = 64;
/// How long a node reserved for an instance being created stays counted while the instance
/// is not seen (a create that failed without the controller saying so).
pub const RESERVATION_TTL: Duration = Duration::from_secs(30);
/// How long the `Scheduled` Event of an instance placed as it was created waits before it
/// is written: an Event records, nothing waits for it, and written at once its store commit
/// queued beside the start's own (the instance's, then its status).
pub const EVENT_DELAY: Duration = Duration::from_millis(50);
/// How long the service controller waits for the loop's answer to a reservation before it
/// creates the instance unplaced (the loop busy writing a batch).
const RESERVE_WAIT: Duration = Duration::from_millis(200);
/// What the scheduler's Events say they come from.
const SOURCE: &str = "scheduler";

type Key = (String, String);

#[derive(Debug)]
pub struct Scheduler {
    client: Client,
    pool_grace: Duration,
    tx: mpsc::UnboundedSender<Change>,
    rx: mpsc::UnboundedReceiver<Change>,
}

/// Asks a running [`Scheduler`] to place an instance as it is created (see the module's
/// documentation). Every answer may be no: the instance is then created unplaced and
/// queued like any other.
#[derive(Clone, Debug)]
pub struct Placer {
    tx: mpsc::UnboundedSender<Change>,
}

impl Placer {
    /// A node for `inst` of `tenant`, counted as used there from now on; None when the
    /// scheduler would not place it at once (or does not answer within [`RESERVE_WAIT`]).
    pub async fn reserve(&self, tenant: &str, inst: &Instance) -> Option<String> {
        let (reply, answer) = oneshot::channel();
        let key = (tenant.to_owned(), inst.name.clone());
        self.tx
            .send(Change::Reserve {
                key,
                inst: Box::new(inst.clone()),
                reply,
            })
            .ok()?;
        tokio::time::timeout(RESERVE_WAIT, answer)
            .await
            .ok()?
            .ok()?
    }

    /// The reservation for instance `name` of `tenant` is not needed: its create failed.
    pub fn release(&self, tenant: &str, name: &str) {
        let _ = self
            .tx
            .send(Change::Release((tenant.to_owned(), name.to_owned())));
    }
}

/// What the loop knows; one task owns it.
struct State {
    cluster: Cluster,
    nodes: BTreeMap<String, Node>,
    /// How long ago each node's lease was renewed, on this process's clock.
    leases: LeaseAges,
    /// Instances the cluster accounts for, and where.
    placed: HashMap<Key, (String, Request)>,
    queue: FairQueue<String>,
    queued: HashSet<Key>,
    /// Pending instances no node could take, with their priority: retried when nodes change.
    waiting: HashMap<Key, i32>,
    /// The last `FailedScheduling` message of each waiting instance.
    reported: Dedup<Key>,
    /// Instances placed for the service controller before they exist (in `placed` too),
    /// and when.
    reserved: HashMap<Key, Instant>,
    /// `Scheduled` Events of reserved instances seen created, to write.
    scheduled: Vec<(String, hive_api::Event)>,
    /// How long the nodes bound from the pool have been empty.
    pool: PoolReturn,
    instances: HashMap<String, Store<Instance>>,
    /// Whether each cache holds a complete list yet (nodes under the empty name), and
    /// whether the tenants were listed: nothing is placed before, or nodes would be
    /// filled past what they hold.
    synced: HashMap<String, watch::Receiver<bool>>,
    discovered: bool,
}

impl State {
    fn new(pool_grace: Duration) -> Self {
        State {
            cluster: Cluster::new(),
            nodes: BTreeMap::new(),
            leases: LeaseAges::default(),
            placed: HashMap::new(),
            queue: FairQueue::new(),
            queued: HashSet::new(),
            waiting: HashMap::new(),
            reported: Dedup::default(),
            reserved: HashMap::new(),
            scheduled: Vec::new(),
            pool: PoolReturn::new(pool_grace),
            instances: HashMap::new(),
            synced: HashMap::new(),
            discovered: false,
        }
    }

    fn complete(&self) -> bool {
        self.discovered && self.synced.values().all(|r| *r.borrow())
    }
}

/// Whether the scheduler bound `n` from the pool (and so may return it): bound, not shared,
/// and labelled with the tenant it is bound to. A node the operator bound has no label, or
/// one naming another tenant.
pub fn bound_from_pool(n: &Node) -> bool {
    !n.spec.shared
        && n.spec.tenant.is_some()
        && n.labels.get(POOL_BOUND_LABEL) == n.spec.tenant.as_ref()
}

/// What `n` still has: the instances the scheduler accounts there (None: it does not know
/// the node) and the containers its agent reports, of every tenant.
fn occupancy(instances: Option<u32>, n: &Node) -> Occupancy {
    Occupancy {
        // An unknown node is never taken for empty.
        instances: instances.map_or(u64::MAX, u64::from),
        containers: n.status.containers.values().map(|c| u64::from(*c)).sum(),
    }
}

fn request(tenant: &str, i: &Instance) -> Request {
    let r = &i.spec.template.resources;
    Request {
        tenant: tenant.to_owned(),
        service: i.spec.service.clone(),
        requests: Resources {
            cpu_millis: r.requests.cpu_millis.or(r.limits.cpu_millis).unwrap_or(0),
            memory_bytes: r
                .requests
                .memory_bytes
                .or(r.limits.memory_bytes)
                .unwrap_or(0),
            network_bps: i
                .spec
                .template
                .bandwidth
                .as_ref()
                .and_then(|b| b.guaranteed_bps)
                .unwrap_or(0),
        },
        selector: BTreeMap::new(),
        host_ports: i
            .spec
            .template
            .ports
            .iter()
            .filter_map(|p| p.published_port.map(|n| host_port(p.protocol, n)))
            .collect(),
    }
}

/// A node port as the placement engine keys it: (UDP, number).
fn host_port(protocol: hive_api::Protocol, port: u16) -> (bool, u16) {
    (protocol == hive_api::Protocol::Udp, port)
}

/// `n` as the placement engine sees it; `lease_age` is how long ago this scheduler saw its
/// lease renewed, on its own clock (see [`LeaseAges`]).
fn node_info(n: &Node, lease_age: Duration) -> NodeInfo {
    let fresh = n.status.lease_renewed_at.is_some() && lease_age < LEASE_TIMEOUT;
    NodeInfo {
        name: n.name.clone(),
        allocatable: Resources {
            cpu_millis: n.status.allocatable.cpu_millis,
            memory_bytes: n.status.allocatable.memory_bytes,
            network_bps: n.status.allocatable.network_bps,
        },
        labels: n.labels.clone(),
        ready: n.status.ready && fresh,
        unschedulable: n.spec.unschedulable,
        tenant: n.spec.tenant.clone(),
        shared: n.spec.shared,
        listening: {
            let mut l: Vec<(bool, u16)> = n
                .status
                .listening
                .iter()
                .map(|p| host_port(p.protocol, p.port))
                .collect();
            l.sort_unstable();
            l
        },
    }
}

#[derive(Debug)]
enum Change {
    Node(String),
    Instance(String, String),
    /// The live tenants and their scheduling weights.
    Tenants(Vec<(String, u32)>),
    /// A node for an instance about to be created ([`Placer::reserve`]).
    Reserve {
        key: Key,
        inst: Box<Instance>,
        reply: oneshot::Sender<Option<String>>,
    },
    /// A reservation whose instance was not created ([`Placer::release`]).
    Release(Key),
}

impl Scheduler {
    /// `client` must act as the platform admin.
    pub fn new(client: Client) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            client,
            pool_grace: DEFAULT_POOL_GRACE,
            tx,
            rx,
        }
    }

    /// A handle the service controller places instances through as it creates them.
    pub fn placer(&self) -> Placer {
        Placer {
            tx: self.tx.clone(),
        }
    }

    /// How long a node bound from the pool may run nothing before it goes back to the pool.
    pub fn with_pool_grace(mut self, grace: Duration) -> Self {
        self.pool_grace = grace;
        self
    }

    pub async fn run(self) {
        let Self {
            client,
            pool_grace,
            tx,
            mut rx,
        } = self;
        let mut st = State::new(pool_grace);
        let nodes: Store<Node> = Arc::new(Mutex::new(BTreeMap::new()));
        let (ntx, mut nrx) = mpsc::unbounded_channel();
        let (nodes_synced, ready) = watch::channel(false);
        st.synced.insert(String::new(), ready);
        let mut tasks: Vec<JoinHandle<()>> = vec![tokio::spawn(reflect_synced(
            client.clone(),
            None,
            nodes.clone(),
            ntx,
            nodes_synced,
        ))];
        let fwd = tx.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(n) = nrx.recv().await {
                if fwd.send(Change::Node(n)).is_err() {
                    return;
                }
            }
        }));
        tasks.push(tokio::spawn(watch_tenants(client.clone(), tx.clone())));
        let mut workers: HashMap<String, JoinHandle<()>> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            // While work is queued, changes are only picked up between batches (not waited
            // for): a tenant's new instance joins the queue after at most one batch, however
            // long the queue.
            let busy = st.complete() && !st.queue.is_empty();
            let (change, ticked) = if busy {
                match rx.try_recv() {
                    Ok(c) => (Some(c), false),
                    Err(mpsc::error::TryRecvError::Empty) => (None, false),
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                }
            } else {
                tokio::select! {
                    c = rx.recv() => match c { Some(c) => (Some(c), false), None => break },
                    _ = tick.tick() => (None, true),
                }
            };
            let mut changes: Vec<Change> = change.into_iter().collect();
            while let Ok(c) = rx.try_recv() {
                changes.push(c);
            }
            // A tick re-reads leases: their expiry is a change nobody writes.
            let mut nodes_changed = ticked;
            for c in changes {
                match c {
                    Change::Node(name) => {
                        nodes_changed = true;
                        match nodes.lock().await.get(&name).cloned() {
                            Some(n) => {
                                let age = st.leases.age(&n, Instant::now());
                                st.cluster.upsert_node(node_info(&n, age));
                                st.nodes.insert(name, n);
                            }
                            None => {
                                st.cluster.remove_node(&name);
                                st.leases.retain(|n| n != name);
                                st.nodes.remove(&name);
                            }
                        }
                    }
                    Change::Tenants(weighted) => {
                        let mut live = Vec::with_capacity(weighted.len());
                        for (t, w) in weighted {
                            st.queue.set_weight(&t, w);
                            live.push(t);
                        }
                        workers.retain(|t, h| {
                            let keep = live.contains(t) && !h.is_finished();
                            if !keep {
                                h.abort();
                            }
                            keep
                        });
                        st.discovered = true;
                        st.instances.retain(|t, _| live.contains(t));
                        st.synced.retain(|t, _| t.is_empty() || live.contains(t));
                        for t in live {
                            if workers.contains_key(&t) {
                                continue;
                            }
                            let store: Store<Instance> = Arc::new(Mutex::new(BTreeMap::new()));
                            st.instances.insert(t.clone(), store.clone());
                            let (synced, ready) = watch::channel(false);
                            st.synced.insert(t.clone(), ready);
                            let (itx, mut irx) = mpsc::unbounded_channel();
                            let fwd = tx.clone();
                            let tenant = t.clone();
                            let client = client.clone();
                            workers.insert(
                                t.clone(),
                                tokio::spawn(async move {
                                    let r = tokio::spawn(reflect_synced(
                                        client,
                                        Some(tenant.clone()),
                                        store,
                                        itx,
                                        synced,
                                    ));
                                    while let Some(name) = irx.recv().await {
                                        if fwd.send(Change::Instance(tenant.clone(), name)).is_err()
                                        {
                                            break;
                                        }
                                    }
                                    r.abort();
                                }),
                            );
                        }
                    }
                    Change::Instance(tenant, name) => st.observe(&tenant, &name).await,
                    Change::Reserve { key, inst, reply } => {
                        let node = st.reserve(key.clone(), &inst);
                        // The controller stopped waiting: it creates the instance unplaced.
                        if reply.send(node.clone()).is_err() && node.is_some() {
                            st.release_reserved(&key).await;
                        }
                    }
                    Change::Release(key) => st.release_reserved(&key).await,
                }
            }
            if !st.scheduled.is_empty() {
                // Written beside the loop (a reservation asked meanwhile is not kept waiting),
                // and after the starts they record have their own writes in.
                let (events, client) = (std::mem::take(&mut st.scheduled), client.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(EVENT_DELAY).await;
                    join_all(events.iter().map(|(t, ev)| create(&client, t, ev))).await;
                });
            }
            if ticked {
                st.expire_reservations(Instant::now()).await;
            }
            if nodes_changed {
                let now = Instant::now();
                for n in st.nodes.values() {
                    st.cluster.upsert_node(node_info(n, st.leases.age(n, now)));
                }
                for (key, priority) in std::mem::take(&mut st.waiting) {
                    st.enqueue(key, priority);
                }
            }
            if st.complete() {
                st.place_batch(&client).await;
                if ticked {
                    st.return_idle_nodes(&client).await;
                }
            }
        }
        for t in tasks.into_iter().chain(workers.into_values()) {
            t.abort();
        }
    }
}

/// Forwards the live tenants and their weights on start and whenever one comes, goes or
/// changes.
async fn watch_tenants(client: Client, tx: mpsc::UnboundedSender<Change>) {
    loop {
        let Ok(list) = client.list::<Tenant>(None).await else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let mut live: BTreeMap<String, u32> = list
            .items
            .iter()
            .map(|t| (t.name.clone(), t.scheduling_weight()))
            .collect();
        let send = |live: &BTreeMap<String, u32>| {
            tx.send(Change::Tenants(
                live.iter().map(|(t, w)| (t.clone(), *w)).collect(),
            ))
        };
        if send(&live).is_err() {
            return;
        }
        let Ok(mut stream) = client.watch::<Tenant>(None, Some(list.revision)).await else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        while let Some(Ok(ev)) = stream.next().await {
            match (ev.type_, ev.object) {
                (WatchEventType::Added | WatchEventType::Modified, Some(t)) => {
                    let w = t.scheduling_weight();
                    if live.insert(t.name, w) == Some(w) {
                        continue;
                    }
                }
                (WatchEventType::Deleted, Some(t)) => {
                    live.remove(&t.name);
                }
                (WatchEventType::Error, _) => break,
                _ => continue,
            }
            if send(&live).is_err() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The pending reason for a binding the server refused because of the instance's network.
fn network_reason(e: &hive_client::ClientError) -> Option<&'static str> {
    let hive_client::ClientError::Api { body, .. } = e else {
        return None;
    };
    match body.code {
        ErrorCode::AddressExhausted => Some("NetworkFull"),
        ErrorCode::AddressInUse => Some("AddressInUse"),
        ErrorCode::NotFound if body.message.starts_with("network ") => Some("NetworkNotFound"),
        ErrorCode::Conflict if body.message.starts_with("network ") => Some("NetworkDeleting"),
        ErrorCode::Invalid => Some("InvalidNetwork"),
        _ => None,
    }
}

/// The `Scheduled` Event of instance `name` placed on `node`.
fn scheduled_event(name: &str, node: &str, binds_tenant: bool) -> hive_api::Event {
    let message = format!(
        "instance {name} placed on node {node}{}",
        if binds_tenant {
            " (taken from the pool for this tenant)"
        } else {
            ""
        }
    );
    new_event(
        EventType::Normal,
        SOURCE,
        "Scheduled",
        "instance",
        name,
        message,
    )
}

/// One placed instance whose binding is being written.
struct Bind {
    key: Key,
    inst: Instance,
    req: Request,
    placement: Placement,
}

impl State {
    fn enqueue(&mut self, key: Key, priority: i32) {
        if self.queued.insert(key.clone()) {
            self.queue.push(&key.0, priority, key.1);
        }
    }

    /// Queues again every instance that waits (something changed that may let it fit).
    fn retry_waiting(&mut self) {
        for (k, priority) in std::mem::take(&mut self.waiting) {
            self.enqueue(k, priority);
        }
    }

    /// Brings the accounting in line with instance `name` of `tenant` and queues it if pending.
    async fn observe(&mut self, tenant: &str, name: &str) {
        let key = (tenant.to_owned(), name.to_owned());
        let current = match self.instances.get(tenant) {
            Some(s) => s.lock().await.get(name).cloned(),
            None => None,
        };
        let now_on = current.as_ref().and_then(|i| i.spec.node.clone());
        // A reserved instance seen created where it was placed: its placement is done.
        if current.is_some()
            && self.reserved.remove(&key).is_some()
            && let Some((node, _)) = self.placed.get(&key)
            && now_on.as_ref() == Some(node)
        {
            let ev = scheduled_event(name, node, false);
            self.scheduled.push((tenant.to_owned(), ev));
        }
        if let Some((node, req)) = self.placed.get(&key).cloned()
            && Some(&node) != now_on.as_ref()
        {
            self.cluster.release(&node, &req);
            self.placed.remove(&key);
            // Capacity was freed: what waits may fit now.
            self.retry_waiting();
        }
        match (current, now_on) {
            (Some(i), Some(node)) => {
                self.reported.forget(&key);
                if !self.placed.contains_key(&key) {
                    let req = request(tenant, &i);
                    self.cluster.add_placed(&node, &req);
                    self.placed.insert(key, (node, req));
                }
            }
            (Some(i), None) => {
                if !self.waiting.contains_key(&key) {
                    self.enqueue(key, i.spec.template.priority);
                }
            }
            (None, _) => {
                self.waiting.remove(&key);
                self.reported.forget(&key);
                self.reserved.remove(&key);
            }
        }
    }

    /// Places `inst` of `tenant` (`key`) at once for the service controller about to create
    /// it, when nothing is queued (nobody is served out of turn; an instance waiting for
    /// room is not queued, and would not be served first either) and the place takes no node
    /// from the pool: the node, counted as used from now on.
    fn reserve(&mut self, key: Key, inst: &Instance) -> Option<String> {
        if !self.complete() || !self.queue.is_empty() || self.placed.contains_key(&key) {
            return None;
        }
        let req = request(&key.0, inst);
        let p = self.cluster.place(&req).ok()?;
        if p.binds_tenant {
            self.cluster.release(&p.node, &req);
            self.cluster.unbind_if_empty(&p.node);
            return None;
        }
        self.reserved.insert(key.clone(), Instant::now());
        self.placed.insert(key, (p.node.clone(), req));
        Some(p.node)
    }

    /// Gives back the node reserved for `key` unless its instance exists after all (a
    /// create whose answer was lost): that one's watch event settles it.
    async fn release_reserved(&mut self, key: &Key) {
        if self.reserved.remove(key).is_none() {
            return;
        }
        let exists = match self.instances.get(&key.0) {
            Some(s) => s.lock().await.contains_key(&key.1),
            None => false,
        };
        if !exists && let Some((node, req)) = self.placed.remove(key) {
            self.cluster.release(&node, &req);
            self.retry_waiting();
        }
    }

    /// Releases the reservations whose instances were not seen within [`RESERVATION_TTL`].
    async fn expire_reservations(&mut self, now: Instant) {
        let due: Vec<Key> = self
            .reserved
            .iter()
            .filter(|(_, at)| now.duration_since(**at) >= RESERVATION_TTL)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            self.release_reserved(&key).await;
        }
    }

    /// Places the next batch of what is queued, tenant by tenant in turn, and writes the
    /// bindings. The loop calls it again (after taking in changes) while the queue is not empty.
    async fn place_batch(&mut self, client: &Client) {
        let mut batch: Vec<Bind> = Vec::new();
        while batch.len() < BIND_BATCH {
            let Some((tenant, name)) = self.queue.pop() else {
                break;
            };
            let key = (tenant.clone(), name.clone());
            self.queued.remove(&key);
            let Some(store) = self.instances.get(&tenant) else {
                continue;
            };
            let Some(inst) = store.lock().await.get(&name).cloned() else {
                continue;
            };
            if inst.spec.node.is_some() || self.placed.contains_key(&key) {
                continue;
            }
            let req = request(&tenant, &inst);
            match self.cluster.place(&req) {
                Ok(placement) => batch.push(Bind {
                    key,
                    inst,
                    req,
                    placement,
                }),
                Err(why) => {
                    self.waiting.insert(key, inst.spec.template.priority);
                    self.pending(client, &tenant, &inst, "Unschedulable", why.to_string())
                        .await;
                }
            }
        }
        if !batch.is_empty() {
            self.bind(client, batch).await;
        }
    }

    /// Writes a batch of bindings at once and settles each outcome.
    async fn bind(&mut self, client: &Client, batch: Vec<Bind>) {
        let written = join_all(batch.iter().map(|b| {
            let mut bound = b.inst.clone();
            bound.spec.node = Some(b.placement.node.clone());
            async move { client.update(Some(&b.key.0), &bound).await }
        }))
        .await;
        // Pool nodes this batch took, per tenant: bound for real only if something stays.
        let mut taken: BTreeMap<String, String> = BTreeMap::new();
        let mut scheduled = Vec::new();
        for (b, result) in batch.into_iter().zip(written) {
            let Bind {
                key,
                inst,
                req,
                placement: p,
            } = b;
            let (tenant, name) = &key;
            if p.binds_tenant {
                taken.insert(p.node.clone(), tenant.clone());
            }
            match result {
                Ok(written) => {
                    if let Some(store) = self.instances.get(tenant) {
                        keep_written(store, written, false).await;
                    }
                    self.reported.forget(&key);
                    let ev = scheduled_event(name, &p.node, p.binds_tenant);
                    scheduled.push((tenant.clone(), ev));
                    self.placed.insert(key, (p.node, req));
                }
                Err(e) => {
                    self.cluster.release(&p.node, &req);
                    tracing::debug!(%tenant, instance = %name, error = %e, "bind");
                    // The network has no place for it: it waits, saying why.
                    if let Some(reason) = network_reason(&e) {
                        self.waiting
                            .insert(key.clone(), inst.spec.template.priority);
                        let message = match &e {
                            hive_client::ClientError::Api { body, .. } => body.message.clone(),
                            other => other.to_string(),
                        };
                        self.pending(client, tenant, &inst, reason, message).await;
                    } else if !matches!(e.code(), Some(ErrorCode::Conflict | ErrorCode::NotFound)) {
                        // Refused for a passing reason (the store unavailable, a lost
                        // connection): no new version will come to queue it again, so it
                        // waits for the next tick.
                        self.waiting.insert(key, inst.spec.template.priority);
                    }
                    // Changed or gone meanwhile: the watch brings the new version, which is
                    // queued again if still pending.
                }
            }
        }
        for (node, tenant) in taken {
            if self.cluster.instances_on(&node).unwrap_or(0) > 0 {
                self.bind_node(client, &node, &tenant).await;
            } else {
                self.cluster.unbind_if_empty(&node);
            }
        }
        join_all(
            scheduled
                .iter()
                .map(|(tenant, ev)| create(client, tenant, ev)),
        )
        .await;
    }

    /// Records why a pending instance waits: its status (when reason or message changed) and
    /// a `FailedScheduling` Event (once per distinct message).
    async fn pending(
        &mut self,
        client: &Client,
        tenant: &str,
        inst: &Instance,
        reason: &str,
        message: String,
    ) {
        let key = (tenant.to_owned(), inst.name.clone());
        if self.reported.first(key, &message) {
            let ev = new_event(
                EventType::Warning,
                SOURCE,
                "FailedScheduling",
                "instance",
                &inst.name,
                format!("{reason}: {message}"),
            );
            create(client, tenant, &ev).await;
        }
        if inst.status.reason == reason && inst.status.message == message {
            return;
        }
        let mut pending = inst.clone();
        pending.status.reason = reason.into();
        pending.status.message = message;
        if let Ok(written) = client.update_status(Some(tenant), &pending).await
            && let Some(store) = self.instances.get(tenant)
        {
            keep_written(store, written, false).await;
        }
    }

    /// Binds pool node `node` to `tenant`, labelled as bound by the scheduler.
    async fn bind_node(&mut self, client: &Client, node: &str, tenant: &str) {
        for _ in 0..5 {
            let Ok(mut n) = client.get::<Node>(None, node).await else {
                return;
            };
            n.spec.tenant = Some(tenant.to_owned());
            n.labels
                .insert(POOL_BOUND_LABEL.to_owned(), tenant.to_owned());
            match client.update(None, &n).await {
                Ok(written) => {
                    self.nodes.insert(node.to_owned(), written);
                    return;
                }
                Err(e) if e.code() == Some(ErrorCode::Conflict) => continue,
                Err(e) => {
                    tracing::warn!(%node, %tenant, error = %e, "bind node to tenant");
                    return;
                }
            }
        }
    }

    /// Returns to the pool every node the scheduler bound that has run nothing for the grace.
    async fn return_idle_nodes(&mut self, client: &Client) {
        let now = Instant::now();
        let mut eligible = HashSet::new();
        for (name, n) in &self.nodes {
            if bound_from_pool(n) {
                let has = occupancy(self.cluster.instances_on(name), n);
                self.pool.observe(name, has, now);
                eligible.insert(name.clone());
            }
        }
        let gone: Vec<String> = self
            .nodes
            .keys()
            .filter(|n| !eligible.contains(*n))
            .cloned()
            .collect();
        for n in gone {
            self.pool.forget(&n);
        }
        for node in self.pool.due(now) {
            if !eligible.contains(&node) {
                self.pool.forget(&node);
                continue;
            }
            self.unbind_node(client, &node).await;
        }
    }

    /// Writes `spec.tenant = None` (and drops the label) on `node`, under its revision; if
    /// it changed meanwhile, reads it again and re-checks that it is still the scheduler's
    /// and empty (no instance, no container reported).
    async fn unbind_node(&mut self, client: &Client, node: &str) {
        let Some(mut n) = self.nodes.get(node).cloned() else {
            return;
        };
        for _ in 0..3 {
            if !bound_from_pool(&n) || !occupancy(self.cluster.instances_on(node), &n).empty() {
                self.pool.forget(node);
                return;
            }
            let tenant = n.spec.tenant.clone().unwrap_or_default();
            let mut back = n.clone();
            back.spec.tenant = None;
            back.labels.remove(POOL_BOUND_LABEL);
            match client.update(None, &back).await {
                Ok(written) => {
                    let age = self.leases.age(&written, Instant::now());
                    self.cluster.upsert_node(node_info(&written, age));
                    self.cluster.unbind_if_empty(node);
                    self.nodes.insert(node.to_owned(), written);
                    self.pool.forget(node);
                    tracing::info!(%node, %tenant, "node returned to the pool");
                    let ev = new_event(
                        EventType::Normal,
                        SOURCE,
                        "NodeReturned",
                        "node",
                        node,
                        format!(
                            "node {node} returned to the pool after {} s without instances or containers",
                            self.pool.grace().as_secs()
                        ),
                    );
                    create(client, &tenant, &ev).await;
                    // A free pool node may let waiting instances of other tenants in.
                    self.retry_waiting();
                    return;
                }
                Err(e) if e.code() == Some(ErrorCode::Conflict) => {
                    match client.get::<Node>(None, node).await {
                        Ok(fresh) => n = fresh,
                        Err(_) => return,
                    }
                }
                Err(e) => {
                    tracing::warn!(%node, error = %e, "return node to the pool");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_nodes_the_scheduler_bound_may_go_back_to_the_pool() {
        let mut n = Node {
            name: "n1".into(),
            ..Default::default()
        };
        assert!(!bound_from_pool(&n), "a pool node is not bound");
        n.spec.tenant = Some("a".into());
        assert!(!bound_from_pool(&n), "bound by the operator: no label");
        n.labels.insert(POOL_BOUND_LABEL.into(), "b".into());
        assert!(
            !bound_from_pool(&n),
            "the operator moved it to another tenant"
        );
        n.labels.insert(POOL_BOUND_LABEL.into(), "a".into());
        assert!(bound_from_pool(&n));
    }

    #[test]
    fn a_node_is_empty_only_without_instances_and_without_containers_of_any_tenant() {
        let mut n = Node {
            name: "n1".into(),
            ..Default::default()
        };
        assert!(occupancy(Some(0), &n).empty());
        assert!(
            !occupancy(None, &n).empty(),
            "a node the cluster does not know"
        );
        assert!(!occupancy(Some(1), &n).empty());
        n.status.containers.insert("red".into(), 2);
        n.status.containers.insert("blue".into(), 1);
        assert_eq!(occupancy(Some(0), &n).containers, 3);
        assert!(!occupancy(Some(0), &n).empty());
    }

    #[tokio::test]
    async fn pending_instances_are_queued_by_their_priority_within_the_tenant() {
        let mut st = State::new(DEFAULT_POOL_GRACE);
        let store: Store<Instance> = Arc::new(Mutex::new(BTreeMap::new()));
        for (name, priority) in [("batch", -10), ("plain", 0), ("web", 100), ("db", 100)] {
            let mut i = Instance {
                name: name.into(),
                ..Default::default()
            };
            i.spec.template.priority = priority;
            store.lock().await.insert(name.into(), i);
        }
        st.instances.insert("t".into(), store);
        for name in ["batch", "plain", "web", "db"] {
            st.observe("t", name).await;
        }
        let order: Vec<String> = std::iter::from_fn(|| st.queue.pop().map(|(_, n)| n)).collect();
        assert_eq!(order, ["web", "db", "plain", "batch"]);
    }
}
