//! Service discovery on this node: for every instance placed here, the VIPs of its
//! tenant's services on its network (balanced inside its namespace over the services' ready
//! instances, by [`hive_net::NodeNet::set_service_routes`]) and a resolver answering its
//! tenant's names ([`hive_net::NodeNet::serve_dns`]), with the container's
//! `/etc/resolv.conf` pointing at it.
//!
//! What an instance sees is a function of its network (VNI: unique platform-wide, so one
//! tenant's) alone: one [`View`] per network with instances here, recomputed from the
//! caches of services and instances on every pass of the sync loop and applied to the
//! instances whose view changed. A starting container gets the current view before it
//! starts ([`prepare`]). Only services of the same tenant and network are ever in a view:
//! another tenant's names are NXDOMAIN, its VIPs mean nothing here.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use hive_api::{Instance, InstancePhase, Service};
use hive_net::{DnsZone, NodeNet, Protocol, ServiceRoute, SrvTarget};

/// What the instances of one network see.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    pub routes: Vec<ServiceRoute>,
    /// Shared by the resolvers of every instance of the network.
    pub zone: Arc<DnsZone>,
}

/// The current view of each network with instances here, by VNI (shared with start tasks).
pub type Views = Arc<Mutex<HashMap<u32, Arc<View>>>>;

/// The view last applied to each local instance (by uid), shared by the sync loop and the
/// start tasks (a start applies its instance's view before the container runs).
pub type Applied = Arc<Mutex<HashMap<String, Arc<View>>>>;

/// The domain of a tenant's names.
pub fn domain(tenant: &str) -> String {
    format!("{tenant}.hive")
}

fn proto(p: hive_api::Protocol) -> Protocol {
    match p {
        hive_api::Protocol::Tcp => Protocol::Tcp,
        hive_api::Protocol::Udp => Protocol::Udp,
    }
}

/// Whether `i` takes connections for its service: running, ready, with an address.
fn serving(i: &Instance) -> Option<Ipv4Addr> {
    let n = i.spec.network.as_ref()?;
    (i.status.ready && i.status.phase == InstancePhase::Running)
        .then(|| n.ip.parse().ok())
        .flatten()
}

/// The view of network `vni` (named `network`) of `tenant`: its services with a VIP, their
/// ready instances on that network, and the names of both.
pub fn view(
    tenant: &str,
    network: &str,
    vni: u32,
    services: &[Arc<Service>],
    instances: &[Arc<Instance>],
) -> View {
    let mut routes = Vec::new();
    let mut zone = DnsZone {
        domain: domain(tenant),
        ..Default::default()
    };
    let mut by_service: BTreeMap<&str, Vec<(&str, Ipv4Addr)>> = BTreeMap::new();
    for i in instances {
        if i.tenant != tenant || i.spec.network.as_ref().is_none_or(|n| n.vni != vni) {
            continue;
        }
        if let Some(ip) = serving(i) {
            by_service
                .entry(i.spec.service.as_str())
                .or_default()
                .push((i.name.as_str(), ip));
        }
    }
    for s in services {
        if s.tenant != tenant || s.spec.template.network() != network {
            continue;
        }
        let Ok(vip) = s.status.vip.parse::<Ipv4Addr>() else {
            continue;
        };
        let mut backends = by_service.remove(s.name.as_str()).unwrap_or_default();
        backends.sort();
        let mut ports: Vec<(Protocol, u16)> = s
            .spec
            .template
            .ports
            .iter()
            .map(|p| (proto(p.protocol), p.container_port))
            .collect();
        ports.sort();
        ports.dedup();
        let mut ips: Vec<Ipv4Addr> = backends.iter().map(|(_, ip)| *ip).collect();
        ips.sort();
        ips.dedup();
        routes.push(ServiceRoute {
            vip,
            ports: ports.clone(),
            backends: ips,
        });
        zone.a.insert(s.name.clone(), vec![vip]);
        for (name, ip) in &backends {
            zone.a.insert(format!("{name}.{}", s.name), vec![*ip]);
        }
        for (p, port) in &ports {
            let p = match p {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
            };
            zone.srv.insert(
                format!("_{port}._{p}.{}", s.name),
                backends
                    .iter()
                    .map(|(name, _)| SrvTarget {
                        port: *port,
                        target: format!("{name}.{}", s.name),
                    })
                    .collect(),
            );
        }
    }
    routes.sort();
    // Two services claiming one VIP (a corrupt store) must not fail the whole table.
    routes.dedup_by_key(|r| r.vip);
    View {
        routes,
        zone: Arc::new(zone),
    }
}

