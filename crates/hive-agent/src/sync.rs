//! The agent's sync loop: run the instances the scheduler placed on this node, and report
//! how they are doing.
//!
//! It caches every tenant's instances (list + watch; an instance's key is its uid) and, on
//! every change and every tick, compares what should run here (instances whose `spec.node` is
//! this node) with the containers that exist (directories of the container root, named by
//! uid): start what is missing (pull, compose the rootfs, write the spec, start under a
//! supervisor), report `Running` with the pid, apply the restart policy to what exited, and
//! stop and remove what is no longer wanted. Everything it needs survives a restart of the
//! agent on disk, so a new agent picks up where the old one was: the containers (each under
//! its supervisor) and, through [`crate::resume`], each tenant's instance cache and its
//! revision, from which the new agent's watch resumes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hive_api::{
    Instance, InstancePhase, Node, PullPolicy, ResourceUsage, RestartPolicy, SecurityGroup, Service,
};
use hive_client::Client;
use hive_client::reflector::{
    Cursor, Saved, Store, reflect, reflect_resumable, reflect_synced, tenant_names,
};
use tokio::sync::{Mutex, mpsc, watch};
use tokio::task::JoinHandle;

use crate::image::{ImageStore, StoreConfig};
use crate::known::Known;
use crate::network::{NetConfig, NetState};
use crate::node::Held;
use crate::probe::{self, Probes};
use crate::resume::{self, Report};
use crate::runtime::spec::{self, ContainerConfig, ImageProcess, Limits, ProcessOverride};
use crate::runtime::{ContainerState, Containers};

/// Containers started at once (pull, unpack, runtime): the hosts have two cores.
pub const PARALLEL_STARTS: usize = 4;

/// How often a tenant's instance cache is saved while only statuses change. A change of the
/// instances bound here is saved at once, in the pass that acts on it.
pub const SAVE_EVERY: Duration = Duration::from_secs(5);

/// How the agent runs.
#[derive(Clone, Debug)]
pub struct SyncConfig {
    pub node: String,
    /// How often everything is compared even without a change (exits are seen this way).
    pub resync: Duration,
    /// Grace period of a stop before SIGKILL.
    pub stop_grace: Duration,
    /// Tenant networks on this node; none: containers get an empty network namespace.
    pub net: Option<NetConfig>,
    /// How often a running container's resource use is read into its status.
    pub usage_every: Duration,
    /// Bytes of unpacked layers the image store keeps (least recently used unused images
    /// beyond it are removed).
    pub image_budget: u64,
    /// How often the image store is collected.
    pub image_gc_every: Duration,
    /// Where each tenant's instance cache is saved to resume from after a restart (see
    /// [`crate::resume`]); None: never saved, every start lists.
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("open the image store in {path}: {source}")]
    Images {
        path: PathBuf,
        source: Box<crate::image::ImageError>,
    },
}

/// Both ends of a channel the loop's own tasks report on.
type Channel<T> = (mpsc::UnboundedSender<T>, mpsc::UnboundedReceiver<T>);

/// The desired instances, by uid: (tenant, instance).
type Wanted = BTreeMap<String, (String, Instance)>;

/// Every tenant's security groups.
pub type Groups = HashMap<String, Vec<SecurityGroup>>;

/// One tenant's instance cache as one pass saw it, for [`crate::resume`].
struct TenantView {
    /// The revision the cache is at, and how it started.
    cursor: Cursor,
    /// The uids of its instances bound here.
    bound: BTreeSet<String>,
    /// What to save, when a save is due.
    save: Option<Vec<Instance>>,
}

/// What was last saved of a tenant's cache.
struct SaveMark {
    revision: u64,
    bound: BTreeSet<String>,
    at: Instant,
}

pub struct Agent {
    client: Client,
    cfg: SyncConfig,
    images: Arc<ImageStore>,
    containers: Containers,
    /// When a failed start may be tried again, and how many times it failed.
    backoff: HashMap<String, (Instant, u32)>,
    /// Containers being started by their own task (at most [`PARALLEL_STARTS`] at once);
    /// each reports on `started` (with whether it worked) when done.
    starting: HashSet<String>,
    /// Starts over: the container, whether it started, and its first usage sample.
    started: Channel<(String, bool, Option<ResourceUsage>)>,
    /// Containers being stopped by their own task (a grace period must not hold the loop);
    /// each reports on `stopped` when done.
    stopping: HashSet<String>,
    stopped: Channel<String>,
    /// The node's data plane, once opened.
    net: Option<Arc<hive_net::NodeNet>>,
    net_state: NetState,
    /// Service VIPs and DNS of the instances here.
    discovery: crate::discovery::ServiceState,
    /// The probes of running containers (dropping one stops its tasks); outcomes arrive on
    /// `probed`.
    probes: HashMap<String, Probes>,
    probed: Channel<probe::Outcome>,
    /// Containers being stopped because their liveness probe failed, and why.
    unhealthy: HashMap<String, String>,
    /// The last reading of each running container's resource use.
    sampled: HashMap<String, (Instant, ResourceUsage)>,
    /// What was last saved of each tenant's instance cache.
    saved: HashMap<String, SaveMark>,
    /// The saves under way (on the blocking pool), with what each records once done.
    saving: HashMap<String, (tokio::task::JoinHandle<Result<(), String>>, SaveMark)>,
    /// The catch-up report last written.
    report: BTreeMap<String, Report>,
    /// The tenant of each container here (from its instance, or its bundle).
    tenant_of: HashMap<String, String>,
    /// The containers held, per tenant, for the node's status (see [`Agent::held`]).
    held: watch::Sender<Held>,
    /// The node's containers as last read, and the ids of those whose processes ended.
    known: Known,
    ended: mpsc::UnboundedReceiver<String>,
    /// The networked instances and the services a pass last took out of the caches (see
    /// [`Shared`]).
    shared: Shared<Instance>,
    shared_services: Shared<Service>,
}

/// Copies of cached objects kept while they do not change (same uid, same revision: every
/// write gives an object a new revision), so that each pass, several per start, takes the
/// objects it needs beyond the caches' locks by reference count instead of copying every
/// one of them (every networked instance and every service of every tenant: with 100
/// containers on the node, the agent thread's CPU per start fell by a tenth).
struct Shared<R> {
    by_uid: HashMap<String, Arc<R>>,
}

impl<R> Default for Shared<R> {
    fn default() -> Self {
        Self {
            by_uid: HashMap::new(),
        }
    }
}

