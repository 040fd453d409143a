//! The service controller: keeps each service's instances at its replica count and reports
//! how many exist and are ready (a changed status is written [`STATUS_DELAY`] later, with
//! the changes made meanwhile).
//!
//! Per tenant it caches the tenant's services and instances (list + watch) and queues the
//! names of services to reconcile in a [`WorkQueue`]: several workers, never two on one
//! service; replacements of lost instances and deletions before scale-ups and other
//! changes, and those before the periodic resync. Each reconcile works from the cache: too
//! few instances → create them (each a copy of the service's template, not yet placed); too
//! many → delete the surplus, unready first, then the newest; a service that is gone →
//! delete its instances. Deletion is driven by desired
//! state, so a missed delete event changes nothing.
//!
//! When the template changed, instances made from another template are replaced as the
//! service's strategy says (rolling, or a canary that holds until promoted); the decisions
//! are [`super::rollout::plan`]'s, this module carries them out and records the rollout's
//! phase in the status, with an Event at every step and phase change.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use hive_api::{
    ErrorCode, EventType, Instance, InstancePhase, InstanceSpec, REFUSED_BY_BOUND_NODE,
    RolloutPhase, Service, Tenant, WatchEventType,
};
use hive_client::{Client, ClientError};
use tokio::sync::{Mutex, mpsc, watch};
use tokio::task::JoinHandle;

use hive_client::reflector::{Store, keep_written, reflect_synced};

use super::nodes::Ages;
use super::queue::{Priority, WorkQueue};
use super::rollout::{self, Member};
use super::scheduler::Placer;

/// The label every instance carries with its service's name.
pub const SERVICE_LABEL: &str = "hive.dev/service";
/// The label every instance carries with the template revision it was made from.
pub const REVISION_LABEL: &str = "hive.dev/revision";

/// How long a running instance may fail its readiness probe before a rollout waiting for
/// it counts as stalled (a container starting up is not ready at once).
const UNREADY_GRACE: Duration = Duration::from_secs(60);

/// Why an instance does not start, when its node (or the scheduler) said: an unready
/// instance with a reason, or one that failed for good. A readiness probe that has not
/// passed yet is no failure until the instance has run for [`UNREADY_GRACE`]: `ran` is how
/// long ago this controller saw its current `started_at` (the node's clock and this
/// server's may disagree, so the timestamp itself is never compared with now).
fn failing(i: &Instance, ran: Duration) -> Option<String> {
    if i.status.ready {
        return None;
    }
    if i.status.reason == "Unready" && (i.status.started_at.is_none() || ran < UNREADY_GRACE) {
        return None;
    }
    if i.status.phase == InstancePhase::Failed || !i.status.reason.is_empty() {
        let reason = if i.status.reason.is_empty() {
            "Failed"
        } else {
            &i.status.reason
        };
        return Some(if i.status.message.is_empty() {
            reason.to_owned()
        } else {
            format!("{reason}: {}", i.status.message)
        });
    }
    None
}

/// Runs the service controller for every tenant, as long as the returned future is polled.
#[derive(Clone, Debug)]
pub struct ServiceController {
    client: Client,
    placer: Option<Placer>,
}

impl ServiceController {
    /// `client` must act as the platform admin (it works in every tenant).
    pub fn new(client: Client) -> Self {
        Self {
            client,
            placer: None,
        }
    }

    /// Creates instances on the node `placer`'s scheduler reserves for them when it can
    /// place them at once (see [`super::scheduler`]), rather than unplaced for it to bind.
    pub fn with_placer(mut self, placer: Placer) -> Self {
        self.placer = Some(placer);
        self
    }

    pub async fn run(self) {
        let mut workers: HashMap<String, JoinHandle<()>> = HashMap::new();
        loop {
            let list = match self.client.list::<Tenant>(None).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "service controller: list tenants");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let live: BTreeSet<String> = list.items.iter().map(|t| t.name.clone()).collect();
            workers.retain(|t, h| {
                let keep = live.contains(t) && !h.is_finished();
                if !keep {
                    h.abort();
                }
                keep
            });
            for t in &live {
                workers.entry(t.clone()).or_insert_with(|| {
                    tokio::spawn(tenant_loop(
                        self.client.clone(),
                        self.placer.clone(),
                        t.clone(),
                    ))
                });
            }
            let Ok(mut stream) = self.client.watch::<Tenant>(None, Some(list.revision)).await
            else {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            };
            while let Some(Ok(ev)) = stream.next().await {
                match (ev.type_, ev.object) {
                    (WatchEventType::Added, Some(t)) => {
                        workers.entry(t.name.clone()).or_insert_with(|| {
                            tokio::spawn(tenant_loop(
                                self.client.clone(),
                                self.placer.clone(),
                                t.name.clone(),
                            ))
                        });
                    }
                    (WatchEventType::Deleted, Some(t)) => {
                        if let Some(h) = workers.remove(&t.name) {
                            h.abort();
                        }
                    }
                    (WatchEventType::Error, _) => break,
                    _ => {}
                }
            }
        }
    }
}

