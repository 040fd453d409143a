//! The CLI's commands. Each verb is a small function over [`hive_client::Client`].

mod config;
mod image;
mod output;
mod quantity;
mod resources;
mod rollout;
mod secgroup;
mod store;
mod up;
pub mod workload;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use hive_client::Client;

pub use output::Output;

/// Hive: a multi-tenant container cloud.
#[derive(Debug, Parser)]
#[command(name = "hive", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Global {
    /// API server URL (default: from the config written by `hive login` or `hive up`).
    #[arg(long, global = true, env = "HIVE_SERVER")]
    pub server: Option<String>,
    /// API token (default: from the config).
    #[arg(long, global = true, env = "HIVE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Tenant to act in (default: the config's, else the token's own).
    #[arg(long, global = true, env = "HIVE_TENANT")]
    pub tenant: Option<String>,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// CLI config file (default: $XDG_CONFIG_HOME/hive/config.json or ~/.config/hive/config.json).
    #[arg(long, global = true, env = "HIVE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log filter for the server side of `up` and `server` (e.g. info, debug, hive_server=trace).
    #[arg(long, global = true, env = "HIVE_LOG", default_value = "info")]
    pub log: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run everything on this machine: API server on an embedded store, this machine as a
    /// node, a first tenant `default`.
    Up(up::UpArgs),
    /// Stop and remove every container of a node whose agent is not running (a `hive up`
    /// killed, say), with their mounts, cgroups and the node's network state.
    Down(up::DownArgs),
    /// Run the API server only: on the embedded store, or on etcd (`--store etcd://…`) so
    /// that several servers share one state.
    Server(up::ServerArgs),
    /// Run this host as a node of the server given by --server/--token (or the config):
    /// register it and keep its lease.
    Agent(up::AgentArgs),
    /// Save a server URL and token in the CLI config.
    Login(LoginArgs),
    /// Show who the configured token is.
    Whoami,
    /// Manage tenants (platform admin).
    #[command(subcommand)]
    Tenant(resources::TenantCmd),
    /// Manage API tokens.
    #[command(subcommand)]
    Token(resources::TokenCmd),
    /// Manage services.
    #[command(subcommand, alias = "svc")]
    Service(resources::ServiceCmd),
    /// Show instances (the running units of services).
    #[command(subcommand, alias = "inst")]
    Instance(resources::InstanceCmd),
    /// List the tenant's instances (same as `hive instance ls`).
    Ps(resources::InstanceLsArgs),
    /// Set a service's replicas (same as `hive service scale`).
    Scale(resources::ScaleArgs),
    /// Follow, promote, roll back or undo a service's rollout, and list its revisions.
    #[command(subcommand)]
    Rollout(rollout::RolloutCmd),
    /// Run an image as a service of one replica and wait until its container runs.
    Run(Box<workload::RunArgs>),
    /// Remove services and their containers.
    Rm(workload::RmArgs),
    /// Print an instance's (or a service's) container output.
    Logs(workload::LogsArgs),
    /// Run a command in an instance's container (exits with its exit code).
    Exec(workload::ExecArgs),
    /// Push an OCI image layout (or a tar/tar.gz of one) to the server's registry.
    Push(image::PushArgs),
    /// Pull an image from the server's registry into an OCI image layout.
    Pull(image::PullArgs),
    /// Manage the tenant's image repositories.
    #[command(subcommand)]
    Image(image::ImageCmd),
    /// Manage nodes (platform admin).
    #[command(subcommand)]
    Node(resources::NodeCmd),
    /// Manage the tenant's networks.
    #[command(subcommand)]
    Network(resources::NetworkCmd),
    /// Manage the tenant's security groups (what may reach its instances).
    #[command(subcommand)]
    Secgroup(secgroup::SecgroupCmd),
    /// Show the tenant's events.
    Events(resources::EventsArgs),
    /// Manage the state store (migrate the embedded store into etcd).
    #[command(subcommand)]
    Store(store::StoreCmd),
    /// Print shell completions.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the API's OpenAPI document.
    Openapi,
    /// Supervise one container (started by the agent; not for people).
    #[command(hide = true)]
    Shim {
        /// The supervisor's configuration, as JSON (`-`: read from stdin).
        shim_config: String,
        /// With `-`: the runtime program to copy into a sealed memfd while waiting.
        runtime: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct LoginArgs {
    /// API server URL, e.g. http://127.0.0.1:7080.
    #[arg(long, env = "HIVE_SERVER")]
    pub server: String,
    /// API token.
    #[arg(
        long,
        env = "HIVE_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,
    /// Read the token from a file (e.g. /var/lib/hive/admin.token).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Default tenant for later commands.
    #[arg(long)]
    pub tenant: Option<String>,
}

pub fn init_tracing(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    // Client verbs stay quiet; server verbs log at the requested level.
    let filter = match cli.command {
        Command::Up(_) | Command::Server(_) | Command::Agent(_) => cli.global.log.clone(),
        _ => "warn".to_owned(),
    };
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info")))
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// An error (and its causes) on one line.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ").replace('\n', " ")
}

/// The client and defaults a command acts with.
pub struct Ctx {
    pub client: Client,
    pub output: Output,
    tenant_flag: Option<String>,
    config_tenant: Option<String>,
}

impl Ctx {
    async fn new(g: &Global) -> Result<Self> {
        let path = config::path(g.config.as_deref())?;
        let cfg = config::load(&path)?;
        let server = g
            .server
            .clone()
            .or_else(|| cfg.as_ref().map(|c| c.server.clone()))
            .with_context(|| format!("no server: run `hive login` or `hive up`, or pass --server (config {} not found)", path.display()))?;
        let token = g
            .token
            .clone()
            .or_else(|| cfg.as_ref().map(|c| c.token.clone()));
        Ok(Self {
            client: Client::new(&server, token)?,
            output: g.output,
            tenant_flag: g.tenant.clone(),
            config_tenant: cfg.and_then(|c| c.tenant),
        })
    }

    /// The tenant to act in: `--tenant`, else the config's, else the token's own.
    pub async fn tenant(&self) -> Result<String> {
        if let Some(t) = self
            .tenant_flag
            .clone()
            .or_else(|| self.config_tenant.clone())
        {
            return Ok(t);
        }
        match self.client.whoami().await?.tenant {
            Some(t) => Ok(t),
            None => bail!("no tenant: pass --tenant NAME (a platform token belongs to no tenant)"),
        }
    }
}

pub async fn run(cli: Cli) -> Result<()> {
    let g = &cli.global;
    match cli.command {
        Command::Up(args) => up::up(g, args).await,
        Command::Server(args) => up::server(args).await,
        Command::Down(args) => up::down(args).await,
        Command::Store(cmd) => store::run(cmd).await,
        Command::Agent(args) => up::agent(&Ctx::new(g).await?, args).await,
        Command::Login(args) => login(g, args).await,
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "hive", &mut std::io::stdout());
            Ok(())
        }
        Command::Shim { .. } => anyhow::bail!("hive shim runs before the async runtime starts"),
        Command::Openapi => {
            println!("{}", hive_server::openapi().to_pretty_json()?);
            Ok(())
        }
        Command::Whoami => {
            let ctx = Ctx::new(g).await?;
            let who = ctx.client.whoami().await?;
            ctx.output
                .object(&who, &["TOKEN", "NAME", "TENANT", "ROLE"], |w| {
                    vec![
                        w.token_id.clone(),
                        w.name.clone(),
                        w.tenant.clone().unwrap_or("-".into()),
                        w.role.to_string(),
                    ]
                })
        }
        Command::Tenant(cmd) => resources::tenant(&Ctx::new(g).await?, cmd).await,
        Command::Token(cmd) => resources::token(&Ctx::new(g).await?, cmd).await,
        Command::Service(cmd) => resources::service(&Ctx::new(g).await?, cmd).await,
        Command::Scale(args) => resources::scale(&Ctx::new(g).await?, args).await,
        Command::Rollout(cmd) => rollout::run(&Ctx::new(g).await?, cmd).await,
        Command::Run(args) => workload::run(&Ctx::new(g).await?, *args).await,
        Command::Rm(args) => workload::rm(&Ctx::new(g).await?, args).await,
        Command::Logs(args) => workload::logs(&Ctx::new(g).await?, args).await,
        Command::Exec(args) => workload::exec(&Ctx::new(g).await?, args).await,
        Command::Push(args) => image::push(&Ctx::new(g).await?, args).await,
        Command::Pull(args) => image::pull(&Ctx::new(g).await?, args).await,
        Command::Image(cmd) => image::image(&Ctx::new(g).await?, cmd).await,
        Command::Instance(cmd) => resources::instance(&Ctx::new(g).await?, cmd).await,
        Command::Ps(args) => resources::list_instances(&Ctx::new(g).await?, args).await,
        Command::Node(cmd) => resources::node(&Ctx::new(g).await?, cmd).await,
        Command::Network(cmd) => resources::network(&Ctx::new(g).await?, cmd).await,
        Command::Secgroup(cmd) => secgroup::secgroup(&Ctx::new(g).await?, cmd).await,
        Command::Events(args) => resources::events(&Ctx::new(g).await?, args).await,
    }
}