impl<R: Clone + hive_api::Resource> Shared<R> {
    /// The shared copy of `obj`, made again only if `obj` changed.
    fn of(&mut self, obj: &R) -> Arc<R> {
        if obj.uid().is_empty() {
            // (Every object the server made has one; without it, it could not be told apart.)
            return Arc::new(obj.clone());
        }
        match self.by_uid.get(obj.uid()) {
            Some(a) if a.revision() == obj.revision() => a.clone(),
            _ => {
                let a = Arc::new(obj.clone());
                self.by_uid.insert(obj.uid().to_owned(), a.clone());
                a
            }
        }
    }

    /// Forgets the copies of objects a pass no longer took.
    fn keep_only(&mut self, taken: &[Arc<R>]) {
        if self.by_uid.len() > taken.len() {
            let keep: HashSet<&str> = taken.iter().map(|a| a.uid()).collect();
            self.by_uid.retain(|uid, _| keep.contains(uid.as_str()));
        }
    }
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("node", &self.cfg.node)
            .finish_non_exhaustive()
    }
}

/// Where an agent keeps its state under one data dir, and how it reaches the server's
/// registry.
pub fn layout(
    data_dir: &std::path::Path,
    runtime: crate::runtime::OciRuntime,
    shim: crate::runtime::ShimCommand,
) -> (StoreConfig, Containers) {
    let mut images = StoreConfig::new(data_dir.join("images"));
    images.mount_points = crate::runtime::spec::mount_points();
    let containers = Containers::new(runtime, shim, data_dir.join(crate::datadir::CONTAINERS_DIR))
        .with_logs(data_dir.join(crate::datadir::LOGS_DIR));
    (images, containers)
}

impl Agent {
    pub fn new(
        client: Client,
        cfg: SyncConfig,
        images: StoreConfig,
        containers: Containers,
    ) -> Result<Self, SyncError> {
        let path = images.root.clone();
        let images = ImageStore::open(images).map_err(|source| SyncError::Images {
            path,
            source: Box::new(source),
        })?;
        // What the last run left is held from the start, before any cache is filled.
        let (ended_tx, ended) = mpsc::unbounded_channel();
        let known = Known::load(&containers, ended_tx);
        let mut tenant_of = HashMap::new();
        let held = count_held(&containers, &known, &HashSet::new(), &mut tenant_of);
        Ok(Self {
            client,
            cfg,
            images: Arc::new(images),
            containers,
            backoff: HashMap::new(),
            starting: HashSet::new(),
            started: mpsc::unbounded_channel(),
            stopping: HashSet::new(),
            stopped: mpsc::unbounded_channel(),
            net: None,
            net_state: NetState::default(),
            discovery: Default::default(),
            probes: HashMap::new(),
            probed: mpsc::unbounded_channel(),
            unhealthy: HashMap::new(),
            sampled: HashMap::new(),
            saved: HashMap::new(),
            saving: HashMap::new(),
            report: BTreeMap::new(),
            tenant_of,
            held: watch::Sender::new(held),
            known,
            ended,
            shared: Shared::default(),
            shared_services: Shared::default(),
        })
    }

    /// The node's containers (the agent's API serves their logs and execs).
    pub fn containers(&self) -> &Containers {
        &self.containers
    }

    /// The containers this node holds, per tenant: every container with a directory here
    /// (running, stopping, exited and not yet removed) and every one being started. Updated
    /// by the loop after each pass, start and stop; the node's lease task writes it into
    /// `status.containers`. Holds what the last run left from the moment the agent is made.
    pub fn held(&self) -> watch::Receiver<Held> {
        self.held.subscribe()
    }

    /// Counts the containers held again and publishes the count if it changed.
    fn publish_held(&mut self) {
        let now = count_held(
            &self.containers,
            &self.known,
            &self.starting,
            &mut self.tenant_of,
        );
        self.held.send_if_modified(|h| {
            let changed = *h != now;
            *h = now;
            changed
        });
    }

    /// Runs the loop until the process ends. Starts run as local tasks, on the loop's thread
    /// (the node's netlink connection and the API client's connections are driven there:
    /// a start on another runtime only waited for that thread through more wakeups).
    pub async fn run(self) {
        tokio::task::LocalSet::new()
            .run_until(self.run_local())
            .await
    }

