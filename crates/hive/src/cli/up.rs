//! `hive up` and `hive server`: the API server on its store (embedded by default, or etcd),
//! and for `up` also this machine registered as a node, a first tenant and a logged-in CLI.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use hive_agent::datadir::{DirLock, NetRecord, NodeRecord, RUNTIME_DIR, StateMount};
use hive_api::Tenant;
use hive_client::Client;
use hive_server::{ADMIN_TOKEN_FILE, Launched, RateLimit, ServerConfig, leader};
use hive_store::WatchCacheOptions;

use super::{Global, config};

/// The port `hive up` and `hive server` listen on by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7080";
/// The first tenant `hive up` creates.
pub const DEFAULT_TENANT: &str = "default";
/// The OCI runtime the node uses (chosen by measurement: docs/runtime.md).
pub const DEFAULT_RUNTIME: &str = "crun";
/// How often a node renews its lease.
pub const LEASE_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Where the embedded store, the admin token and the registry's blobs live.
    #[arg(long, default_value = "/var/lib/hive", env = "HIVE_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Where the registry keeps its blobs, uploads and repositories (default:
    /// `DATA_DIR/registry`). Servers sharing one etcd must share this directory too (one
    /// filesystem path they all mount), or an image pushed through one is unknown to another.
    #[arg(long, env = "HIVE_REGISTRY_DIR")]
    pub registry_dir: Option<PathBuf>,
    /// Where the state lives: `embedded` (a redb file in the data dir; one server), or
    /// `etcd://HOST:PORT[,HOST:PORT…]` (`etcds://…` for TLS) to share it between several
    /// servers. Give every member: Hive moves to another when one fails.
    #[arg(long, default_value = "embedded", env = "HIVE_STORE")]
    pub store: String,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Address to serve the API on.
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Requests per second per token (0: unlimited).
    #[arg(long, default_value_t = 200.0)]
    pub rate_limit: f64,
    /// Burst of requests per token above the rate.
    #[arg(long, default_value_t = 400.0)]
    pub rate_burst: f64,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub body_limit: usize,
    /// Revisions of history kept for watches to resume from.
    #[arg(long, default_value_t = 100_000)]
    pub keep_revisions: u64,
    /// Do not run the controllers (service controller, scheduler, node controller) in this
    /// server. Servers on one etcd elect the one that runs them; this one then never does.
    #[arg(long)]
    pub no_controllers: bool,
    /// Serve reads and watches straight from the store instead of from the in-memory watch
    /// cache (for comparison; the cache is what lets many clients read cheaply).
    #[arg(long)]
    pub no_watch_cache: bool,
    /// Seconds a read may lag the store: once the watch cache cannot show it matched the store
    /// within this, requests fail with 503 and Retry-After instead of answering from it.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub max_staleness_secs: u64,
    /// Seconds a node's lease may go unrenewed before the node is lost and its instances
    /// are replaced elsewhere (agents renew every 5 s).
    #[arg(long, default_value_t = hive_server::controllers::nodes::DEFAULT_GRACE.as_secs())]
    pub node_grace_secs: u64,
    /// Seconds a node the scheduler took from the shared pool for a tenant may run nothing
    /// before it goes back to the pool (nodes bound by the operator are never returned).
    #[arg(long, default_value_t = hive_server::controllers::scheduler::DEFAULT_POOL_GRACE.as_secs())]
    pub pool_grace_secs: u64,
}

/// How the node keeps its image store within a disk budget.
#[derive(Debug, Clone, Args)]
pub struct ImageArgs {
    /// Most bytes of unpacked layers the node keeps: beyond it, the least recently used
    /// images no instance uses are removed (e.g. 10Gi).
    #[arg(long, default_value = "10Gi", value_parser = super::quantity::bytes)]
    pub image_budget: u64,
    /// Seconds between two collections of the image store.
    #[arg(long, default_value_t = 300)]
    pub image_gc_secs: u64,
}

/// How much of this machine the node offers instances (several agents on one machine each
/// take a share this way). Checked against the host: more than it has is refused.
#[derive(Debug, Clone, Args)]
pub struct SizeArgs {
    /// CPUs the node offers as allocatable, in cores (2, 0.5) or millicores (500m); at most
    /// this host's (default: all of them).
    #[arg(long, value_parser = super::quantity::cpu_millis)]
    pub cpus: Option<u64>,
    /// Memory the node offers as allocatable (e.g. 4Gi, 512Mi); at most this host's
    /// (default: all of it).
    #[arg(long, value_parser = super::quantity::bytes)]
    pub memory: Option<u64>,
}

