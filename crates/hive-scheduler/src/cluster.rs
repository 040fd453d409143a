//! The scheduler's view of the nodes and the placement of one request.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

/// CPU in millicores, memory in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    /// Guaranteed network bandwidth, bits/s.
    pub network_bps: u64,
}

impl Resources {
    fn fits_in(&self, free: &Resources) -> bool {
        self.cpu_millis <= free.cpu_millis
            && self.memory_bytes <= free.memory_bytes
            && self.network_bps <= free.network_bps
    }
}

/// What the scheduler is told about a node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub allocatable: Resources,
    pub labels: BTreeMap<String, String>,
    /// Lease fresh.
    pub ready: bool,
    /// Cordoned by the operator.
    pub unschedulable: bool,
    /// The tenant the node is bound to; None: the pool (bound on first placement).
    pub tenant: Option<String>,
    /// Takes any tenant's instances and is never bound.
    pub shared: bool,
    /// Node ports the host's own programs listen on (`udp`, port), sorted: never published.
    pub listening: Vec<(bool, u16)>,
}

/// One instance to place.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    pub tenant: String,
    pub service: String,
    pub requests: Resources,
    /// Labels the node must carry.
    pub selector: BTreeMap<String, String>,
    /// Node ports it publishes (`udp` false: TCP): a node publishes each once.
    pub host_ports: Vec<(bool, u16)>,
}

/// Why a node cannot take a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    NotReady,
    Cordoned,
    OtherTenant,
    SelectorMismatch,
    InsufficientCpu,
    InsufficientMemory,
    InsufficientBandwidth,
    PortInUse,
    PortTakenByHost,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NotReady => "not ready",
            Reason::Cordoned => "unschedulable",
            Reason::OtherTenant => "bound to another tenant",
            Reason::SelectorMismatch => "not matching the selector",
            Reason::InsufficientCpu => "insufficient cpu",
            Reason::InsufficientMemory => "insufficient memory",
            Reason::InsufficientBandwidth => "insufficient network bandwidth",
            Reason::PortInUse => "node port already published",
            Reason::PortTakenByHost => "node port taken by the host",
        }
    }
}

/// No node can take the request: how many nodes refused it for which reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unschedulable {
    pub nodes: usize,
    pub reasons: BTreeMap<Reason, usize>,
}

impl fmt::Display for Unschedulable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0/{} nodes available", self.nodes)?;
        let mut counts: Vec<(&Reason, &usize)> = self.reasons.iter().collect();
        counts.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (i, (reason, n)) in counts.iter().enumerate() {
            write!(
                f,
                "{}{n} {}",
                if i == 0 { ": " } else { ", " },
                reason.as_str()
            )?;
        }
        Ok(())
    }
}

/// Where a request went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub node: String,
    /// The node came from the shared pool and is now bound to the request's tenant.
    pub binds_tenant: bool,
}

#[derive(Debug)]
struct NodeState {
    info: NodeInfo,
    allocated: Resources,
    instances: u32,
    /// Instances per `tenant/service`.
    per_service: HashMap<String, u32>,
    /// Node ports published by the instances placed here.
    host_ports: HashMap<(bool, u16), u32>,
}

impl NodeState {
    fn free(&self) -> Resources {
        Resources {
            cpu_millis: self
                .info
                .allocatable
                .cpu_millis
                .saturating_sub(self.allocated.cpu_millis),
            memory_bytes: self
                .info
                .allocatable
                .memory_bytes
                .saturating_sub(self.allocated.memory_bytes),
            network_bps: self
                .info
                .allocatable
                .network_bps
                .saturating_sub(self.allocated.network_bps),
        }
    }