    async fn run_local(mut self) {
        self.clear_unfinished().await;
        if let Some(cfg) = &self.cfg.net {
            match cfg.open().await {
                Ok(net) => self.net = Some(net),
                // Instances with a network place then fail to start, saying so.
                Err(e) => tracing::error!(error = %e, "open the node's tenant networks"),
            }
        }
        // The caches saved by the last run: each tenant's watch resumes from its revision.
        let saved = match &self.cfg.state_dir {
            Some(dir) => {
                let dir = dir.clone();
                let node = self.cfg.node.clone();
                tokio::task::spawn_blocking(move || resume::load_all(&dir, &node))
                    .await
                    .unwrap_or_default()
            }
            None => HashMap::new(),
        };
        for (t, s) in &saved {
            let bound = s
                .instances
                .iter()
                .filter(|i| i.spec.node.as_deref() == Some(self.cfg.node.as_str()))
                .map(|i| i.uid.clone())
                .collect();
            let at = Instant::now();
            let revision = s.revision;
            self.saved.insert(
                t.clone(),
                SaveMark {
                    revision,
                    bound,
                    at,
                },
            );
        }
        let (tx, mut rx) = mpsc::unbounded_channel::<()>();
        let caches: Arc<Mutex<Caches>> = Arc::default();
        let nodes: Store<Node> = Arc::default();
        let (ntx, mut nrx) = mpsc::unbounded_channel();
        let (nodes_synced, nodes_ready) = watch::channel(false);
        caches.lock().await.nodes = Some((nodes.clone(), nodes_ready));
        let node_poke = tx.clone();
        let reflect_nodes = tokio::spawn(reflect_synced(
            self.client.clone(),
            None,
            nodes.clone(),
            ntx,
            nodes_synced,
        ));
        let forward_nodes = tokio::spawn(async move {
            while nrx.recv().await.is_some() {
                if node_poke.send(()).is_err() {
                    break;
                }
            }
        });
        let discover = tokio::spawn(watch_tenants(
            self.client.clone(),
            caches.clone(),
            tx,
            saved,
        ));
        let mut tick = tokio::time::interval(self.cfg.resync);
        let every = self.cfg.image_gc_every;
        let mut gc_tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        gc_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // When changed service views are due (see `ServiceState::sync`); the task writing
        // them notifies once it is done if more changed meanwhile.
        let mut views_due: Option<Instant> = None;
        let more_views = self.discovery.more_due.clone();
        loop {
            let views_at = tokio::time::Instant::from_std(views_due.unwrap_or_else(Instant::now));
            tokio::select! {
                _ = gc_tick.tick() => {
                    self.collect_images().await;
                    continue;
                }
                c = rx.recv() => if c.is_none() { break },
                Some(id) = self.stopped.1.recv() => self.finish_stop(&id).await,
                Some((id, ok, usage)) = self.started.1.recv() => self.finish_start(&id, ok, usage),
                Some(o) = self.probed.1.recv() => self.record_probe(o),
                Some(id) = self.ended.recv() => self.known.touch(&self.containers, &id),
                _ = tokio::time::sleep_until(views_at), if views_due.is_some() => {}
                _ = more_views.notified() => {}
                _ = tick.tick() => {}
            }
            views_due = None;
            while let Ok(id) = self.ended.try_recv() {
                self.known.touch(&self.containers, &id);
            }
            self.known.reread_if_due(&self.containers);
            while let Ok(o) = self.probed.1.try_recv() {
                self.record_probe(o);
            }
            while rx.try_recv().is_ok() {}
            while let Ok(id) = self.stopped.1.try_recv() {
                self.finish_stop(&id).await;
            }
            while let Ok((id, ok, usage)) = self.started.1.try_recv() {
                self.finish_start(&id, ok, usage);
            }
            // Before the caches are filled too: a stop finished is reported at once.
            self.publish_held();
            // Until every tenant's instances are known, what is missing from the caches is
            // not "unwanted": nothing is compared (or removed) before.
            if let Some((wanted, all, groups, views)) = self.wanted(&caches).await {
                // The tenant this node is bound to, if any: it runs none of another's.
                let bound_to = nodes
                    .lock()
                    .await
                    .get(&self.cfg.node)
                    .and_then(|n| n.spec.tenant.clone());
                self.sync(&wanted, &all, &groups, bound_to.as_deref()).await;
                // Saved once the starts are under way, not before (it costs the whole
                // cache's encoding): a restart that resumes from an older save replays
                // what came after it, the placements of what this pass started included,
                // before it calls anything unwanted.
                self.persist(views).await;
                if let Some(net) = self.net.clone() {
                    let here = wanted.iter().map(|(id, (_, i))| (id.clone(), i)).collect();
                    let nodes = nodes.lock().await.clone();
                    let containers = self.known.ids().into_iter().collect();
                    let me = self.cfg.node.clone();
                    let seen = crate::network::Seen {
                        here: &here,
                        all: &all,
                        nodes: &nodes,
                        containers: &containers,
                        starting: &self.starting,
                        groups: &groups,
                    };
                    self.net_state.sync(&net, &me, seen).await;
                    let services = services_of(&caches, &mut self.shared_services).await;
                    views_due = self
                        .discovery
                        .sync(&net, &here, &all, &services, &self.starting);
                }
                // Starts begun by this pass count as held at once.
                self.publish_held();
            }
        }
        discover.abort();
        reflect_nodes.abort();
        forward_nodes.abort();
    }

    /// The instances placed here, every instance on a network (for the other nodes'
    /// endpoints), the security groups and each tenant's cache as seen (with what to save of
    /// it), or None while the caches are still being filled.
    async fn wanted(
        &mut self,
        caches: &Arc<Mutex<Caches>>,
    ) -> Option<(
        Wanted,
        Vec<Arc<Instance>>,
        Groups,
        BTreeMap<String, TenantView>,
    )> {
        let mut out = Wanted::new();
        let mut networked = Vec::new();
        let mut groups = Groups::new();
        let mut views = BTreeMap::new();
        type Stores = Vec<(
            String,
            Store<Instance>,
            watch::Receiver<Cursor>,
            Store<SecurityGroup>,
        )>;
        let stores: Stores = {
            let c = caches.lock().await;
            if !c.discovered
                || c.tenants
                    .values()
                    .any(|t| !*t.synced.borrow() || !*t.groups_synced.borrow())
                || c.nodes
                    .as_ref()
                    .is_some_and(|(_, synced)| !*synced.borrow())
            {
                return None;
            }
            c.tenants
                .iter()
                .map(|(t, c)| {
                    let cursor = c.cursor.clone();
                    (t.clone(), c.instances.clone(), cursor, c.groups.clone())
                })
                .collect()
        };
        let me = Some(self.cfg.node.as_str());
        for (tenant, store, cursor, group_store) in stores {
            let g: Vec<SecurityGroup> = group_store.lock().await.values().cloned().collect();
            if !g.is_empty() {
                groups.insert(tenant.clone(), g);
            }
            let store = store.lock().await;
            // Read under the store's lock: the revision matches the contents.
            let cursor = cursor.borrow().clone();
            let mut bound = BTreeSet::new();
            for i in store.values() {
                if i.spec.node.as_deref() == me && !i.uid.is_empty() {
                    out.insert(i.uid.clone(), (tenant.clone(), i.clone()));
                    bound.insert(i.uid.clone());
                }
                if i.spec.network.is_some() && self.net.is_some() {
                    networked.push(self.shared.of(i));
                }
            }
            let due = self.cfg.state_dir.is_some()
                && cursor.revision > 0
                && !self.saving.contains_key(&tenant)
                && self.saved.get(&tenant).is_none_or(|m| {
                    m.bound != bound
                        || (m.revision != cursor.revision && m.at.elapsed() >= SAVE_EVERY)
                });
            // What a restart needs: its instances, and those on networks (endpoints).
            let save = due.then(|| {
                store
                    .values()
                    .filter(|i| i.spec.node.as_deref() == me || i.spec.network.is_some())
                    .cloned()
                    .collect()
            });
            drop(store);
            views.insert(
                tenant,
                TenantView {
                    cursor,
                    bound,
                    save,
                },
            );
        }
        self.shared.keep_only(&networked);
        Some((out, networked, groups, views))
    }