impl SizeArgs {
    /// Caps what `facts` offers; an error names the flag.
    pub fn apply(&self, facts: &mut hive_agent::node::HostFacts) -> Result<()> {
        facts.size(hive_agent::node::NodeSize {
            cpu_millis: self.cpus,
            memory_bytes: self.memory,
        })?;
        Ok(())
    }
}

/// Where this node's tenant networks meet the underlay.
#[derive(Debug, Clone, Args)]
pub struct NetArgs {
    /// This node's address for other nodes' VXLAN traffic (default: the address of the
    /// default route's device, or 127.0.0.1 on a host without one).
    #[arg(long)]
    pub underlay_ip: Option<std::net::Ipv4Addr>,
    /// The device that traffic leaves by; its MTU less 50 is the tenant networks' MTU
    /// (default: the default route's device, or lo).
    #[arg(long)]
    pub underlay_dev: Option<String>,
    /// Prefix of the links, namespaces and nftables table the agent makes (1 to 6 of a-z0-9;
    /// two agents on one host need different ones).
    #[arg(long, default_value = "hive")]
    pub net_prefix: String,
    /// Bits/s of the node's link that instances' guaranteed bandwidth is reserved from
    /// (default: the underlay device's speed, or 10 Gbit/s for a virtual one).
    #[arg(long)]
    pub link_bps: Option<u64>,
}

impl NetArgs {
    /// The agent's network configuration (the underlay found on this host once, where not
    /// given), and the node facts that come from it: its underlay address and link capacity.
    fn resolve(&self, facts: &mut hive_agent::node::HostFacts) -> hive_agent::network::NetConfig {
        let mut net = hive_agent::network::NetConfig::resolve(
            self.underlay_ip,
            self.underlay_dev.clone(),
            self.net_prefix.clone(),
        );
        if let Some(bps) = self.link_bps {
            net.link_bps = bps;
        }
        facts.underlay_ip = net.underlay_ip.to_string();
        facts.capacity.network_bps = net.link_bps;
        net
    }
}

/// TLS towards etcd, for `--store etcds://…` (or `etcd://…` with a CA).
#[derive(Debug, Args)]
pub struct EtcdArgs {
    /// PEM file of the CA that signed the etcd members' certificates (turns on TLS).
    #[arg(long, env = "HIVE_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// PEM client certificate for etcd (with --etcd-key), for etcd's --client-cert-auth.
    #[arg(long, env = "HIVE_ETCD_CERT", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// PEM key of --etcd-cert.
    #[arg(long, env = "HIVE_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
}

impl EtcdArgs {
    /// The store named by `url` (`embedded`, `etcd://…`, `etcds://…`) with these TLS files.
    pub fn backend(&self, url: &str) -> Result<hive_server::StoreBackend> {
        let identity = self.etcd_cert.as_deref().zip(self.etcd_key.as_deref());
        Ok(hive_server::store_backend(
            url,
            self.etcd_ca.as_deref(),
            identity,
        )?)
    }
}

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Do not write the CLI config (by default it is written when none exists yet).
    #[arg(long)]
    pub no_login: bool,
    /// Write the CLI config even if one exists.
    #[arg(long, conflicts_with = "no_login")]
    pub login: bool,
    /// OCI runtime of this machine's node: runc or crun.
    #[arg(long, default_value = DEFAULT_RUNTIME)]
    pub runtime: String,
    #[command(flatten)]
    pub net: NetArgs,
    #[command(flatten)]
    pub images: ImageArgs,
    #[command(flatten)]
    pub size: SizeArgs,
}

/// A random number that tells this process's leadership claims from another's.
fn rand_id() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ std::process::id())
        .unwrap_or_else(|_| std::process::id())
}