/// The `/etc/resolv.conf` of an instance of `tenant`.
pub fn resolv_conf(tenant: &str) -> String {
    format!(
        "nameserver {}\nsearch {}\noptions ndots:1\n",
        hive_net::RESOLVER_ADDR,
        domain(tenant)
    )
}

/// Before a container starts: its network's current view in its namespace, and its
/// `resolv.conf` written into `dir` (returned, for the spec to bind-mount).
// Every argument is one fact of this start (the instance, its network, where its files go,
// whether its namespace is new); a struct for them would be built at its one call only.
#[allow(clippy::too_many_arguments)]
pub async fn prepare(
    net: &NodeNet,
    views: &Views,
    applied: &Applied,
    id: &str,
    tenant: &str,
    vni: u32,
    dir: &Path,
    fresh_netns: bool,
) -> Result<PathBuf, String> {
    let view = views
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&vni)
        .cloned();
    let view = view.unwrap_or_else(|| {
        Arc::new(View {
            zone: Arc::new(DnsZone {
                domain: domain(tenant),
                ..Default::default()
            }),
            ..Default::default()
        })
    });
    // A namespace just made has no table to replace: with no VIP to route, there is nothing
    // to write (nor a socket to make inside it).
    if !(fresh_netns && view.routes.is_empty()) {
        net.set_service_routes(id, &view.routes)
            .await
            .map_err(|e| e.to_string())?;
    }
    net.serve_dns(id, view.zone.clone())
        .await
        .map_err(|e| e.to_string())?;
    // Applied: the loop's next pass need not write the same view again.
    applied
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id.to_owned(), view);
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let path = dir.join("resolv.conf");
    std::fs::write(&path, resolv_conf(tenant))
        .map_err(|e| format!("write {}: {e}", path.display()))?;
    Ok(path)
}

/// How long a changed view waits before it is applied to the instances running here, after
/// the change and after the last start began, so that the changes that come together (a new
/// service, then its first ready instance) make one transaction per namespace (a start
/// applies its own instance's view at once).
pub const SETTLE: Duration = Duration::from_millis(50);

/// How long changed views may wait for the starts under way before they are applied to
/// the instances running here: a node that starts containers without pause writes its
/// views about once a second (as kube-proxy's default `minSyncPeriod` does its rules).
pub const HOLD_WHILE_STARTING: Duration = Duration::from_secs(1);

/// How long the task writing views may pause, in all, for the starts working on the
/// agent's thread.
const YIELD_TO_STARTS: Duration = Duration::from_millis(100);

/// Whether a start is in a part of its work on the agent's thread (its network, its
/// report): the task writing changed views waits for none to be, so that a start's netlink
/// round trips and requests are not each made to wait behind one namespace's transaction
/// (it goes on while the runtime makes the container, when this thread has nothing to do).
#[derive(Debug, Default)]
pub struct Quiet {
    holds: AtomicUsize,
    ended: Notify,
    /// When it was last held.
    last: Mutex<Option<Instant>>,
}

/// One hold on [`Quiet`], released when dropped.
#[derive(Debug)]
pub struct QuietHold(Arc<Quiet>);

impl Quiet {
    pub fn hold(self: &Arc<Self>) -> QuietHold {
        self.holds.fetch_add(1, Ordering::SeqCst);
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        QuietHold(self.clone())
    }

    fn last_hold(&self) -> Option<Instant> {
        *self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns once nothing holds it, or at `until`.
    async fn wait(&self, until: tokio::time::Instant) {
        loop {
            let ended = self.ended.notified();
            if self.holds.load(Ordering::SeqCst) == 0 {
                return;
            }
            if tokio::time::timeout_at(until, ended).await.is_err() {
                return;
            }
        }
    }
}

impl Drop for QuietHold {
    fn drop(&mut self) {
        if self.0.holds.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.ended.notify_waiters();
        }
    }
}

/// What the sync loop keeps between passes.
#[derive(Debug, Default)]
pub struct ServiceState {
    pub views: Views,
    /// The view last applied to each local instance (by uid).
    pub applied: Applied,
    /// Held by starts while they work on this thread.
    pub quiet: Arc<Quiet>,
    /// Since when changed views wait.
    held_since: Option<Instant>,
    /// The task writing changed views into the namespaces, while it runs.
    applying: Option<tokio::task::JoinHandle<()>>,
    /// Notified when that task ends if views changed while it ran (they are due then).
    pub more_due: Arc<Notify>,
    /// Whether views changed while that task ran.
    changed_meanwhile: Arc<AtomicBool>,
}