    /// Saves the tenants' caches that are due (see [`SAVE_EVERY`]), forgets those of tenants
    /// gone, and writes the catch-up report when it changed. A cache that cannot be saved
    /// has its old file removed: the next start lists rather than resume from a revision
    /// older than what was acted on.
    async fn persist(&mut self, views: BTreeMap<String, TenantView>) {
        let Some(dir) = self.cfg.state_dir.clone() else {
            return;
        };
        let report: BTreeMap<String, Report> = views
            .iter()
            .filter_map(|(t, v)| Report::of(&v.cursor.start).map(|r| (t.clone(), r)))
            .collect();
        if report != self.report {
            for (t, r) in &report {
                if self.report.get(t) != Some(r) {
                    tracing::info!(tenant = %t, start = ?r, "instance cache");
                }
            }
            let (d, r) = (dir.clone(), report.clone());
            match tokio::task::spawn_blocking(move || resume::write_report(&d, &r)).await {
                Ok(Ok(())) => self.report = report,
                Ok(Err(e)) => tracing::warn!(error = %e, "write the catch-up report"),
                Err(e) => tracing::warn!(error = %e, "write the catch-up report"),
            }
        }
        self.reap_saves(false).await;
        let gone: Vec<String> = self
            .saved
            .keys()
            .chain(self.saving.keys())
            .filter(|t| !views.contains_key(*t))
            .cloned()
            .collect();
        if gone.iter().any(|t| self.saving.contains_key(t)) {
            // Their files go below: not to be written again after that.
            self.reap_saves(true).await;
        }
        for t in gone {
            resume::remove(&dir, &t);
            self.saved.remove(&t);
        }
        // Written on the blocking pool while the loop goes on (encoding a tenant's cache is
        // milliseconds once it holds many instances); recorded by a later pass.
        for (tenant, v) in views {
            let Some(instances) = v.save else { continue };
            let saved = resume::Saved {
                version: resume::VERSION,
                node: self.cfg.node.clone(),
                tenant: tenant.clone(),
                revision: v.cursor.revision,
                instances,
            };
            let d = dir.clone();
            let task = tokio::task::spawn_blocking(move || {
                resume::save(&d, &saved).map_err(|e| e.to_string())
            });
            let mark = SaveMark {
                revision: v.cursor.revision,
                bound: v.bound,
                at: Instant::now(),
            };
            self.saving.insert(tenant, (task, mark));
        }
    }

    /// Records the saves that are done (all of them, waiting, if `wait`). A cache that could
    /// not be saved has its old file removed (see [`Agent::persist`]).
    async fn reap_saves(&mut self, wait: bool) {
        let done: Vec<String> = self
            .saving
            .iter()
            .filter(|(_, (task, _))| wait || task.is_finished())
            .map(|(t, _)| t.clone())
            .collect();
        for tenant in done {
            let Some((task, mark)) = self.saving.remove(&tenant) else {
                continue;
            };
            let error = match task.await {
                Ok(Ok(())) => {
                    self.saved.insert(tenant, mark);
                    continue;
                }
                Ok(Err(e)) => e,
                Err(e) => e.to_string(),
            };
            tracing::warn!(%tenant, error = %error, "save the instance cache");
            if let Some(dir) = &self.cfg.state_dir {
                resume::remove(dir, &tenant);
            }
            self.saved.remove(&tenant);
        }
    }

    async fn sync(
        &mut self,
        wanted: &Wanted,
        all: &[Arc<Instance>],
        groups: &Groups,
        bound_to: Option<&str>,
    ) {
        // A node bound to a tenant never starts another's instance, whoever placed it here
        // (the scheduler does not; an operator's or a faulty client's binding might).
        let refused = |tenant: &str| bound_to.is_some_and(|t| t != tenant);
        // Sorted: looked up by binary search.
        let existing = self.known.ids();
        // New instances first: their starts are on the clock, the rest of the pass is not
        // (every other container's state is read below, on this same thread). One without a
        // container directory has never been started here.
        let mut began = false;
        for (id, (tenant, inst)) in wanted {
            if existing.binary_search(id).is_err()
                && !self.starting.contains(id)
                && !refused(tenant)
            {
                let fw = crate::network::firewall_of(inst, all, groups);
                self.start(id, tenant, inst, fw);
                began = true;
            }
        }
        if began {
            // Let the starts take their first steps before the rest of the pass.
            tokio::task::yield_now().await;
        }
        for id in existing {
            // One being started is looked at once its start is over.
            if wanted.contains_key(&id)
                || self.stopping.contains(&id)
                || self.starting.contains(&id)
            {
                continue;
            }
            if matches!(
                self.known.state(&self.containers, &id),
                ContainerState::Running(_)
            ) {
                // Stops wait out a grace period: each in its own task, all at once.
                self.stopping.insert(id.clone());
                let (containers, grace) = (self.containers.clone(), self.cfg.stop_grace);
                let done = self.stopped.0.clone();
                tokio::spawn(async move {
                    let signal = containers.stop_signal(&id);
                    if let Err(e) = containers.stop(&id, &signal, grace).await {
                        tracing::warn!(container = %id, error = %e, "stop");
                    }
                    let _ = done.send(id);
                });
            } else {
                self.remove(&id).await;
            }
        }
        for (id, (tenant, inst)) in wanted {
            if self.starting.contains(id) {
                continue;
            }
            match self.known.state(&self.containers, id) {
                // The reason does not name the node's tenant.
                ContainerState::Unknown if refused(tenant) => {
                    let mut st = inst.status.clone();
                    st.ready = false;
                    st.reason = hive_api::REFUSED_BY_BOUND_NODE.into();
                    st.message = format!(
                        "node {} is bound to another tenant: it runs none of this tenant's \
                         instances",
                        self.cfg.node
                    );
                    report(&self.client, tenant, inst, st).await;
                }
                ContainerState::Unknown => {
                    let fw = crate::network::firewall_of(inst, all, groups);
                    self.start(id, tenant, inst, fw);
                }
                ContainerState::Running(s) => {
                    let ip = inst
                        .spec
                        .network
                        .as_ref()
                        .map(|n| n.ip.clone())
                        .unwrap_or_default();
                    let probes = self.probes_of(id, inst, s.pid);
                    let (ready, unready, dead) = (
                        probes.ready(),
                        probes.unready_because.clone(),
                        probes.dead_because.clone(),
                    );
                    if let Some(why) = dead {
                        self.kill_unhealthy(id, tenant, inst, why).await;
                        continue;
                    }
                    let usage = self.sample(id, tenant, inst);
                    let mut st = inst.status.clone();
                    st.ip = ip;
                    st.phase = InstancePhase::Running;
                    st.ready = ready;
                    st.pid = Some(s.pid as u32);
                    st.container_id = id.clone();
                    st.started_at = Some(s.started_at);
                    st.exit_code = None;
                    if ready {
                        st.reason.clear();
                        st.message.clear();
                    } else {
                        st.reason = "Unready".into();
                        st.message = unready;
                    }
                    if usage.is_some() {
                        st.usage = usage;
                    }
                    report(&self.client, tenant, inst, st).await;
                }
                ContainerState::Exited { exit, .. } => {
                    self.probes.remove(id);
                    self.sampled.remove(id);
                    let unhealthy = self.unhealthy.remove(id);
                    let failed = exit.exit_code != 0;
                    let again = match inst.spec.template.restart_policy {
                        RestartPolicy::Always => true,
                        RestartPolicy::OnFailure => failed,
                        RestartPolicy::Never => false,
                    };
                    if again {
                        let restarts = inst.status.restarts + 1;
                        let wait = Duration::from_millis(100u64 << restarts.min(8))
                            .min(Duration::from_secs(30));
                        let due = self
                            .backoff
                            .entry(id.clone())
                            .or_insert((Instant::now() + wait, restarts))
                            .0;
                        // With no start slot free it waits for the next pass, still exited,
                        // so its restart count is not lost.
                        if Instant::now() >= due && self.starting.len() < PARALLEL_STARTS {
                            // A restart starts from a fresh root filesystem, like a new
                            // container of the same instance.
                            self.remove(id).await;
                            let mut st = inst.status.clone();
                            st.restarts = restarts;
                            let mut restarted = inst.clone();
                            restarted.status = st;
                            let fw = crate::network::firewall_of(inst, all, groups);
                            self.start(id, tenant, &restarted, fw);
                        } else if inst.status.ready {
                            // Waiting out its backoff, it serves nothing: not ready.
                            let mut st = inst.status.clone();
                            st.ready = false;
                            st.reason = "BackOff".into();
                            st.message = format!(
                                "exited with {}; restarting in {} ms",
                                exit.exit_code,
                                due.saturating_duration_since(Instant::now()).as_millis()
                            );
                            report(&self.client, tenant, inst, st).await;
                        }
                    } else if matches!(
                        inst.status.phase,
                        InstancePhase::Running | InstancePhase::Pending
                    ) {
                        let mut st = inst.status.clone();
                        st.phase = if failed {
                            InstancePhase::Failed
                        } else {
                            InstancePhase::Succeeded
                        };
                        st.exit_code = Some(exit.exit_code);
                        st.reason = if exit.oom_killed {
                            "OOMKilled"
                        } else if unhealthy.is_some() {
                            "Unhealthy"
                        } else if failed {
                            "Error"
                        } else {
                            "Completed"
                        }
                        .into();
                        st.message = unhealthy.unwrap_or_default();
                        st.ready = false;
                        report(&self.client, tenant, inst, st).await;
                    }
                }
                // Records say it started, yet neither it nor its supervisor lives: clear it
                // away (rootfs included) and start it again on the next pass.
                ContainerState::Lost(_) => self.remove(id).await,
            }
        }
    }