    /// The first reason this node cannot take `req`, if any.
    fn refuse(&self, req: &Request) -> Option<Reason> {
        if !self.info.ready {
            return Some(Reason::NotReady);
        }
        if self.info.unschedulable {
            return Some(Reason::Cordoned);
        }
        match &self.info.tenant {
            _ if self.info.shared => {}
            Some(t) if *t != req.tenant => return Some(Reason::OtherTenant),
            // A pool node with something on it is on its way to another tenant or back to the
            // pool: not free for anyone.
            None if self.instances > 0 => return Some(Reason::OtherTenant),
            _ => {}
        }
        if req
            .selector
            .iter()
            .any(|(k, v)| self.info.labels.get(k) != Some(v))
        {
            return Some(Reason::SelectorMismatch);
        }
        let free = self.free();
        if req.requests.cpu_millis > free.cpu_millis {
            return Some(Reason::InsufficientCpu);
        }
        if req.requests.memory_bytes > free.memory_bytes {
            return Some(Reason::InsufficientMemory);
        }
        if !req.requests.fits_in(&free) {
            return Some(Reason::InsufficientBandwidth);
        }
        if req
            .host_ports
            .iter()
            .any(|p| self.host_ports.contains_key(p))
        {
            return Some(Reason::PortInUse);
        }
        if req
            .host_ports
            .iter()
            .any(|p| self.info.listening.binary_search(p).is_ok())
        {
            return Some(Reason::PortTakenByHost);
        }
        None
    }

    /// Higher is better; only called for nodes that fit.
    fn score(&self, req: &Request, key: &str) -> u64 {
        let frac = |used: u64, total: u64| {
            if total == 0 {
                1.0
            } else {
                used as f64 / total as f64
            }
        };
        let cpu = frac(
            self.allocated.cpu_millis + req.requests.cpu_millis,
            self.info.allocatable.cpu_millis,
        );
        let mem = frac(
            self.allocated.memory_bytes + req.requests.memory_bytes,
            self.info.allocatable.memory_bytes,
        );
        let least_allocated = (1.0 - (cpu + mem) / 2.0).clamp(0.0, 1.0) * 100.0;
        let balanced = (1.0 - (cpu - mem).abs()).clamp(0.0, 1.0) * 100.0;
        let same = self.per_service.get(key).copied().unwrap_or(0);
        let spread = 100.0 / (1.0 + same as f64);
        // Tenants hold whole nodes: fill the tenant's own nodes before taking one from the pool.
        // More than the other scores can add up to (300), or spreading and balance would take
        // a fresh pool node while the tenant's own still have room.
        let own = if self.info.tenant.as_deref() == Some(req.tenant.as_str()) {
            1000.0
        } else {
            0.0
        };
        (least_allocated + balanced + spread + own) as u64
    }
}

/// The nodes and what is placed on them.
#[derive(Debug, Default)]
pub struct Cluster {
    nodes: Vec<Option<NodeState>>,
    by_name: HashMap<String, usize>,
    /// Nodes bound to each tenant.
    tenant_nodes: HashMap<String, Vec<usize>>,
    /// Nodes bound to no tenant.
    pool: BTreeSet<usize>,
    /// Nodes that take every tenant.
    shared: BTreeSet<usize>,
    /// Where the scan of pool nodes resumes, so placements rotate through them.
    cursor: usize,
    /// Most fitting pool nodes scored per placement (the rest are alike: empty).
    pub pool_sample: usize,
}

fn service_key(req: &Request) -> String {
    format!("{}/{}", req.tenant, req.service)
}