impl ServiceState {
    /// Recomputes the view of every network with instances here and has the changed ones
    /// applied. `here`: the instances placed here (uid → instance); `all`: every instance on
    /// a network; `services`: every tenant's services (tenant → services); `starting`: the
    /// instances whose start task is under way (it applies their view itself).
    ///
    /// A changed view is a transaction in every namespace of its network here (~0.1 ms of
    /// this thread's time each): it waits until [`SETTLE`] has passed since the change and
    /// since the last start began (on this node's two busy CPUs they slowed the starts), up
    /// to [`HOLD_WHILE_STARTING`] after the change; the changes made meanwhile make one
    /// transaction per namespace. The transactions are made by a task of their own, one
    /// namespace at a time with a yield between and pausing while a start works on this
    /// thread ([`Quiet`]), so that the loop's next passes (a start it has to begin) do not
    /// wait for all of them. Returns when to pass again for views not applied yet, if any.
    pub fn sync(
        &mut self,
        net: &Arc<NodeNet>,
        here: &BTreeMap<String, &Instance>,
        all: &[Arc<Instance>],
        services: &HashMap<String, Vec<Arc<Service>>>,
        starting: &HashSet<String>,
    ) -> Option<Instant> {
        let mut views: HashMap<u32, Arc<View>> = HashMap::new();
        for i in here.values() {
            let Some(n) = &i.spec.network else { continue };
            if views.contains_key(&n.vni) {
                continue;
            }
            let svcs = services.get(&i.tenant).map_or(&[][..], |s| s.as_slice());
            let v = view(&i.tenant, &n.name, n.vni, svcs, all);
            let v = match self
                .views
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&n.vni)
            {
                Some(old) if **old == v => old.clone(),
                _ => Arc::new(v),
            };
            views.insert(n.vni, v);
        }
        *self.views.lock().unwrap_or_else(|e| e.into_inner()) = views.clone();
        let applied = {
            let mut a = self.applied.lock().unwrap_or_else(|e| e.into_inner());
            a.retain(|id, _| here.contains_key(id) || starting.contains(id));
            a.clone()
        };
        let work: Vec<(String, Arc<View>)> = here
            .iter()
            .filter_map(|(id, i)| {
                let v = i.spec.network.as_ref().and_then(|n| views.get(&n.vni))?;
                // One being started gets its view from its start task.
                let current = starting.contains(id)
                    || applied.get(id).is_some_and(|a| Arc::ptr_eq(a, v) || a == v);
                (!current).then(|| (id.clone(), v.clone()))
            })
            .collect();
        if work.is_empty() {
            self.held_since = None;
            return None;
        }
        if self.applying.as_ref().is_some_and(|t| !t.is_finished()) {
            // It notifies the loop when it is done. (Only then: a namespace whose write
            // failed is tried again at a later pass, not in a loop of its own.)
            self.changed_meanwhile.store(true, Ordering::SeqCst);
            return None;
        }
        let now = Instant::now();
        let since = *self.held_since.get_or_insert(now);
        // SETTLE after the change and after the last start began (a start under way counts
        // as beginning now), HOLD_WHILE_STARTING after the change at most.
        let last_start = if starting.is_empty() {
            self.quiet.last_hold().unwrap_or(since)
        } else {
            now
        };
        let due = (since.max(last_start) + SETTLE).min(since + HOLD_WHILE_STARTING);
        if now < due {
            return Some(due);
        }
        self.held_since = None;
        let (net, applied, quiet) = (net.clone(), self.applied.clone(), self.quiet.clone());
        let (done, changed) = (self.more_due.clone(), self.changed_meanwhile.clone());
        changed.store(false, Ordering::SeqCst);
        self.applying = Some(tokio::spawn(async move {
            // Starts go first, but not for ever: a node starting without pause still gets
            // its views.
            let (t0, count) = (Instant::now(), work.len());
            let until = tokio::time::Instant::now() + YIELD_TO_STARTS;
            for (id, v) in work {
                quiet.wait(until).await;
                // No namespace yet (its start is under way): the start applies the view.
                let r = async {
                    net.set_service_routes(&id, &v.routes).await?;
                    net.serve_dns(&id, v.zone.clone()).await
                }
                .await;
                match r {
                    Ok(()) => {
                        applied
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(id, v);
                    }
                    Err(e) => tracing::debug!(instance = %id, error = %e, "service routes"),
                }
                tokio::task::yield_now().await;
            }
            tracing::debug!(
                namespaces = count,
                ms = t0.elapsed().as_secs_f64() * 1e3,
                "service views applied"
            );
            if changed.swap(false, Ordering::SeqCst) {
                done.notify_one();
            }
        }));
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hive_api::{InstanceNetwork, PortSpec};