    /// Starts `inst` in a task of its own (pull, rootfs, spec, supervisor), unless its
    /// backoff is not over or [`PARALLEL_STARTS`] are already under way; the task reports the
    /// outcome in the instance's status.
    fn start(&mut self, id: &str, tenant: &str, inst: &Instance, fw: Option<hive_net::Firewall>) {
        if self.starting.contains(id)
            || self.starting.len() >= PARALLEL_STARTS
            || self
                .backoff
                .get(id)
                .is_some_and(|(due, _)| Instant::now() < *due)
        {
            return;
        }
        self.starting.insert(id.to_owned());
        self.tenant_of.insert(id.to_owned(), tenant.to_owned());
        let (images, containers, client) = (
            self.images.clone(),
            self.containers.clone(),
            self.client.clone(),
        );
        let done = self.started.0.clone();
        let (id, tenant, inst) = (id.to_owned(), tenant.to_owned(), inst.clone());
        let net = self.net.clone();
        let views = self.discovery.views.clone();
        let applied = self.discovery.applied.clone();
        let quiet = self.discovery.quiet.clone();
        tokio::task::spawn_local(async move {
            let on_net = net.as_deref().map(|n| (n, &views, &applied, &quiet));
            let result = launch(
                &images,
                &containers,
                on_net,
                &id,
                &tenant,
                &inst,
                fw.as_ref(),
            )
            .await;
            let ok = result.is_ok();
            let mut st = inst.status.clone();
            st.container_id = id.clone();
            let mut usage = None;
            match result {
                Ok(started) => {
                    // Its first sample goes with its start: a write of its own would
                    // follow at once otherwise.
                    usage = probe::usage(&cgroups_path(&tenant, &inst.name));
                    st.phase = InstancePhase::Running;
                    // With a readiness probe it is ready once the probe passes.
                    st.ready = inst.spec.template.readiness.is_none();
                    st.pid = Some(started.pid as u32);
                    st.ip = inst
                        .spec
                        .network
                        .as_ref()
                        .map(|n| n.ip.clone())
                        .unwrap_or_default();
                    st.started_at = Some(started.started_at);
                    st.exit_code = None;
                    st.reason.clear();
                    st.message.clear();
                    if usage.is_some() {
                        st.usage = usage.clone();
                    }
                }
                Err((reason, message)) => {
                    let _ = containers.remove(&id).await;
                    images.release_rootfs(&id);
                    tracing::warn!(%tenant, instance = %inst.name, %reason, %message, "start");
                    st.phase = InstancePhase::Pending;
                    st.ready = false;
                    st.pid = None;
                    st.reason = reason.into();
                    st.message = message.chars().take(4000).collect();
                }
            }
            let t_report = Instant::now();
            let busy = net.is_some().then(|| quiet.hold());
            report(&client, &tenant, &inst, st).await;
            drop(busy);
            tracing::debug!(
                instance = %inst.name,
                report_ms = t_report.elapsed().as_secs_f64() * 1e3,
                "start reported"
            );
            let _ = done.send((id, ok, usage));
        });
    }

    /// A start task ended: a failure backs off (0.4 s doubling to 30 s) before the next try;
    /// the last one in flight has the node's spare namespaces topped up.
    fn finish_start(&mut self, id: &str, ok: bool, usage: Option<ResourceUsage>) {
        self.starting.remove(id);
        if let Some(u) = usage {
            self.sampled.insert(id.to_owned(), (Instant::now(), u));
        }
        self.known.touch(&self.containers, id);
        // The next start's supervisor, spawned now that this start is reported: spawned
        // beside the status write (on the path to "running"), it slowed that by ~0.5–1.5 ms.
        self.containers.prepare_supervisor();
        // Made ahead now, for the next starts' ports and root filesystems, rather than
        // beside a start.
        if self.starting.is_empty() {
            if let Some(net) = &self.net {
                net.refill_spares();
            }
            let images = self.images.clone();
            tokio::task::spawn_blocking(move || {
                tokio::runtime::Handle::current().block_on(images.refill_spares())
            });
        }
        if ok {
            self.backoff.remove(id);
            return;
        }
        let failures = self.backoff.get(id).map_or(0, |(_, n)| *n) + 1;
        let wait = Duration::from_millis(200u64 << failures.min(7)).min(Duration::from_secs(30));
        self.backoff
            .insert(id.to_owned(), (Instant::now() + wait, failures));
    }

