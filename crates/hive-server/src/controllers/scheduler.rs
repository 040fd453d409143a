//! The scheduler loop: places pending instances on nodes. An API client like the other
//! controllers: it caches nodes and every tenant's instances (list + watch), queues pending
//! instances per tenant ([`FairQueue`]: tenants served in turn, so one tenant's burst does
//! not delay another), places each with [`Cluster`], and binds it by writing `spec.node` under
//! the instance's revision (compare-and-swap: a concurrent change re-queues it, nothing is
//! ever placed twice). A node taken from the shared pool is bound to the tenant (`spec.tenant`
//! of the Node). An instance no node can take gets status reason `Unschedulable` with every
//! node's reason counted, and is retried when the nodes change.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use hive_api::{ErrorCode, Instance, Node};
use hive_client::Client;
use hive_scheduler::{Cluster, FairQueue, NodeInfo, Request, Resources};
use tokio::sync::{Mutex, mpsc, watch};
use tokio::task::JoinHandle;

use hive_client::reflector::{Store, reflect_synced, tenant_names};

/// A node whose lease is older than this is not ready.
pub const LEASE_TIMEOUT: Duration = Duration::from_secs(15);

type Key = (String, String);

#[derive(Clone, Debug)]
pub struct Scheduler {
    client: Client,
}

/// What the loop knows; one task owns it.
struct State {
    cluster: Cluster,
    nodes: BTreeMap<String, Node>,
    /// Instances the cluster accounts for, and where.
    placed: HashMap<Key, (String, Request)>,
    queue: FairQueue<String>,
    queued: HashSet<Key>,
    /// Pending instances no node could take: retried when nodes change.
    waiting: HashSet<Key>,
    instances: HashMap<String, Store<Instance>>,
    /// Whether each cache holds a complete list yet (nodes under the empty name), and
    /// whether the tenants were listed: nothing is placed before, or nodes would be
    /// filled past what they hold.
    synced: HashMap<String, watch::Receiver<bool>>,
    discovered: bool,
}

impl State {
    fn complete(&self) -> bool {
        self.discovered && self.synced.values().all(|r| *r.borrow())
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
            .filter_map(|p| {
                p.published_port
                    .map(|n| (p.protocol == hive_api::Protocol::Udp, n))
            })
            .collect(),
    }
}

fn node_info(n: &Node) -> NodeInfo {
    let fresh = n
        .status
        .lease_renewed_at
        .is_some_and(|t| (Utc::now() - t).to_std().unwrap_or_default() < LEASE_TIMEOUT);
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
    }
}

enum Change {
    Node(String),
    Instance(String, String),
    Tenants(Vec<String>),
}