/// Serves the API on the configured store, and runs the controllers as its clients.
async fn start(args: &ServerArgs) -> Result<Launched> {
    let store = args.etcd.backend(&args.store)?;
    let config_store = store.clone();
    let config = ServerConfig {
        data_dir: args.data_dir.clone(),
        registry_dir: args.registry_dir.clone(),
        store,
        body_limit_bytes: args.body_limit,
        rate_limit: RateLimit {
            per_sec: args.rate_limit,
            burst: args.rate_burst,
        },
        keep_revisions: args.keep_revisions,
        watch_cache: (!args.no_watch_cache).then(|| WatchCacheOptions {
            max_staleness: Duration::from_secs(args.max_staleness_secs),
            ..Default::default()
        }),
        ..Default::default()
    };
    anyhow::ensure!(
        Duration::from_secs(args.node_grace_secs) > LEASE_EVERY,
        "--node-grace-secs {}: must be longer than the agents' lease renewal ({} s), or live \
         nodes would be declared lost between renewals",
        args.node_grace_secs,
        LEASE_EVERY.as_secs()
    );
    let launched = hive_server::launch(config, args.listen, shutdown_signal()).await?;
    if launched.bootstrapped {
        tracing::info!(
            file = %args.data_dir.join(ADMIN_TOKEN_FILE).display(),
            "created the platform admin; its token is in the file"
        );
    }
    if args.no_controllers {
        tracing::info!(url = %launched.url, store = %args.store, "serving the API without controllers");
        return Ok(launched);
    }
    // Controllers are API clients of this server, acting as the platform admin; they run
    // on one server at a time, the one that holds leadership in the shared store.
    let client = Client::new(&launched.url, Some(launched.admin_token.clone()))?;
    let grace = Duration::from_secs(args.node_grace_secs);
    let pool_grace = Duration::from_secs(args.pool_grace_secs);
    let id = format!("{}-{:08x}", launched.url, rand_id());
    let (tx, rx) = tokio::sync::watch::channel(leader::State::Following { leader: None });
    match config_store {
        // The embedded store is this process's alone (its file is locked): it leads.
        hive_server::StoreBackend::Embedded => {
            let _ = tx.send(leader::State::Leading { since: 0 });
            // Held for the life of the process: leadership is never given up.
            tokio::spawn(async move {
                let _tx = tx;
                std::future::pending::<()>().await
            });
        }
        hive_server::StoreBackend::Etcd(_) => {
            tokio::spawn(leader::elect(
                launched.store.clone(),
                id,
                leader::DEFAULT_TTL,
                tx,
            ));
        }
    }
    tokio::spawn(leader::while_leading(rx, move |epoch| {
        use hive_server::controllers::{NodeController, Scheduler, ServiceController};
        // Epoch 0: no term (the embedded store is this server's alone), nothing to fence.
        let client = match epoch {
            0 => client.clone(),
            e => client.clone().with_leader_epoch(e),
        };
        let scheduler = Scheduler::new(client.clone()).with_pool_grace(pool_grace);
        let services = ServiceController::new(client.clone()).with_placer(scheduler.placer());
        vec![
            tokio::spawn(services.run()),
            tokio::spawn(NodeController::new(client.clone(), grace).run()),
            tokio::spawn(scheduler.run()),
        ]
    }));
    tracing::info!(
        url = %launched.url,
        data_dir = %args.data_dir.display(),
        store = %args.store,
        "serving the API"
    );
    Ok(launched)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down");
}

pub async fn server(args: ServerArgs) -> Result<()> {
    let running = start(&args).await?;
    eprintln!(
        "hive server: API at {} (store {}, data in {}, platform admin token in {})",
        running.url,
        args.store,
        args.data_dir.display(),
        args.data_dir.join(ADMIN_TOKEN_FILE).display()
    );
    running.task.await?.context("serve the API")
}