async fn login(g: &Global, args: LoginArgs) -> Result<()> {
    let token = match (args.token, args.token_file) {
        (Some(t), _) => t,
        (None, Some(f)) => std::fs::read_to_string(&f)
            .with_context(|| format!("read token file {}", f.display()))?
            .trim()
            .to_owned(),
        (None, None) => bail!("pass --token TOKEN or --token-file FILE"),
    };
    let client = Client::new(&args.server, Some(token.clone()))?;
    let who = client
        .whoami()
        .await
        .context("check the token with the server")?;
    let tenant = args.tenant.or(who.tenant.clone());
    let path = config::path(g.config.as_deref())?;
    config::save(
        &path,
        &config::Config {
            server: args.server.clone(),
            token,
            tenant: tenant.clone(),
        },
    )?;
    println!(
        "logged in to {} as {} ({}{}); config {}",
        args.server,
        who.name,
        who.role,
        tenant.map(|t| format!(", tenant {t}")).unwrap_or_default(),
        path.display()
    );
    Ok(())
}

/// `--output` values.
impl ValueEnum for Output {
    fn value_variants<'a>() -> &'a [Self] {
        &[Output::Table, Output::Json, Output::Yaml]
    }
    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(match self {
            Output::Table => "table",
            Output::Json => "json",
            Output::Yaml => "yaml",
        }))
    }
}