/// Parallel reconciles per tenant (different services; never one service twice at once).
const WORKERS: usize = 4;
/// How often every service is reconciled although nothing was seen to change: a missed
/// event, or time itself (a probe failing past its grace makes a rollout stalled).
const RESYNC: Duration = Duration::from_secs(30);
/// How long a failed reconcile waits before it is retried.
const RETRY: Duration = Duration::from_millis(500);
/// How long a changed status waits before it is written, as it is then: a start's
/// "created, not ready" and "ready" a few milliseconds later make one write, made after the
/// start rather than in the store's commits beside its instance's (one commit, one watch
/// delivery to every watcher less per start).
pub const STATUS_DELAY: Duration = Duration::from_millis(30);

async fn tenant_loop(client: Client, placer: Option<Placer>, tenant: String) {
    let services: Store<Service> = Arc::new(Mutex::new(BTreeMap::new()));
    let instances: Store<Instance> = Arc::new(Mutex::new(BTreeMap::new()));
    let (stx, mut srx) = mpsc::unbounded_channel();
    let (itx, mut irx) = mpsc::unbounded_channel();
    let (s_synced, mut s_ready) = watch::channel(false);
    let (i_synced, mut i_ready) = watch::channel(false);
    let reflectors = [
        tokio::spawn(reflect_synced(
            client.clone(),
            Some(tenant.clone()),
            services.clone(),
            stx,
            s_synced,
        )),
        tokio::spawn(reflect_synced(
            client.clone(),
            Some(tenant.clone()),
            instances.clone(),
            itx,
            i_synced,
        )),
    ];
    // Both caches whole before anything is compared: a service seen before its instances
    // would look short of replicas and get duplicates.
    if s_ready.wait_for(|r| *r).await.is_err() || i_ready.wait_for(|r| *r).await.is_err() {
        return;
    }
    let ctx = Arc::new(Reconciler {
        client,
        placer,
        tenant,
        services,
        instances,
        status_due: std::sync::Mutex::new(HashMap::new()),
        deleted: std::sync::Mutex::new(HashSet::new()),
        started: std::sync::Mutex::new(HashMap::new()),
    });
    let queue: Arc<WorkQueue<String>> = WorkQueue::new();
    let workers: Vec<JoinHandle<()>> = (0..WORKERS)
        .map(|_| tokio::spawn(work(ctx.clone(), queue.clone())))
        .collect();
    // The service of each instance seen, to tell which one lost it when it is deleted.
    let mut owner: HashMap<String, String> = HashMap::new();
    let mut resync = tokio::time::interval(RESYNC);
    resync.tick().await;
    loop {
        tokio::select! {
            Some(s) = srx.recv() => {
                let p = ctx.priority(&s, false).await;
                queue.add(s, p);
            }
            Some(i) = irx.recv() => {
                let service = ctx.instances.lock().await.get(&i).map(|o| o.spec.service.clone());
                match service {
                    Some(svc) => {
                        owner.insert(i, svc.clone());
                        let p = ctx.priority(&svc, false).await;
                        queue.add(svc, p);
                    }
                    None => {
                        // Deleted: by this controller, or behind its back (a lost node,
                        // a user), when its service may need a replacement at once.
                        let lost = !ctx.forget_deleted(&i);
                        let due: Vec<String> = match owner.remove(&i) {
                            Some(svc) => vec![svc],
                            None => ctx.services.lock().await.keys().cloned().collect(),
                        };
                        for svc in due {
                            let p = ctx.priority(&svc, lost).await;
                            queue.add(svc, p);
                        }
                    }
                }
            }
            _ = resync.tick() => {
                for svc in ctx.services.lock().await.keys() {
                    queue.add(svc.clone(), Priority::Resync);
                }
            }
            else => break,
        }
    }
    for t in reflectors.into_iter().chain(workers) {
        t.abort();
    }
}

