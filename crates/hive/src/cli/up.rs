//! `hive up` and `hive server`: the API server on the embedded store, and for `up` also this
//! machine registered as a node, a first tenant and a logged-in CLI.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use hive_api::{Node, NodeCapacity, NodeStatus, Tenant};
use hive_client::Client;
use hive_server::{ADMIN_TOKEN_FILE, Bootstrap, RateLimit, ServerConfig};
use hive_store::Store;
use tokio::net::TcpListener;

use super::{Global, config};

/// The port `hive up` and `hive server` listen on by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7080";
/// The first tenant `hive up` creates.
pub const DEFAULT_TENANT: &str = "default";

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Where the state (embedded store) and the admin token live.
    #[arg(long, default_value = "/var/lib/hive", env = "HIVE_DATA_DIR")]
    pub data_dir: PathBuf,
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
}

struct Running {
    url: String,
    admin_token: String,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Opens the store, bootstraps it, binds the listener and serves in the background.
async fn start(args: &ServerArgs) -> Result<Running> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("create data dir {}", args.data_dir.display()))?;
    let db = args.data_dir.join("state.redb");
    let store: Arc<dyn Store> = Arc::new(
        hive_store::RedbStore::open(&db, Default::default()).with_context(|| {
            format!(
                "open the store {} (is another hive using this data dir?)",
                db.display()
            )
        })?,
    );
    match hive_server::bootstrap(&store, &args.data_dir).await? {
        Bootstrap::Created { token_file } => {
            tracing::info!(file = %token_file.display(), "created the platform admin; its token is in the file")
        }
        Bootstrap::Existing => {}
    }
    let token_path = args.data_dir.join(ADMIN_TOKEN_FILE);
    let admin_token = std::fs::read_to_string(&token_path)
        .with_context(|| format!("read {}", token_path.display()))?
        .trim()
        .to_owned();
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let config = ServerConfig {
        data_dir: args.data_dir.clone(),
        body_limit_bytes: args.body_limit,
        rate_limit: RateLimit {
            per_sec: args.rate_limit,
            burst: args.rate_burst,
        },
        keep_revisions: args.keep_revisions,
        ..Default::default()
    };
    let task = tokio::spawn(hive_server::serve(
        store,
        config,
        listener,
        shutdown_signal(),
    ));
    let url = format!("http://{addr}");
    tracing::info!(%url, data_dir = %args.data_dir.display(), "serving the API");
    Ok(Running {
        url,
        admin_token,
        task,
    })
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
    register_node(&client).await?;
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

/// Registers this machine as a Node with what it has. The node agent (a later part) renews
/// its lease and reports readiness; until it runs, the node is not ready.
async fn register_node(client: &Client) -> Result<()> {
    let name = node_name(&read_trim("/proc/sys/kernel/hostname").unwrap_or_else(|| "node".into()));
    let status = NodeStatus {
        capacity: host_capacity(),
        allocatable: host_capacity(),
        kernel: read_trim("/proc/sys/kernel/osrelease").unwrap_or_default(),
        os: std::env::consts::OS.to_owned(),
        arch: std::env::consts::ARCH.to_owned(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        ..Default::default()
    };
    let node = match client.get::<Node>(None, &name).await {
        Ok(n) => n,
        Err(e) if e.code() == Some(hive_api::ErrorCode::NotFound) => client
            .create(
                None,
                &Node {
                    name: name.clone(),
                    ..Default::default()
                },
            )
            .await
            .with_context(|| format!("register node {name}"))?,
        Err(e) => return Err(e).context(format!("read node {name}")),
    };
    let mut node = node;
    node.status = status;
    client
        .update_status(None, &node)
        .await
        .with_context(|| format!("report node {name}"))?;
    Ok(())
}

fn read_trim(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// A host name turned into a DNS label (lower case, other characters to '-', 63 at most).
fn node_name(host: &str) -> String {
    let first = host.split('.').next().unwrap_or(host);
    let mut s: String = first
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    s.truncate(63);
    let s = s.trim_matches('-').to_owned();
    if s.is_empty() { "node".into() } else { s }
}

fn host_capacity() -> NodeCapacity {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .unwrap_or(1);
    let mem_kib = read_trim("/proc/meminfo")
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    NodeCapacity {
        cpu_millis: cpus * 1000,
        memory_bytes: mem_kib * 1024,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_are_labels() {
        assert_eq!(node_name("Host_1.example.com"), "host-1");
        assert_eq!(node_name("--"), "node");
        assert_eq!(node_name(&"a".repeat(80)).len(), 63);
        assert!(hive_api::validate::name("n", &node_name("Weird Host!")).is_ok());
    }
}