pub async fn up(g: &Global, args: UpArgs) -> Result<()> {
    let running = start(&args.server).await?;
    let client = Client::new(&running.url, Some(running.admin_token.clone()))?;
    // Everything below goes through the API like any other client.
    let mut ready = false;
    for _ in 0..50 {
        if client.health().await.is_ok() {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::ensure!(
        ready,
        "the API server at {} did not become healthy",
        running.url
    );
    ensure_tenant(&client, DEFAULT_TENANT).await?;
    // This machine is the node: registered now, its lease kept fresh while `up` runs.
    // One machine serves every tenant: its node is shared, never bound to one tenant.
    // Its agent API listens on loopback, next to the server.
    let mut facts = hive_agent::node::host_facts(&args.runtime);
    facts.shared = true;
    args.size.apply(&mut facts)?;
    let api = bind_agent_api("127.0.0.1:0".parse()?, None).await?;
    facts.agent_url = api.1.clone();
    let net = args.net.resolve(&mut facts);
    let node = facts.name.clone();
    let (agent, _lock) = make_agent(
        &client,
        &node,
        &args.server.data_dir.join("agent"),
        &args.runtime,
        net,
        &args.images,
    )?;
    let held = agent.held();
    hive_agent::node::register(&client, &facts, &held.borrow()).await?;
    tokio::spawn(hive_agent::node::keep_lease(
        client.clone(),
        facts,
        LEASE_EVERY,
        held,
    ));
    run_agent(&client, &node, api.0, agent)?;
    let cfg_path = config::path(g.config.as_deref())?;
    let write = !args.no_login && (args.login || !cfg_path.exists());
    if write {
        config::save(
            &cfg_path,
            &config::Config {
                server: running.url.clone(),
                token: running.admin_token.clone(),
                tenant: Some(DEFAULT_TENANT.to_owned()),
            },
        )?;
    }
    let token_file = args.server.data_dir.join(ADMIN_TOKEN_FILE);
    eprintln!(
        "hive up: API at {} (data in {})",
        running.url,
        args.server.data_dir.display()
    );
    if write {
        eprintln!(
            "hive up: CLI logged in as the platform admin, tenant {DEFAULT_TENANT} ({})",
            cfg_path.display()
        );
    } else {
        eprintln!(
            "hive up: to use this server: hive login --server {} --token-file {} --tenant {DEFAULT_TENANT}",
            running.url,
            token_file.display()
        );
    }
    running.task.await?.context("serve the API")
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Node name (default: this host's name as a DNS label).
    #[arg(long)]
    pub name: Option<String>,
    /// OCI runtime: runc or crun.
    #[arg(long, default_value = DEFAULT_RUNTIME)]
    pub runtime: String,
    /// Run every tenant's instances here instead of binding the node to one tenant.
    #[arg(long)]
    pub shared: bool,
    /// Where the agent keeps images, containers and their logs.
    #[arg(long, default_value = "/var/lib/hive-agent")]
    pub data_dir: PathBuf,
    /// Address of the agent's API (container logs for the server).
    #[arg(long, default_value = DEFAULT_AGENT_LISTEN)]
    pub listen: SocketAddr,
    /// URL the server reaches the agent's API at (default: from --listen, with this host's
    /// name when it listens on every address).
    #[arg(long)]
    pub advertise_url: Option<String>,
    #[command(flatten)]
    pub net: NetArgs,
    #[command(flatten)]
    pub images: ImageArgs,
    #[command(flatten)]
    pub size: SizeArgs,
}

/// Where `hive agent` serves its API by default.
pub const DEFAULT_AGENT_LISTEN: &str = "0.0.0.0:7081";

/// Binds the agent's API; returns the listener and the URL the server should use.
async fn bind_agent_api(
    listen: SocketAddr,
    advertise: Option<String>,
) -> Result<(tokio::net::TcpListener, String)> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listen on {listen} for the agent API"))?;
    let addr = listener.local_addr()?;
    let url = match advertise {
        Some(u) => u.trim_end_matches('/').to_owned(),
        None if addr.ip().is_unspecified() => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .context("read this host's name for the agent URL (or pass --advertise-url)")?;
            format!("http://{}:{}", host.trim(), addr.port())
        }
        None => format!("http://{addr}"),
    };
    Ok((listener, url))
}

/// The sync loop, not started yet: this node runs the instances placed on it, pulling images
/// from the server's registry (plain HTTP when the server is on loopback) with the agent's
/// token. Made before the node registers, so the registration reports the containers a
/// previous run left ([`hive_agent::sync::Agent::held`]).
fn make_agent(
    client: &Client,
    node: &str,
    data_dir: &std::path::Path,
    runtime: &str,
    net: hive_agent::network::NetConfig,
    image_args: &ImageArgs,
) -> Result<(hive_agent::sync::Agent, DirLock)> {
    let kind: hive_agent::runtime::RuntimeKind = runtime.parse().map_err(anyhow::Error::msg)?;
    // One agent per data dir, held until the process ends; `hive down` finds the node's
    // runtime and network prefix in the record.
    let lock = DirLock::acquire(data_dir)?;
    match hive_agent::runtime::cgroups::favor_dynamic_modifications() {
        Ok(true) => tracing::info!(
            "cgroup2 superblock: favordynmods on (moving a new container into its cgroups \
             no longer waits for an RCU grace period)"
        ),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "cgroup2 superblock: cannot turn favordynmods on"),
    }
    NodeRecord {
        node: node.to_owned(),
        runtime: runtime.to_owned(),
        runtime_binary: runtime.into(),
        net: Some(NetRecord {
            prefix: net.prefix.clone(),
            underlay_dev: net.underlay_dev.clone(),
            // hive-net's default, which the agent keeps.
            netns_dir: "/run/netns".into(),
        }),
    }
    .write(data_dir)?;
    for (dir, state) in hive_agent::datadir::mount_state_dirs(data_dir)? {
        match state {
            StateMount::Mounted => tracing::info!(%dir, "state on a tmpfs (mounted)"),
            StateMount::Kept => tracing::info!(%dir, "state on its tmpfs (kept)"),
            StateMount::OnDisk => tracing::info!(
                %dir,
                "state left on disk: it holds containers of an agent from before it went on \
                 a tmpfs"
            ),
        }
    }
    let oci = hive_agent::runtime::OciRuntime::new(kind, runtime, data_dir.join(RUNTIME_DIR));
    let shim = hive_agent::runtime::ShimCommand {
        program: std::env::current_exe().context("find the hive binary for hive shim")?,
        args: vec!["shim".into()],
    };
    let (mut images, containers) = hive_agent::sync::layout(data_dir, oci, shim);
    // The first start gets a supervisor already loaded, like every later one.
    containers.prepare_supervisor();
    let host = client
        .base()
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .to_owned();
    if client.base().starts_with("http://") {
        images.insecure_registries.push(host.clone());
    }
    if let Some(token) = client.token() {
        images.credentials.insert(
            host,
            hive_agent::image::Credentials {
                username: "hive".into(),
                password: token.to_owned(),
            },
        );
    }
    let cfg = hive_agent::sync::SyncConfig {
        node: node.to_owned(),
        resync: Duration::from_secs(1),
        stop_grace: Duration::from_secs(10),
        net: Some(net),
        usage_every: Duration::from_secs(30),
        image_budget: image_args.image_budget,
        image_gc_every: Duration::from_secs(image_args.image_gc_secs.max(1)),
        state_dir: Some(data_dir.join(hive_agent::datadir::WATCH_DIR)),
    };
    let agent = hive_agent::sync::Agent::new(client.clone(), cfg, images, containers)?;
    Ok((agent, lock))
}