/// One worker: reconciles the keys the queue hands it; a failed one is queued again after
/// [`RETRY`] with the priority it had, one with a status to write when it is due.
async fn work(ctx: Arc<Reconciler>, queue: Arc<WorkQueue<String>>) {
    loop {
        let lease = queue.next().await;
        let svc = lease.key().clone();
        let again = match ctx.reconcile(&svc).await {
            Ok(later) => later,
            Err(e) => {
                tracing::debug!(tenant = %ctx.tenant, service = %svc, error = %e, "reconcile; retrying");
                Some(RETRY)
            }
        };
        if let Some(wait) = again {
            let (queue, priority) = (queue.clone(), lease.priority());
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                queue.add(svc, priority);
            });
        }
        drop(lease);
    }
}

struct Reconciler {
    client: Client,
    placer: Option<Placer>,
    tenant: String,
    services: Store<Service>,
    instances: Store<Instance>,
    /// When each service's changed status is due to be written ([`STATUS_DELAY`]).
    status_due: std::sync::Mutex<HashMap<String, std::time::Instant>>,
    /// Instances this controller deleted whose delete event has not come yet: their going
    /// is no loss to recover from.
    deleted: std::sync::Mutex<HashSet<String>>,
    /// Per service, when each of its instances' `started_at` took its value, on this
    /// process's clock.
    started: std::sync::Mutex<HashMap<String, Ages>>,
}

/// The priority of a reconcile of a service with `replicas` wanted and `have` instances
/// cached, after one was `lost` (deleted by someone else) or not.
fn classify(replicas: u32, have: usize, lost: bool) -> Priority {
    let want = replicas as usize;
    if have > want {
        Priority::Delete
    } else if have < want && lost {
        Priority::Recover
    } else {
        Priority::Change
    }
}

fn instance_name(service: &str) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let suffix: String = (0..5)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect();
    let prefix: String = service.chars().take(57).collect();
    format!("{}-{suffix}", prefix.trim_end_matches('-'))
}

impl Reconciler {
    /// How urgent a reconcile of `service` is, from the caches: gone or above its replicas
    /// → deletions; below them because an instance was `lost` → recovery; else a change.
    async fn priority(&self, service: &str, lost: bool) -> Priority {
        let Some(replicas) = self
            .services
            .lock()
            .await
            .get(service)
            .map(|s| s.spec.replicas)
        else {
            return Priority::Delete;
        };
        let have = self
            .instances
            .lock()
            .await
            .values()
            .filter(|i| i.spec.service == service)
            .count();
        classify(replicas, have, lost)
    }

    /// Whether this controller deleted `instance` (and forgets it).
    fn forget_deleted(&self, instance: &str) -> bool {
        self.deleted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(instance)
    }