impl Cluster {
    pub fn new() -> Self {
        Self {
            pool_sample: 16,
            ..Default::default()
        }
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Adds a node or updates what is known of it (keeping what is placed on it).
    pub fn upsert_node(&mut self, info: NodeInfo) {
        let i = match self.by_name.get(&info.name) {
            Some(&i) => {
                let old_tenant = self.nodes[i].as_ref().and_then(|n| n.info.tenant.clone());
                self.unindex_tenant(old_tenant.as_deref(), i);
                if let Some(n) = self.nodes[i].as_mut() {
                    n.info = info;
                }
                i
            }
            None => {
                let i = self.nodes.len();
                self.by_name.insert(info.name.clone(), i);
                self.nodes.push(Some(NodeState {
                    info,
                    allocated: Resources::default(),
                    instances: 0,
                    per_service: HashMap::new(),
                    host_ports: HashMap::new(),
                }));
                i
            }
        };
        let tenant = self.nodes[i].as_ref().and_then(|n| n.info.tenant.clone());
        self.index_tenant(tenant.as_deref(), i);
    }

    pub fn remove_node(&mut self, name: &str) {
        if let Some(i) = self.by_name.remove(name) {
            let tenant = self.nodes[i].as_ref().and_then(|n| n.info.tenant.clone());
            self.unindex_tenant(tenant.as_deref(), i);
            self.nodes[i] = None;
        }
    }

    fn index_tenant(&mut self, tenant: Option<&str>, i: usize) {
        if self
            .nodes
            .get(i)
            .and_then(Option::as_ref)
            .is_some_and(|n| n.info.shared)
        {
            self.shared.insert(i);
            return;
        }
        match tenant {
            Some(t) => self.tenant_nodes.entry(t.to_owned()).or_default().push(i),
            None => {
                self.pool.insert(i);
            }
        }
    }

    fn unindex_tenant(&mut self, tenant: Option<&str>, i: usize) {
        self.shared.remove(&i);
        if tenant.is_none() {
            self.pool.remove(&i);
        }
        if let Some(t) = tenant
            && let Some(v) = self.tenant_nodes.get_mut(t)
        {
            v.retain(|&x| x != i);
            if v.is_empty() {
                self.tenant_nodes.remove(t);
            }
        }
    }

    /// Records an instance already placed on `node` (from the store, at start-up).
    pub fn add_placed(&mut self, node: &str, req: &Request) {
        if let Some(&i) = self.by_name.get(node) {
            self.account(i, req);
        }
    }

    fn account(&mut self, i: usize, req: &Request) {
        let Some(n) = self.nodes[i].as_mut() else {
            return;
        };
        n.allocated.cpu_millis += req.requests.cpu_millis;
        n.allocated.memory_bytes += req.requests.memory_bytes;
        n.allocated.network_bps += req.requests.network_bps;
        n.instances += 1;
        *n.per_service.entry(service_key(req)).or_default() += 1;
        for p in &req.host_ports {
            *n.host_ports.entry(*p).or_default() += 1;
        }
    }

    /// Frees what `req` held on `node` (the instance ended or was deleted).
    pub fn release(&mut self, node: &str, req: &Request) {
        let Some(&i) = self.by_name.get(node) else {
            return;
        };
        let Some(n) = self.nodes[i].as_mut() else {
            return;
        };
        n.allocated.cpu_millis = n
            .allocated
            .cpu_millis
            .saturating_sub(req.requests.cpu_millis);
        n.allocated.memory_bytes = n
            .allocated
            .memory_bytes
            .saturating_sub(req.requests.memory_bytes);
        n.allocated.network_bps = n
            .allocated
            .network_bps
            .saturating_sub(req.requests.network_bps);
        n.instances = n.instances.saturating_sub(1);
        let key = service_key(req);
        if let Some(c) = n.per_service.get_mut(&key) {
            *c -= 1;
            if *c == 0 {
                n.per_service.remove(&key);
            }
        }
        for p in &req.host_ports {
            if let Some(c) = n.host_ports.get_mut(p) {
                *c -= 1;
                if *c == 0 {
                    n.host_ports.remove(p);
                }
            }
        }
    }

    /// Instances on `node`.
    pub fn instances_on(&self, node: &str) -> Option<u32> {
        self.by_name
            .get(node)
            .and_then(|&i| self.nodes[i].as_ref())
            .map(|n| n.instances)
    }

    /// Returns an empty bound node to the shared pool. False if it still runs something.
    pub fn unbind_if_empty(&mut self, node: &str) -> bool {
        let Some(&i) = self.by_name.get(node) else {
            return false;
        };
        let (empty, tenant) = match self.nodes[i].as_ref() {
            Some(n) => (n.instances == 0, n.info.tenant.clone()),
            None => return false,
        };
        if !empty || tenant.is_none() {
            return false;
        }
        self.unindex_tenant(tenant.as_deref(), i);
        self.index_tenant(None, i);
        if let Some(n) = self.nodes[i].as_mut() {
            n.info.tenant = None;
        }
        true
    }

    /// Places `req` on the best node and reserves its resources there (binding a pool node to
    /// the tenant when it takes one), or says why no node can take it.
    pub fn place(&mut self, req: &Request) -> Result<Placement, Unschedulable> {
        let key = service_key(req);
        let mut best: Option<(u64, usize)> = None;
        let mut consider = |i: usize, n: &NodeState| {
            if n.refuse(req).is_none() {
                let s = n.score(req, &key);
                if best.is_none_or(|(bs, bi)| s > bs || (s == bs && i < bi)) {
                    best = Some((s, i));
                }
            }
        };
        if let Some(own) = self.tenant_nodes.get(&req.tenant) {
            for &i in own {
                if let Some(n) = self.nodes[i].as_ref() {
                    consider(i, n);
                }
            }
        }
        for &i in &self.shared {
            if let Some(n) = self.nodes[i].as_ref() {
                consider(i, n);
            }
        }
        // Pool nodes are all empty: a bounded sample, rotating, is as good as all of them.
        let mut sampled = 0;
        let mut last = None;
        for &i in self
            .pool
            .range(self.cursor..)
            .chain(self.pool.range(..self.cursor))
        {
            if sampled == self.pool_sample {
                break;
            }
            last = Some(i);
            if let Some(n) = self.nodes[i].as_ref()
                && n.refuse(req).is_none()
            {
                consider(i, n);
                sampled += 1;
            }
        }
        if let Some(i) = last {
            self.cursor = i + 1;
        }
        let Some((_, i)) = best else {
            return Err(self.explain(req));
        };
        let binds_tenant = self.nodes[i]
            .as_ref()
            .is_some_and(|n| n.info.tenant.is_none() && !n.info.shared);
        if binds_tenant {
            if let Some(n) = self.nodes[i].as_mut() {
                n.info.tenant = Some(req.tenant.clone());
            }
            self.unindex_tenant(None, i);
            self.index_tenant(Some(&req.tenant), i);
        }
        self.account(i, req);
        let node = self.nodes[i]
            .as_ref()
            .map(|n| n.info.name.clone())
            .unwrap_or_default();
        Ok(Placement { node, binds_tenant })
    }

    /// Every node's reason for refusing `req`.
    pub fn explain(&self, req: &Request) -> Unschedulable {
        let mut reasons = BTreeMap::new();
        for n in self.nodes.iter().flatten() {
            if let Some(r) = n.refuse(req) {
                *reasons.entry(r).or_insert(0) += 1;
            }
        }
        Unschedulable {
            nodes: self.len(),
            reasons,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn node(name: &str, cpu: u64, mem_gib: u64) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            allocatable: Resources {
                cpu_millis: cpu,
                memory_bytes: mem_gib * GIB,
                network_bps: 10_000_000_000,
            },
            ready: true,
            ..Default::default()
        }
    }

    fn req(tenant: &str, service: &str, cpu: u64, mem_gib: u64) -> Request {
        Request {
            tenant: tenant.into(),
            service: service.into(),
            requests: Resources {
                cpu_millis: cpu,
                memory_bytes: mem_gib * GIB,
                network_bps: 0,
            },
            ..Default::default()
        }
    }

    #[test]
    fn guaranteed_bandwidth_is_reserved_from_the_link() {
        let mut c = Cluster::new();
        let mut n = node("n0", 8000, 16);
        n.shared = true;
        c.upsert_node(n);
        let mut video = req("a", "video", 100, 0);
        video.requests.network_bps = 4_000_000_000;
        c.place(&video).unwrap();
        c.place(&video).unwrap();
        // 8 of 10 Gbit/s are reserved: a third 4 Gbit/s guarantee does not fit.
        let err = c.place(&video).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0/1 nodes available: 1 insufficient network bandwidth"
        );
        // More than any node's link: never placed; no guarantee: placed.
        let mut huge = req("a", "huge", 100, 0);
        huge.requests.network_bps = 40_000_000_000;
        assert!(c.place(&huge).is_err());
        c.place(&req("a", "plain", 100, 0)).unwrap();
        c.release("n0", &video);
        c.place(&video).unwrap();
    }