/// Serves the agent's API and starts `agent`'s sync loop.
fn run_agent(
    client: &Client,
    node: &str,
    api: tokio::net::TcpListener,
    agent: hive_agent::sync::Agent,
) -> Result<()> {
    let agent_api =
        hive_agent::api::AgentApi::new(node.to_owned(), agent.containers().clone(), client.clone());
    tokio::spawn(async move {
        if let Err(e) = hive_agent::api::serve(api, agent_api).await {
            tracing::error!(error = %e, "agent API");
        }
    });
    // The sync loop gets a thread and a single-threaded runtime of its own: its passes and
    // starts never wait behind the server's tasks in `hive up`.
    std::thread::Builder::new()
        .name("hive-agent".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(agent.run()),
                Err(e) => tracing::error!(error = %e, "agent runtime"),
            }
        })
        .context("start the agent thread")?;
    Ok(())
}

pub async fn agent(ctx: &super::Ctx, args: AgentArgs) -> Result<()> {
    let mut facts = hive_agent::node::host_facts(&args.runtime);
    facts.shared = args.shared;
    args.size.apply(&mut facts)?;
    if let Some(name) = args.name {
        hive_api::validate::name("--name", &name)?;
        facts.name = name;
    }
    let (api, url) = bind_agent_api(args.listen, args.advertise_url).await?;
    facts.agent_url = url;
    let net = args.net.resolve(&mut facts);
    let (agent, _lock) = make_agent(
        &ctx.client,
        &facts.name,
        &args.data_dir,
        &args.runtime,
        net,
        &args.images,
    )?;
    let held = agent.held();
    let node = hive_agent::node::register(&ctx.client, &facts, &held.borrow()).await?;
    eprintln!(
        "hive agent: node {} registered with {} (agent API at {})",
        node.name,
        ctx.client.base(),
        facts.agent_url
    );
    run_agent(&ctx.client, &node.name, api, agent)?;
    tokio::select! {
        _ = hive_agent::node::keep_lease(ctx.client.clone(), facts, LEASE_EVERY, held) => Ok(()),
        _ = shutdown_signal() => Ok(()),
    }
}