    /// A stop task ended: the container goes (or, if it still runs, the next pass tries
    /// again).
    async fn finish_stop(&mut self, id: &str) {
        self.stopping.remove(id);
        self.known.touch(&self.containers, id);
        if !matches!(
            self.known.state(&self.containers, id),
            ContainerState::Running(_)
        ) {
            self.remove(id).await;
        }
    }

    /// Removes images no instance uses while the store is over its budget, and layers no
    /// image needs (pulls and composes wait meanwhile, so nothing in use goes).
    async fn collect_images(&self) {
        match self.images.gc(self.cfg.image_budget).await {
            Ok(r) if !r.images_removed.is_empty() || !r.layers_removed.is_empty() => {
                tracing::info!(
                    images = ?r.images_removed,
                    layers = r.layers_removed.len(),
                    bytes_before = r.bytes_before,
                    bytes_after = r.bytes_after,
                    budget = self.cfg.image_budget,
                    "image store collected"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "collect the image store"),
        }
    }

    /// The probes of running container `id` (started now if it has none for `pid` yet).
    fn probes_of(&mut self, id: &str, inst: &Instance, pid: i32) -> &Probes {
        if self.probes.get(id).is_none_or(|p| p.pid() != pid) {
            let target = probe::Target {
                runtime: self.containers.runtime_of(id),
                id: id.to_owned(),
                pid,
                ip: inst.spec.network.as_ref().and_then(|n| n.ip.parse().ok()),
            };
            let t = &inst.spec.template;
            let p = Probes::start(
                target,
                t.readiness.clone(),
                t.liveness.clone(),
                &self.probed.0,
            );
            self.probes.insert(id.to_owned(), p);
        }
        &self.probes[id]
    }

    /// Counts a probe's outcome (one of a container since replaced is dropped).
    fn record_probe(&mut self, o: probe::Outcome) {
        let Some(p) = self.probes.get_mut(&o.id).filter(|p| p.pid() == o.pid) else {
            return;
        };
        if let Err(e) = &o.result {
            tracing::debug!(container = %o.id, kind = ?o.kind, error = %e, "probe failed");
        }
        p.record(o.kind, o.result);
    }

    /// Stops a container whose liveness probe failed (once); when it has exited, its
    /// restart policy decides what follows.
    async fn kill_unhealthy(&mut self, id: &str, tenant: &str, inst: &Instance, why: String) {
        if self.unhealthy.contains_key(id) {
            return;
        }
        tracing::info!(%tenant, instance = %inst.name, reason = %why, "stopping an unhealthy container");
        self.unhealthy.insert(id.to_owned(), why.clone());
        let mut st = inst.status.clone();
        st.ready = false;
        st.reason = "Unhealthy".into();
        st.message = why;
        report(&self.client, tenant, inst, st).await;
        let (containers, grace, id) = (self.containers.clone(), self.cfg.stop_grace, id.to_owned());
        tokio::spawn(async move {
            let signal = containers.stop_signal(&id);
            if let Err(e) = containers.stop(&id, &signal, grace).await {
                tracing::warn!(container = %id, error = %e, "stop an unhealthy container");
            }
        });
    }

    /// The container's resource use, read again once the last reading is older than
    /// `usage_every`.
    fn sample(&mut self, id: &str, tenant: &str, inst: &Instance) -> Option<ResourceUsage> {
        if let Some((at, u)) = self.sampled.get(id)
            && at.elapsed() < self.cfg.usage_every
        {
            return Some(u.clone());
        }
        let u = probe::usage(&cgroups_path(tenant, &inst.name))?;
        self.sampled
            .insert(id.to_owned(), (Instant::now(), u.clone()));
        Some(u)
    }

    /// Before the loop acts: removes what starts cut short by a crash left (containers that
    /// never ran, and everything the runtime made of them: see [`Containers::unfinished`]),
    /// root filesystems composed for a container that was never made, and logs of containers
    /// whose state is gone (a reboot empties the state's tmpfs). Containers that ran are
    /// left to be adopted.
    async fn clear_unfinished(&mut self) {
        for id in self.containers.clear_orphan_logs() {
            tracing::info!(container = %id, "removed the logs of a container that is gone");
        }
        for id in self.containers.unfinished() {
            tracing::info!(container = %id, "removing what an unfinished start left");
            self.remove(&id).await;
        }
        let have: HashSet<String> = self.known.ids().into_iter().collect();
        for id in self.images.instance_ids() {
            if have.contains(&id) {
                continue;
            }
            tracing::info!(container = %id, "removing a root filesystem without a container");
            for e in self.images.release_rootfs(&id) {
                tracing::warn!(container = %id, error = %e, "release rootfs");
            }
        }
    }

    /// Removes a container that no longer runs, and its root filesystem.
    async fn remove(&mut self, id: &str) {
        self.probes.remove(id);
        self.sampled.remove(id);
        let removed = self.containers.remove(id).await;
        self.known.touch(&self.containers, id);
        if let Err(e) = removed {
            tracing::warn!(container = %id, error = %e, "remove");
            return;
        }
        for e in self.images.release_rootfs(id) {
            tracing::warn!(container = %id, error = %e, "release rootfs");
        }
        self.backoff.remove(id);
    }
}

/// The containers held per tenant: those with a directory (as `seen` has them) and those
/// being started. A container's tenant comes from `known` (filled when it is started) or
/// else from its bundle; one with neither was never handed to the runtime and holds
/// nothing. `known` is trimmed to the containers counted.
fn count_held(
    containers: &Containers,
    seen: &Known,
    starting: &HashSet<String>,
    known: &mut HashMap<String, String>,
) -> Held {
    let ids: BTreeSet<String> = seen
        .ids()
        .into_iter()
        .chain(starting.iter().cloned())
        .collect();
    known.retain(|id, _| ids.contains(id));
    let mut held = Held::new();
    for id in ids {
        let tenant = match known.get(&id) {
            Some(t) => t.clone(),
            None => match containers.tenant_of(&id) {
                Some(t) => {
                    known.insert(id.clone(), t.clone());
                    t
                }
                None => continue,
            },
        };
        *held.entry(tenant).or_default() += 1;
    }
    held
}

/// The cgroup of an instance's container.
fn cgroups_path(tenant: &str, instance: &str) -> PathBuf {
    PathBuf::from(format!("/hive/{tenant}/{instance}"))
}

/// Writes `status` for `inst` if it changed.
async fn report(client: &Client, tenant: &str, inst: &Instance, status: hive_api::InstanceStatus) {
    if inst.status == status {
        return;
    }
    let mut update = inst.clone();
    update.status = status;
    update.revision = 0;
    if let Err(e) = client.update_status(Some(tenant), &update).await {
        tracing::debug!(%tenant, instance = %inst.name, error = %e, "report status");
    }
}

/// The image `reference` as the pull policy has it: the node's copy, or pulled.
async fn image_of(
    images: &ImageStore,
    reference: &str,
    policy: PullPolicy,
) -> Result<crate::image::Image, (&'static str, String)> {
    let present = match policy {
        PullPolicy::Always => None,
        PullPolicy::IfNotPresent | PullPolicy::Never => images
            .get(reference)
            .map_err(|e| ("ImagePullFailed", e.to_string()))?,
    };
    match (present, policy) {
        (Some(image), _) => Ok(image),
        (None, PullPolicy::Never) => Err((
            "ImageNotPresent",
            format!("{reference} is not on this node and the pull policy is never"),
        )),
        (None, _) => images
            .pull(reference)
            .await
            .map_err(|e| ("ImagePullFailed", e.to_string())),
    }
}

/// Pull, compose, spec, start: the failure's reason and message for the status.
async fn launch(
    images: &Arc<ImageStore>,
    containers: &Containers,
    net: Option<(
        &hive_net::NodeNet,
        &crate::discovery::Views,
        &crate::discovery::Applied,
        &Arc<crate::discovery::Quiet>,
    )>,
    id: &str,
    tenant: &str,
    inst: &Instance,
    fw: Option<&hive_net::Firewall>,
) -> Result<crate::runtime::shim::Started, (&'static str, String)> {
    let views = net.map(|(_, v, a, _)| (v, a));
    // Until the runtime makes the container, this start works on the agent's thread.
    let busy = net.map(|(.., q)| q.hold());
    let net = net.map(|(n, ..)| n);
    let t = &inst.spec.template;
    let t0 = Instant::now();
    // From the API server taking its create (its `created_at`) to this start begun: the
    // control plane's share (create, placement, watch delivery).
    let created_ms = inst.created_at.map_or(-1.0, |c| {
        (chrono::Utc::now() - c).num_microseconds().unwrap_or(0) as f64 / 1e3
    });
    // The image and its root filesystem, and the port: neither needs the other, so they are
    // made at once (the rootfs's mount on the blocking pool, beside the port's netlink
    // round trips on this thread).
    let filesystem = async {
        let image = image_of(images, &t.image, t.pull_policy()).await?;
        let t_image = t0.elapsed();
        let (store, for_rootfs, instance) = (images.clone(), image.clone(), id.to_owned());
        // Its mount and files are blocking calls (it waits for no I/O driver).
        let rootfs = tokio::task::spawn_blocking(move || {
            let compose = store.compose_rootfs(&for_rootfs, &instance);
            tokio::runtime::Handle::current().block_on(compose)
        })
        .await
        .map_err(|e| ("RootfsFailed", e.to_string()))?
        .map_err(|e| ("RootfsFailed", e.to_string()))?;
        Ok::<_, (&'static str, String)>((image, rootfs, t_image, t0.elapsed()))
    };
    let network = async {
        // Its port, so that the container starts with its address in place.
        let port = match (&inst.spec.network, net) {
            (None, _) => None,
            (Some(n), Some(net)) => {
                let port = crate::network::attach(net, id, n, t.bandwidth.as_ref())
                    .await
                    .map_err(|e| ("NetworkSetupFailed", e))?;
                // Its security groups' rules are in before its process runs.
                if fw.is_some() {
                    net.set_firewall(id, fw)
                        .await
                        .map_err(|e| ("NetworkSetupFailed", e.to_string()))?;
                }
                Some(port)
            }
            (Some(_), None) => {
                return Err((
                    "NetworkUnavailable",
                    "this node's tenant networks are not set up (see the agent's log)".into(),
                ));
            }
        };
        let t_port = t0.elapsed();
        // Its tenant's VIPs and resolver, before it can ask for them.
        let resolv = match (&inst.spec.network, net, views) {
            (Some(n), Some(net), Some((views, applied))) => Some(
                crate::discovery::prepare(
                    net,
                    views,
                    applied,
                    id,
                    tenant,
                    n.vni,
                    &containers.dir(id),
                    port.as_ref().is_some_and(|p| p.created),
                )
                .await
                .map_err(|e| ("NetworkSetupFailed", e))?,
            ),
            _ => None,
        };
        Ok((port, resolv, t_port, t0.elapsed()))
    };
    let (filesystem, network) = tokio::join!(filesystem, network);
    let ((image, rootfs, t_image, t_rootfs), (port, resolv, t_port, t_net)) =
        (filesystem?, network?);
    let cfg = ContainerConfig {
        id: id.to_owned(),
        hostname: inst.name.clone(),
        rootfs: rootfs.path.clone(),
        image: ImageProcess {
            entrypoint: image.config.entrypoint.clone(),
            cmd: image.config.cmd.clone(),
            env: image.config.env.clone(),
            working_dir: image.config.working_dir.clone().unwrap_or_default(),
            user: image.config.user.clone().unwrap_or_default(),
            stop_signal: image.config.stop_signal.clone().unwrap_or_default(),
        },
        overrides: ProcessOverride {
            command: t.command.clone(),
            args: t.args.clone(),
            env: t
                .env
                .iter()
                .map(|e| (e.name.clone(), e.value.clone()))
                .collect(),
        },
        limits: Limits {
            cpu_millis: t.resources.limits.cpu_millis,
            cpu_request_millis: t.resources.requests.cpu_millis,
            memory_bytes: t.resources.limits.memory_bytes,
            pids: t.resources.pids_limit,
        },
        cgroups_path: cgroups_path(tenant, &inst.name),
        netns: port.map(|p| p.netns_path),
    };
    let mut spec = spec::build(&cfg).map_err(|e| ("InvalidSpec", e.to_string()))?;
    if let Some(path) = &resolv {
        spec::mount_resolv_conf(&mut spec, id, path).map_err(|e| ("InvalidSpec", e.to_string()))?;
    }
    drop(busy);
    let started = containers
        .start(id, &spec, &cfg.cgroups_path)
        .await
        .map_err(|e| ("StartFailed", e.to_string()))?;
    tracing::debug!(
        instance = %inst.name,
        created_ms,
        image_ms = t_image.as_secs_f64() * 1e3,
        rootfs_ms = (t_rootfs - t_image).as_secs_f64() * 1e3,
        net_ms = t_net.as_secs_f64() * 1e3,
        port_ms = t_port.as_secs_f64() * 1e3,
        start_ms = (t0.elapsed() - t_net.max(t_rootfs)).as_secs_f64() * 1e3,
        // From the supervisor's start record to here (its answer, read back).
        answer_ms = (chrono::Utc::now() - started.started_at)
            .num_microseconds()
            .unwrap_or(0) as f64
            / 1e3,
        "launched"
    );
    Ok(started)
}

/// Every tenant's instances, and whether each cache holds a complete list yet.
#[derive(Default)]
struct Caches {
    /// The tenants were listed at least once.
    discovered: bool,
    /// Every node (for the underlay addresses of other nodes' instances).
    nodes: Option<(Store<Node>, watch::Receiver<bool>)>,
    tenants: HashMap<String, TenantCache>,
    /// Every tenant's services (for their VIPs and names).
    services: HashMap<String, Store<Service>>,
}

/// Every tenant's services, from the caches (shared copies: see [`Shared`]).
async fn services_of(
    caches: &Arc<Mutex<Caches>>,
    shared: &mut Shared<Service>,
) -> HashMap<String, Vec<Arc<Service>>> {
    let stores: Vec<(String, Store<Service>)> = {
        let c = caches.lock().await;
        c.services
            .iter()
            .map(|(t, s)| (t.clone(), s.clone()))
            .collect()
    };
    let mut out = HashMap::new();
    let mut taken = Vec::new();
    for (t, s) in stores {
        let services: Vec<Arc<Service>> = s.lock().await.values().map(|s| shared.of(s)).collect();
        taken.extend(services.iter().cloned());
        out.insert(t, services);
    }
    shared.keep_only(&taken);
    out
}

/// One tenant's instances and security groups, and whether each holds a complete list.
struct TenantCache {
    instances: Store<Instance>,
    synced: watch::Receiver<bool>,
    /// The instance cache's revision and how it started.
    cursor: watch::Receiver<Cursor>,
    groups: Store<SecurityGroup>,
    groups_synced: watch::Receiver<bool>,
}

/// Keeps one instance cache and one security group cache per tenant; every change pokes
/// `tx`. A tenant's instance cache starts from its `saved` state when there is one.
async fn watch_tenants(
    client: Client,
    caches: Arc<Mutex<Caches>>,
    tx: mpsc::UnboundedSender<()>,
    mut saved: HashMap<String, resume::Saved>,
) {
    let (ttx, mut trx) = mpsc::unbounded_channel();
    let names = tokio::spawn(tenant_names(client.clone(), ttx));
    let mut workers: HashMap<String, JoinHandle<()>> = HashMap::new();
    while let Some(live) = trx.recv().await {
        workers.retain(|t, h| {
            let keep = live.contains(t) && !h.is_finished();
            if !keep {
                h.abort();
            }
            keep
        });
        let mut c = caches.lock().await;
        c.discovered = true;
        c.tenants.retain(|t, _| live.contains(t));
        c.services.retain(|t, _| live.contains(t));
        for t in &live {
            if workers.contains_key(t) {
                continue;
            }
            let instances: Store<Instance> = Arc::default();
            let groups: Store<SecurityGroup> = Arc::default();
            let (synced, ready) = watch::channel(false);
            let (groups_synced, groups_ready) = watch::channel(false);
            let (cursor, cursor_rx) = watch::channel(Cursor::default());
            // Only the first worker of a tenant resumes: a later one (the tenant came back)
            // lists.
            let resume_from = saved.remove(t).map(|s| Saved {
                revision: s.revision,
                objects: s.instances,
            });
            // A cache that becomes complete pokes the loop too: with nothing to replay no
            // object changes, and the loop would only notice at its next tick.
            let (mut ready_seen, mut groups_ready_seen) = (ready.clone(), groups_ready.clone());
            c.tenants.insert(
                t.clone(),
                TenantCache {
                    instances: instances.clone(),
                    synced: ready,
                    cursor: cursor_rx,
                    groups: groups.clone(),
                    groups_synced: groups_ready,
                },
            );
            let (itx, mut irx) = mpsc::unbounded_channel();
            let poke = tx.clone();
            let (client, tenant) = (client.clone(), t.clone());
            let services: Store<Service> = Arc::default();
            c.services.insert(t.clone(), services.clone());
            workers.insert(
                t.clone(),
                tokio::spawn(async move {
                    let r = tokio::spawn(reflect_resumable(
                        client.clone(),
                        Some(tenant.clone()),
                        instances,
                        itx.clone(),
                        synced,
                        cursor,
                        resume_from,
                    ));
                    let g = tokio::spawn(reflect_synced(
                        client.clone(),
                        Some(tenant.clone()),
                        groups,
                        itx.clone(),
                        groups_synced,
                    ));
                    let s = tokio::spawn(reflect(client, Some(tenant), services, itx));
                    loop {
                        tokio::select! {
                            changed = irx.recv() => if changed.is_none() { break },
                            Ok(()) = ready_seen.changed() => {}
                            Ok(()) = groups_ready_seen.changed() => {}
                        }
                        if poke.send(()).is_err() {
                            break;
                        }
                    }
                    r.abort();
                    g.abort();
                    s.abort();
                }),
            );
        }
        drop(c);
        if tx.send(()).is_err() {
            break;
        }
    }
    names.abort();
    for h in workers.into_values() {
        h.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(uid: &str, revision: u64) -> Instance {
        Instance {
            name: format!("i-{uid}"),
            uid: uid.into(),
            revision,
            ..Default::default()
        }
    }

    #[test]
    fn a_shared_copy_is_kept_while_its_object_is_unchanged() {
        let mut shared = Shared::default();
        let a1 = shared.of(&inst("a", 5));
        let b = shared.of(&inst("b", 7));
        // Unchanged: the same copy.
        assert!(Arc::ptr_eq(&a1, &shared.of(&inst("a", 5))));
        // Written since (a new revision): a new copy, which is kept from then on.
        let mut changed = inst("a", 9);
        changed.status.ready = true;
        let a2 = shared.of(&changed);
        assert!(!Arc::ptr_eq(&a1, &a2) && a2.status.ready);
        assert!(Arc::ptr_eq(&a2, &shared.of(&changed)));
        // What a pass no longer takes is forgotten.
        shared.keep_only(std::slice::from_ref(&b));
        assert_eq!(shared.by_uid.len(), 1);
        assert!(Arc::ptr_eq(&b, &shared.of(&inst("b", 7))));
    }
}