    /// Brings service `name`'s instances to what it asks for; answers when to come back, if
    /// its status is still to be written ([`STATUS_DELAY`]).
    async fn reconcile(&self, name: &str) -> Result<Option<Duration>, ClientError> {
        let tenant = Some(self.tenant.as_str());
        let svc = self.services.lock().await.get(name).cloned();
        let mine: Vec<Instance> = self
            .instances
            .lock()
            .await
            .values()
            .filter(|i| i.spec.service == name)
            .cloned()
            .collect();
        let ran: HashMap<String, Duration> = {
            let mut started = self.started.lock().unwrap_or_else(|e| e.into_inner());
            if svc.is_none() {
                started.remove(name);
                HashMap::new()
            } else {
                let ages = started.entry(name.to_owned()).or_default();
                ages.retain(|inst| mine.iter().any(|i| i.name == inst));
                let now = std::time::Instant::now();
                mine.iter()
                    .map(|i| (i.name.clone(), ages.of(&i.name, i.status.started_at, now)))
                    .collect()
            }
        };
        let Some(mut svc) = svc else {
            self.status_not_due(name);
            for i in mine {
                self.delete(&i.name).await?;
            }
            return Ok(None);
        };
        // A service made before VIPs existed (or before its network) has none: writing its
        // spec back unchanged lets the server allocate one. Only once an instance was placed
        // on the network (so it exists), under the cached revision (a stale cache gets a
        // 409 and never overwrites a user's change).
        if svc.status.vip.is_empty() && mine.iter().any(|i| i.spec.network.is_some()) {
            match self.client.update(tenant, &svc).await {
                Ok(written) => {
                    keep_written(&self.services, written.clone(), false).await;
                    svc = written;
                }
                Err(e) => {
                    tracing::debug!(tenant = %self.tenant, service = %name, error = %e, "give the service a vip")
                }
            }
        }
        // An instance its node refused for good (the node was bound to another tenant after
        // the instance was bound to it) never starts there, and the scheduler moves no bound
        // instance: it is deleted, and replaced below like any missing one.
        let (refused, mine): (Vec<Instance>, Vec<Instance>) = mine
            .into_iter()
            .partition(|i| i.spec.node.is_some() && i.status.reason == REFUSED_BY_BOUND_NODE);
        for i in &refused {
            self.delete(&i.name).await?;
            let node = i.spec.node.as_deref().unwrap_or_default();
            let message = format!(
                "instance {} refused by node {node}, now bound to another tenant: replaced",
                i.name
            );
            self.note(EventType::Warning, "InstanceRefused", name, message)
                .await;
        }
        // An instance is current when made from the template the service has now (whatever
        // its revision label says: an undo to an older template makes its instances
        // current again).
        let members: Vec<Member> = mine
            .iter()
            .map(|i| Member {
                name: i.name.clone(),
                current: i.spec.template == svc.spec.template,
                ready: i.status.ready,
                failing: failing(i, ran.get(&i.name).copied().unwrap_or_default()),
                created_at: i.created_at,
            })
            .collect();
        let plan = rollout::plan(
            svc.spec.replicas,
            &svc.spec.strategy,
            svc.status.rollout.promoted,
            &members,
        );
        let revision = svc.status.template_revision;
        let mut created = Vec::new();
        for _ in 0..plan.create {
            let mut inst = Instance {
                name: instance_name(name),
                spec: InstanceSpec {
                    service: name.to_owned(),
                    node: None,
                    template: svc.spec.template.clone(),
                    network: None,
                },
                ..Default::default()
            };
            inst.labels
                .insert(SERVICE_LABEL.to_owned(), name.to_owned());
            inst.labels
                .insert(REVISION_LABEL.to_owned(), revision.to_string());
            let made = self.create(inst).await?;
            // Into the cache at once (a reconcile right after must count it), unless the
            // watch brought a newer version first: an instance created on its node may be
            // running, and say so, before this task runs again.
            created.push(made.name.clone());
            keep_written(&self.instances, made, true).await;
        }
        for victim in &plan.delete {
            self.delete(victim).await?;
        }
        if plan.rolling && (!created.is_empty() || !plan.delete.is_empty()) {
            let mut what = Vec::new();
            if !created.is_empty() {
                what.push(format!("created {}", created.join(", ")));
            }
            if !plan.delete.is_empty() {
                what.push(format!("deleted {}", plan.delete.join(", ")));
            }
            let message = format!("revision {revision}: {}; {}", what.join("; "), plan.message);
            self.note(EventType::Normal, "RolloutStep", name, message)
                .await;
        }
        let mut status = svc.status.clone();
        status.replicas = plan.replicas;
        status.ready_replicas = plan.ready;
        status.updated_replicas = plan.updated;
        status.rollout.phase = plan.phase;
        status.rollout.message = plan.message.clone();
        if svc.status == status {
            self.status_not_due(name);
            return Ok(None);
        }
        if let Some(wait) = self.status_wait(name) {
            return Ok(Some(wait));
        }
        let mut update = svc.clone();
        update.status = status;
        let written = self.client.update_status(tenant, &update).await?;
        keep_written(&self.services, written, false).await;
        // Only after the status is written, so a retried reconcile does not say it twice.
        if svc.status.rollout.phase != plan.phase {
            let (type_, reason) = match plan.phase {
                RolloutPhase::Complete => (EventType::Normal, "RolloutComplete"),
                RolloutPhase::Paused => (EventType::Normal, "RolloutPaused"),
                RolloutPhase::Stalled => (EventType::Warning, "RolloutStalled"),
                RolloutPhase::Progressing => (EventType::Normal, ""),
            };
            if !reason.is_empty() {
                let message = format!("revision {revision}: {}", plan.message);
                self.note(type_, reason, name, message).await;
            }
        }
        Ok(None)
    }