    #[test]
    fn pool_nodes_are_bound_on_first_placement_and_stay_exclusive() {
        let mut c = Cluster::new();
        c.upsert_node(node("n1", 4000, 8));
        c.upsert_node(node("n2", 4000, 8));
        let p = c.place(&req("a", "web", 1000, 1)).unwrap();
        assert!(p.binds_tenant);
        // Tenant a fills its own node before taking another from the pool.
        let p2 = c.place(&req("a", "web", 1000, 1)).unwrap();
        assert_eq!(p2.node, p.node);
        assert!(!p2.binds_tenant);
        // Tenant b never lands on a's node.
        let pb = c.place(&req("b", "db", 1000, 1)).unwrap();
        assert_ne!(pb.node, p.node);
        // No pool node left: a third tenant is unschedulable, with the reason counted.
        let err = c.place(&req("c", "x", 100, 1)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0/2 nodes available: 2 bound to another tenant"
        );
        // Emptied and unbound, a node serves the next tenant.
        let r = req("b", "db", 1000, 1);
        c.release(&pb.node, &r);
        assert!(c.unbind_if_empty(&pb.node));
        assert_eq!(c.place(&req("c", "x", 100, 1)).unwrap().node, pb.node);
        assert!(
            !c.unbind_if_empty(&p.node),
            "a node still running something stays bound"
        );
    }