    fn svc(tenant: &str, name: &str, vip: &str, network: Option<&str>) -> Service {
        let mut s = Service {
            name: name.into(),
            tenant: tenant.into(),
            ..Default::default()
        };
        s.status.vip = vip.into();
        s.spec.template.network = network.map(str::to_owned);
        s.spec.template.ports = vec![
            PortSpec {
                container_port: 80,
                ..Default::default()
            },
            PortSpec {
                container_port: 53,
                protocol: hive_api::Protocol::Udp,
                published_port: None,
            },
        ];
        s
    }

    fn inst(tenant: &str, name: &str, service: &str, vni: u32, ip: &str, ready: bool) -> Instance {
        let mut i = Instance {
            name: name.into(),
            tenant: tenant.into(),
            ..Default::default()
        };
        i.spec.service = service.into();
        i.spec.network = Some(InstanceNetwork {
            name: "default".into(),
            vni,
            ip: ip.into(),
            prefix_len: 16,
            gateway: "10.88.0.1".into(),
            mac: "02:48:0a:58:00:09".into(),
        });
        i.status.ready = ready;
        i.status.phase = InstancePhase::Running;
        i
    }

    #[test]
    fn a_view_holds_the_tenants_services_on_its_network_and_their_ready_instances() {
        let services = [
            svc("acme", "web", "10.88.0.2", None),
            svc("acme", "db", "10.50.0.2", Some("backend")),
            svc("acme", "novip", "", None),
        ]
        .map(Arc::new);
        let instances = [
            inst("acme", "web-a", "web", 5000, "10.88.0.5", true),
            inst("acme", "web-b", "web", 5000, "10.88.0.4", true),
            inst("acme", "web-c", "web", 5000, "10.88.0.6", false),
            // Another tenant's instance with the same service name, VNI differs.
            inst("blue", "web-x", "web", 6000, "10.88.0.7", true),
        ]
        .map(Arc::new);
        let v = view("acme", "default", 5000, &services, &instances);
        assert_eq!(
            v.routes,
            [ServiceRoute {
                vip: "10.88.0.2".parse().unwrap(),
                ports: vec![(Protocol::Tcp, 80), (Protocol::Udp, 53)],
                backends: vec!["10.88.0.4".parse().unwrap(), "10.88.0.5".parse().unwrap()],
            }]
        );
        assert_eq!(v.zone.domain, "acme.hive");
        assert_eq!(v.zone.a["web"], ["10.88.0.2".parse::<Ipv4Addr>().unwrap()]);
        assert_eq!(
            v.zone.a["web-a.web"],
            ["10.88.0.5".parse::<Ipv4Addr>().unwrap()]
        );
        assert!(!v.zone.a.contains_key("web-c.web"), "unready");
        assert!(!v.zone.a.contains_key("db"), "another network");
        assert!(!v.zone.a.contains_key("novip"));
        let srv: Vec<&str> = v.zone.srv["_80._tcp.web"]
            .iter()
            .map(|t| t.target.as_str())
            .collect();
        assert_eq!(srv, ["web-a.web", "web-b.web"]);
        assert!(v.zone.srv.contains_key("_53._udp.web"));
        // The other tenant, even with an instance of a same-named service, sees nothing of
        // acme's.
        let b = view("blue", "default", 6000, &services, &instances);
        assert!(b.routes.is_empty() && b.zone.a.is_empty(), "{b:?}");
        assert_eq!(b.zone.domain, "blue.hive");
    }

    #[tokio::test]
    async fn the_view_writer_waits_for_the_starts_holds_but_not_past_its_limit() {
        use tokio::time::Instant;
        let quiet = Arc::new(Quiet::default());
        let t0 = Instant::now();
        // Nothing holds it: no wait.
        quiet.wait(t0 + Duration::from_secs(10)).await;
        assert!(t0.elapsed() < Duration::from_secs(5));
        // Two holds: the wait ends when the last one goes.
        let (a, b) = (quiet.hold(), quiet.hold());
        let waiter = {
            let q = quiet.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                q.wait(t + Duration::from_secs(10)).await;
                t.elapsed()
            })
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        drop(a);
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(!waiter.is_finished(), "one hold is left");
        drop(b);
        let waited = waiter.await.unwrap();
        assert!(
            waited >= Duration::from_millis(10) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        // A hold never released: the wait ends at its limit.
        let _stuck = quiet.hold();
        let t = Instant::now();
        quiet.wait(t + Duration::from_millis(30)).await;
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(30) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
    }

    #[test]
    fn resolv_conf_points_at_the_namespace_resolver() {
        assert_eq!(
            resolv_conf("acme"),
            "nameserver 127.0.0.53\nsearch acme.hive\noptions ndots:1\n"
        );
    }
}