    /// How long service `name`'s changed status is still to wait ([`STATUS_DELAY`] from the
    /// reconcile that first found it changed); None once it is due (and the next change
    /// waits again).
    fn status_wait(&self, name: &str) -> Option<Duration> {
        let now = std::time::Instant::now();
        let at = *self
            .status_due
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_owned())
            .or_insert(now + STATUS_DELAY);
        if now < at {
            return Some(at - now);
        }
        self.status_not_due(name);
        None
    }

    /// Service `name` has no status waiting to be written (it is, it is moot, or it went).
    fn status_not_due(&self, name: &str) {
        self.status_due
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }

    /// Creates `inst` on the node the scheduler reserves for it, when it answers with one;
    /// unplaced otherwise, and when the server refuses that binding (the node taken by
    /// another tenant meanwhile, no address left in the network): the scheduler's own pass
    /// then says why in the instance's status.
    async fn create(&self, mut inst: Instance) -> Result<Instance, ClientError> {
        let tenant = Some(self.tenant.as_str());
        let reserved = match &self.placer {
            Some(p) => p.reserve(&self.tenant, &inst).await.map(|node| (p, node)),
            None => None,
        };
        let Some((placer, node)) = reserved else {
            return self.client.create(tenant, &inst).await;
        };
        inst.spec.node = Some(node);
        match self.client.create(tenant, &inst).await {
            Ok(made) => Ok(made),
            Err(e) => {
                placer.release(&self.tenant, &inst.name);
                if !matches!(e, ClientError::Api { .. }) {
                    return Err(e);
                }
                tracing::debug!(tenant = %self.tenant, instance = %inst.name, error = %e, "create on the reserved node; creating it unplaced");
                inst.spec.node = None;
                self.client.create(tenant, &inst).await
            }
        }
    }

    async fn note(&self, type_: EventType, reason: &str, service: &str, message: String) {
        super::record(
            &self.client,
            &self.tenant,
            super::Note {
                type_,
                source: "service-controller",
                reason,
                kind: "service",
                name: service,
                message,
            },
        )
        .await;
    }

    async fn delete(&self, instance: &str) -> Result<(), ClientError> {
        self.deleted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(instance.to_owned());
        match self
            .client
            .delete::<Instance>(Some(&self.tenant), instance)
            .await
        {
            Ok(_) => {}
            Err(e) => {
                // No delete event of ours follows (gone already: its event came or comes
                // as someone else's).
                self.forget_deleted(instance);
                if e.code() != Some(ErrorCode::NotFound) {
                    return Err(e);
                }
            }
        }
        self.instances.lock().await.remove(instance);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losses_are_recovered_first_then_deletions_then_changes() {
        assert_eq!(classify(3, 2, true), Priority::Recover, "a node took one");
        assert_eq!(classify(3, 2, false), Priority::Change, "a scale-up");
        assert_eq!(classify(3, 4, false), Priority::Delete, "a scale-down");
        assert_eq!(classify(0, 1, true), Priority::Delete);
        assert_eq!(classify(3, 3, true), Priority::Change, "replaced already");
        assert_eq!(classify(3, 3, false), Priority::Change, "a status");
    }

    #[test]
    fn instance_names_are_valid_and_distinct() {
        let long = "s".repeat(63);
        for svc in ["web", long.as_str(), "a-"] {
            let n = instance_name(svc);
            hive_api::validate::name("name", &n).unwrap();
            assert_ne!(n, instance_name(svc));
        }
    }

    #[test]
    fn a_probe_not_passing_yet_is_no_failure_until_the_grace_is_over() {
        let mut i = Instance::default();
        i.status.phase = InstancePhase::Running;
        i.status.reason = "Unready".into();
        i.status.message = "readiness probe failed: connection refused".into();
        // The node's clock an hour off either way changes nothing: only how long this
        // controller has seen the instance running counts.
        for skew in [-3600, 0, 3600] {
            i.status.started_at = Some(chrono::Utc::now() + chrono::TimeDelta::seconds(skew));
            assert_eq!(failing(&i, Duration::from_secs(1)), None, "skew {skew}");
            assert_eq!(
                failing(&i, UNREADY_GRACE + Duration::from_secs(1)).as_deref(),
                Some("Unready: readiness probe failed: connection refused"),
                "skew {skew}"
            );
        }
        i.status.reason = "ImagePullFailed".into();
        assert!(
            failing(&i, Duration::ZERO).is_some(),
            "other reasons count at once"
        );
        i.status.ready = true;
        assert_eq!(failing(&i, Duration::ZERO), None);
    }
}