    #[test]
    fn a_tenant_fills_its_own_nodes_before_taking_another_from_the_pool() {
        let mut c = Cluster::new();
        for i in 0..4 {
            c.upsert_node(node(&format!("n{i}"), 1000, 8));
        }
        // CPU-only requests: spreading and balance alone would prefer an empty pool node.
        let mut used = BTreeSet::new();
        for _ in 0..20 {
            used.insert(c.place(&req("a", "web", 100, 0)).unwrap().node);
        }
        assert_eq!(used.len(), 2, "{used:?}");
    }

    #[test]
    fn resources_are_reserved_and_explained() {
        let mut c = Cluster::new();
        let mut n = node("n1", 2000, 4);
        n.tenant = Some("a".into());
        c.upsert_node(n);
        c.place(&req("a", "s", 1500, 1)).unwrap();
        let err = c.place(&req("a", "s", 1000, 1)).unwrap_err();
        assert_eq!(err.to_string(), "0/1 nodes available: 1 insufficient cpu");
        let err = c.place(&req("a", "s", 100, 5)).unwrap_err();
        assert_eq!(err.reasons[&Reason::InsufficientMemory], 1);
        c.release("n1", &req("a", "s", 1500, 1));
        c.place(&req("a", "s", 2000, 4)).unwrap();
    }

    #[test]
    fn filters_count_every_reason() {
        let mut c = Cluster::new();
        let mut down = node("down", 4000, 8);
        down.ready = false;
        let mut cordoned = node("cordoned", 4000, 8);
        cordoned.unschedulable = true;
        let mut other = node("other", 4000, 8);
        other.tenant = Some("z".into());
        let small = node("small", 100, 8);
        for n in [down, cordoned, other, small] {
            c.upsert_node(n);
        }
        let err = c.place(&req("a", "s", 500, 1)).unwrap_err();
        assert_eq!(err.nodes, 4);
        assert_eq!(err.reasons.values().sum::<usize>(), 4);
        let msg = err.to_string();
        for part in [
            "1 not ready",
            "1 unschedulable",
            "1 bound to another tenant",
            "1 insufficient cpu",
        ] {
            assert!(msg.contains(part), "{msg}");
        }
        let mut sel = req("a", "s", 10, 0);
        sel.selector.insert("disk".into(), "ssd".into());
        let mut ssd = node("ssd", 4000, 8);
        ssd.labels.insert("disk".into(), "ssd".into());
        c.upsert_node(ssd);
        assert_eq!(c.place(&sel).unwrap().node, "ssd");
        sel.selector.insert("zone".into(), "b".into());
        assert!(
            c.place(&sel)
                .unwrap_err()
                .reasons
                .contains_key(&Reason::SelectorMismatch)
        );
    }