impl Scheduler {
    /// `client` must act as the platform admin.
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    pub async fn run(self) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Change>();
        let mut st = State {
            cluster: Cluster::new(),
            nodes: BTreeMap::new(),
            placed: HashMap::new(),
            queue: FairQueue::new(),
            queued: HashSet::new(),
            waiting: HashSet::new(),
            instances: HashMap::new(),
            synced: HashMap::new(),
            discovered: false,
        };
        let nodes: Store<Node> = Arc::new(Mutex::new(BTreeMap::new()));
        let (ntx, mut nrx) = mpsc::unbounded_channel();
        let (nodes_synced, ready) = watch::channel(false);
        st.synced.insert(String::new(), ready);
        let mut tasks: Vec<JoinHandle<()>> = vec![tokio::spawn(reflect_synced(
            self.client.clone(),
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
        tasks.push(tokio::spawn(watch_tenants(self.client.clone(), tx.clone())));
        let mut workers: HashMap<String, JoinHandle<()>> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            let change = tokio::select! {
                c = rx.recv() => match c { Some(c) => Some(c), None => break },
                _ = tick.tick() => None,
            };
            let mut changes: Vec<Change> = change.into_iter().collect();
            while let Ok(c) = rx.try_recv() {
                changes.push(c);
            }
            // A tick (no change) re-reads leases: their expiry is a change nobody writes.
            let mut nodes_changed = changes.is_empty();
            for c in changes {
                match c {
                    Change::Node(name) => {
                        nodes_changed = true;
                        match nodes.lock().await.get(&name).cloned() {
                            Some(n) => {
                                st.cluster.upsert_node(node_info(&n));
                                st.nodes.insert(name, n);
                            }
                            None => {
                                st.cluster.remove_node(&name);
                                st.nodes.remove(&name);
                            }
                        }
                    }
                    Change::Tenants(live) => {
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
                            let client = self.client.clone();
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
                }
            }
            if nodes_changed {
                for n in st.nodes.values() {
                    st.cluster.upsert_node(node_info(n));
                }
                for key in std::mem::take(&mut st.waiting) {
                    st.enqueue(key);
                }
            }
            if st.complete() {
                st.drain(&self.client).await;
            }
        }
        for t in tasks.into_iter().chain(workers.into_values()) {
            t.abort();
        }
    }
}

/// Forwards the live tenant list on start and whenever tenants come or go.
async fn watch_tenants(client: Client, tx: mpsc::UnboundedSender<Change>) {
    let (ttx, mut trx) = mpsc::unbounded_channel();
    let names = tokio::spawn(tenant_names(client, ttx));
    while let Some(live) = trx.recv().await {
        if tx.send(Change::Tenants(live)).is_err() {
            break;
        }
    }
    names.abort();
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

impl State {
    fn enqueue(&mut self, key: Key) {
        if self.queued.insert(key.clone()) {
            self.queue.push(&key.0, 0, key.1);
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
        if let Some((node, req)) = self.placed.get(&key).cloned()
            && Some(&node) != now_on.as_ref()
        {
            self.cluster.release(&node, &req);
            self.placed.remove(&key);
            // Capacity was freed: what waits may fit now.
            for k in std::mem::take(&mut self.waiting) {
                self.enqueue(k);
            }
        }
        match (current, now_on) {
            (Some(i), Some(node)) => {
                if !self.placed.contains_key(&key) {
                    let req = request(tenant, &i);
                    self.cluster.add_placed(&node, &req);
                    self.placed.insert(key, (node, req));
                }
            }
            (Some(_), None) => {
                if !self.waiting.contains(&key) {
                    self.enqueue(key);
                }
            }
            (None, _) => {
                self.waiting.remove(&key);
            }
        }
    }

    /// Places everything queued, tenant by tenant in turn.
    async fn drain(&mut self, client: &Client) {
        while let Some((tenant, name)) = self.queue.pop() {
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
                Ok(p) => {
                    let mut bound = inst.clone();
                    bound.spec.node = Some(p.node.clone());
                    match client.update(Some(&tenant), &bound).await {
                        Ok(written) => {
                            self.placed.insert(key, (p.node.clone(), req));
                            store.lock().await.insert(name, written);
                            if p.binds_tenant {
                                self.bind_node(client, &p.node, &tenant).await;
                            }
                        }
                        Err(e) => {
                            // Changed or gone meanwhile: undo the reservation; the watch brings
                            // the new version, which is queued again if still pending.
                            self.cluster.release(&p.node, &req);
                            if p.binds_tenant {
                                self.cluster.unbind_if_empty(&p.node);
                            }
                            tracing::debug!(%tenant, instance = %name, error = %e, "bind");
                            // The network has no place for it: it waits, saying why.
                            if let Some(reason) = network_reason(&e) {
                                self.waiting.insert(key);
                                let message = match &e {
                                    hive_client::ClientError::Api { body, .. } => {
                                        body.message.clone()
                                    }
                                    other => other.to_string(),
                                };
                                self.pending(client, &tenant, &inst, reason, message).await;
                            }
                        }
                    }
                }
                Err(why) => {
                    self.waiting.insert(key);
                    self.pending(client, &tenant, &inst, "Unschedulable", why.to_string())
                        .await;
                }
            }
        }
    }

    /// Records why a pending instance waits (once per distinct reason and message).
    async fn pending(
        &mut self,
        client: &Client,
        tenant: &str,
        inst: &Instance,
        reason: &str,
        message: String,
    ) {
        if inst.status.reason == reason && inst.status.message == message {
            return;
        }
        let mut pending = inst.clone();
        pending.status.reason = reason.into();
        pending.status.message = message;
        if let Ok(written) = client.update_status(Some(tenant), &pending).await
            && let Some(store) = self.instances.get(tenant)
        {
            store.lock().await.insert(inst.name.clone(), written);
        }
    }

    async fn bind_node(&mut self, client: &Client, node: &str, tenant: &str) {
        for _ in 0..5 {
            let Ok(mut n) = client.get::<Node>(None, node).await else {
                return;
            };
            n.spec.tenant = Some(tenant.to_owned());
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
}