async fn ensure_tenant(client: &Client, name: &str) -> Result<()> {
    match client
        .create(
            None,
            &Tenant {
                name: name.to_owned(),
                ..Default::default()
            },
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some(hive_api::ErrorCode::AlreadyExists) => Ok(()),
        Err(e) => Err(e).context(format!("create tenant {name}")),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::{Cli, Command};

    fn agent(args: &[&str]) -> Result<super::AgentArgs, clap::Error> {
        let argv = ["hive", "agent"].iter().chain(args);
        match Cli::try_parse_from(argv)?.command {
            Command::Agent(a) => Ok(a),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn node_size_flags_parse_cores_millicores_and_memory_and_are_checked_against_the_host() {
        let a = agent(&["--cpus", "1.2", "--memory", "1Gi"]).unwrap();
        assert_eq!((a.size.cpus, a.size.memory), (Some(1200), Some(1 << 30)));
        let a = agent(&["--cpus", "500m"]).unwrap();
        assert_eq!((a.size.cpus, a.size.memory), (Some(500), None));
        let a = agent(&[]).unwrap();
        assert_eq!((a.size.cpus, a.size.memory), (None, None));
        // `hive up` takes the same flags.
        let up = Cli::try_parse_from(["hive", "up", "--cpus", "2", "--memory", "512Mi"]).unwrap();
        let Command::Up(up) = up.command else {
            panic!("not up")
        };
        assert_eq!(
            (up.size.cpus, up.size.memory),
            (Some(2000), Some(512 << 20))
        );
        // Junk is a usage error naming the flag.
        for (flag, bad) in [("--cpus", "two"), ("--cpus", "-1"), ("--memory", "1Xi")] {
            let e = agent(&[&format!("{flag}={bad}")]).unwrap_err().to_string();
            assert!(e.contains(flag), "{flag} {bad}: {e}");
        }
        // Zero and more than the host are refused by the check, naming the flag.
        let mut facts = hive_agent::node::host_facts("runc");
        let host = facts.capacity.clone();
        for (args, flag) in [
            (vec!["--cpus", "0m"], "--cpus"),
            (vec!["--memory", "0"], "--memory"),
        ] {
            let e = agent(&args).unwrap().size.apply(&mut facts).unwrap_err();
            assert!(e.to_string().starts_with(flag), "{args:?}: {e}");
        }
        let more_cpu = format!("{}m", host.cpu_millis + 1);
        let e = agent(&["--cpus", &more_cpu])
            .unwrap()
            .size
            .apply(&mut facts);
        assert!(
            e.unwrap_err().to_string().starts_with("--cpus"),
            "{more_cpu}"
        );
        let more_mem = (host.memory_bytes + 1).to_string();
        let e = agent(&["--memory", &more_mem])
            .unwrap()
            .size
            .apply(&mut facts);
        assert!(e.unwrap_err().to_string().starts_with("--memory"));
        // Within the host: the node offers exactly that, its capacity stays the host's.
        let a = agent(&["--cpus", "1m", "--memory", "1Mi"]).unwrap();
        a.size.apply(&mut facts).unwrap();
        assert_eq!(facts.allocatable().cpu_millis, 1);
        assert_eq!(facts.allocatable().memory_bytes, 1 << 20);
        assert_eq!(facts.capacity, host);
    }
}

#[derive(Debug, Args)]
pub struct DownArgs {
    /// The data dir of the node: a `hive up` data dir (its agent's is `DIR/agent`) or a
    /// `hive agent` one.
    #[arg(long, default_value = "/var/lib/hive", env = "HIVE_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Remove the network state of the node's prefix even while processes are in its
    /// namespaces once the node's containers are gone (another node using the prefix in this
    /// network namespace would lose its network).
    #[arg(long)]
    pub force: bool,
    /// For a data dir without a node record (an agent from before them): its OCI runtime.
    #[arg(long)]
    pub runtime: Option<String>,
    /// For a data dir without a node record: the network prefix to remove (else none).
    #[arg(long)]
    pub net_prefix: Option<String>,
}

/// `hive down`: stops and removes every container of the node and what it made for them;
/// see [`hive_agent::down`].
pub async fn down(args: DownArgs) -> Result<()> {
    let dir = hive_agent::down::agent_dir(&args.data_dir)?;
    let opts = hive_agent::down::DownOptions {
        runtime: args.runtime,
        net_prefix: args.net_prefix,
        underlay_dev: None,
        force: args.force,
    };
    let report = hive_agent::down::down(&dir, &opts).await?;
    for line in &report.removed {
        println!("{line}");
    }
    for e in &report.errors {
        eprintln!("error: {e}");
    }
    if report.removed.is_empty() && report.errors.is_empty() {
        println!("hive down: nothing of the node of {} left", dir.display());
    }
    match report.errors.len() {
        0 => Ok(()),
        // Each was printed above.
        _ => Err(super::workload::ExitWith(1).into()),
    }
}