    #[test]
    fn replicas_spread_over_the_tenants_nodes() {
        let mut c = Cluster::new();
        for i in 0..3 {
            let mut n = node(&format!("n{i}"), 8000, 16);
            n.tenant = Some("a".into());
            c.upsert_node(n);
        }
        let mut nodes: Vec<String> = (0..3)
            .map(|_| c.place(&req("a", "web", 100, 0)).unwrap().node)
            .collect();
        nodes.sort();
        assert_eq!(nodes, ["n0", "n1", "n2"]);
    }

    #[test]
    fn a_node_port_is_published_once_per_node() {
        let mut c = Cluster::new();
        for i in 0..2 {
            let mut n = node(&format!("n{i}"), 8000, 16);
            n.shared = true;
            c.upsert_node(n);
        }
        let mut web = req("a", "web", 100, 0);
        web.host_ports = vec![(false, 8080)];
        let first = c.place(&web).unwrap().node;
        let second = c.place(&web).unwrap().node;
        assert_ne!(first, second, "both publish tcp/8080");
        let err = c.place(&web).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0/2 nodes available: 2 node port already published"
        );
        // UDP on the same number is another port; releasing frees the TCP one.
        let mut dns = req("b", "dns", 100, 0);
        dns.host_ports = vec![(true, 8080)];
        c.place(&dns).unwrap();
        c.release(&first, &web);
        assert_eq!(c.place(&web).unwrap().node, first);
    }

    #[test]
    fn a_port_the_host_listens_on_is_never_published_there() {
        let mut c = Cluster::new();
        for (name, listening) in [("api", vec![(false, 22), (false, 7080)]), ("n1", vec![])] {
            let mut n = node(name, 8000, 16);
            n.shared = true;
            n.listening = listening;
            c.upsert_node(n);
        }
        let mut web = req("a", "web", 100, 0);
        web.host_ports = vec![(false, 7080)];
        assert_eq!(c.place(&web).unwrap().node, "n1");
        assert_eq!(
            c.place(&web).unwrap_err().to_string(),
            "0/2 nodes available: 1 node port already published, 1 node port taken by the host"
        );
        // UDP 7080 is free on the host.
        let mut udp = req("a", "dns", 100, 0);
        udp.host_ports = vec![(true, 7080)];
        c.place(&udp).unwrap();
    }

    #[test]
    fn a_shared_node_takes_every_tenant_and_is_never_bound() {
        let mut c = Cluster::new();
        let mut n = node("shared", 4000, 8);
        n.shared = true;
        c.upsert_node(n);
        for t in ["a", "b", "c"] {
            let p = c.place(&req(t, "s", 500, 1)).unwrap();
            assert_eq!((p.node.as_str(), p.binds_tenant), ("shared", false));
        }
        assert_eq!(c.instances_on("shared"), Some(3));
        assert!(!c.unbind_if_empty("shared"));
        // Updating it keeps it shared and keeps what runs there.
        let mut n = node("shared", 4000, 8);
        n.shared = true;
        c.upsert_node(n);
        c.place(&req("d", "s", 500, 1)).unwrap();
        assert_eq!(c.instances_on("shared"), Some(4));
    }

    #[test]
    fn removed_nodes_are_forgotten() {
        let mut c = Cluster::new();
        c.upsert_node(node("n1", 1000, 1));
        c.remove_node("n1");
        assert!(c.is_empty());
        assert_eq!(c.place(&req("a", "s", 1, 0)).unwrap_err().nodes, 0);
        // Updating a node keeps what is placed on it.
        c.upsert_node(node("n2", 1000, 1));
        c.place(&req("a", "s", 600, 0)).unwrap();
        c.upsert_node(node("n2", 1000, 1));
        assert_eq!(c.instances_on("n2"), Some(1));
        assert!(c.place(&req("a", "s", 600, 0)).is_err());
    }
}
