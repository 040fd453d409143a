//! Verbs on tenants, tokens, services, nodes and events.

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use futures_util::StreamExt;
use hive_api::{
    ApiToken, ContainerSpec, EnvVar, ErrorCode, Event, Instance, Network, NetworkSpec, Node,
    POOL_BOUND_LABEL, PortSpec, Protocol, PullPolicy, Resource, RestartPolicy, Role, Service,
    ServiceSpec, Tenant, TenantQuota, TokenCreate, WatchEventType,
};
use hive_client::ClientError;

use super::Ctx;
use super::output::{age, human_bytes};
use super::quantity;

#[derive(Debug, Subcommand)]
pub enum TenantCmd {
    /// Create a tenant.
    Create {
        name: String,
        /// Most bytes its image repositories may hold (e.g. 10Gi); default: no limit.
        #[arg(long, value_parser = quantity::bytes)]
        registry_quota: Option<u64>,
    },
    /// Set a tenant's quotas.
    Quota {
        name: String,
        /// Most bytes its image repositories may hold (e.g. 10Gi), or `none`.
        #[arg(long, value_parser = registry_quota)]
        registry: Option<Limit>,
    },
    /// List tenants.
    Ls,
    /// Delete a tenant and everything it owns.
    Rm { name: String },
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Create a token in the tenant (or, with --platform, a platform-admin token). The secret
    /// is printed once.
    Create {
        /// Who or what the token is for.
        #[arg(long, default_value = "cli")]
        name: String,
        /// viewer, member, tenant-admin.
        #[arg(long, default_value = "member")]
        role: Role,
        /// Lifetime, e.g. 3600s, 90m, 12h, 30d.
        #[arg(long, value_parser = parse_duration)]
        expires: Option<u64>,
        /// A platform-admin token instead of a tenant token.
        #[arg(long)]
        platform: bool,
    },
    /// List tokens (never their secrets).
    Ls {
        #[arg(long)]
        platform: bool,
    },
    /// Revoke a token by id.
    Rm {
        id: String,
        #[arg(long)]
        platform: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
    /// Create a service.
    Create(Box<ServiceCreate>),
    /// List services.
    Ls,
    /// Show a service.
    Get { name: String },
    /// Delete a service.
    Rm { name: String },
    /// Set a service's replicas.
    Scale(ScaleArgs),
    /// Change a service's image, environment or update strategy (a template change rolls
    /// out as the strategy says; follow it with `hive rollout status`).
    Update(super::rollout::UpdateArgs),
}

#[derive(Debug, Args)]
pub struct ServiceCreate {
    pub name: String,
    /// Image reference.
    #[arg(long)]
    pub image: String,
    #[arg(long, default_value_t = 1)]
    pub replicas: u32,
    #[command(flatten)]
    pub template: TemplateArgs,
    /// Arguments: replace the image's cmd.
    #[arg(last = true)]
    pub args: Vec<String>,
}

/// How each instance of a service runs (`hive service create` and `hive run`).
#[derive(Debug, Args)]
pub struct TemplateArgs {
    /// Replace the image's entrypoint.
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Environment variable NAME=VALUE (repeatable).
    #[arg(long = "env", short = 'e')]
    pub env: Vec<String>,
    /// Port: CONTAINER[/udp] or PUBLISHED:CONTAINER[/udp] (repeatable).
    #[arg(long = "publish", short = 'p')]
    pub ports: Vec<String>,
    /// CPU limit: 500m, 0.5, 2.
    #[arg(long, value_parser = quantity::cpu_millis)]
    pub cpu: Option<u64>,
    /// CPU reserved by the scheduler.
    #[arg(long, value_parser = quantity::cpu_millis)]
    pub cpu_request: Option<u64>,
    /// Memory limit: 256Mi, 1G.
    #[arg(long, value_parser = quantity::bytes)]
    pub memory: Option<u64>,
    /// Memory reserved by the scheduler.
    #[arg(long, value_parser = quantity::bytes)]
    pub memory_request: Option<u64>,
    #[arg(long)]
    pub pids_limit: Option<u64>,
    /// always, on-failure or never.
    #[arg(long, default_value = "always", value_parser = parse_restart)]
    pub restart: RestartPolicy,
    /// When the node pulls the image: always, if-not-present, never (default: always for
    /// `latest` or no tag, else if-not-present).
    #[arg(long, value_parser = parse_pull)]
    pub pull: Option<PullPolicy>,
    /// Label KEY=VALUE (repeatable).
    #[arg(long = "label", short = 'l')]
    pub labels: Vec<String>,
    /// The tenant network to join (default: `default`).
    #[arg(long)]
    pub network: Option<String>,
    /// A fixed address on that network (one replica only).
    #[arg(long)]
    pub ip: Option<String>,
    /// Network bandwidth: GUARANTEED[:MAX] bits/s (`100M:1G`); the guarantee is reserved on
    /// the node by the scheduler.
    #[arg(long, value_parser = quantity::bandwidth)]
    pub bandwidth: Option<(u64, Option<u64>)>,
    /// Small-frame packets/s the instance may send.
    #[arg(long)]
    pub pps: Option<u64>,
    /// Readiness check: `http:PORT[/PATH]`, `tcp:PORT` or `exec:COMMAND ARGS…`; the instance
    /// is ready once it passes.
    #[arg(long, value_parser = parse_check)]
    pub readiness: Option<hive_api::Probe>,
    /// Liveness check (same forms): a container that fails it is restarted.
    #[arg(long, value_parser = parse_check)]
    pub liveness: Option<hive_api::Probe>,
    /// Seconds between checks (default 10).
    #[arg(long)]
    pub probe_every: Option<u32>,
    /// Failed checks in a row that fail a probe (default 3).
    #[arg(long)]
    pub probe_failures: Option<u32>,
    /// A security group to join (repeatable): only its rules' traffic reaches the instance.
    #[arg(long = "security-group")]
    pub security_groups: Vec<String>,
    /// Scheduling priority, -1000 to 1000 (default 0): within the tenant, pending instances
    /// of a higher priority are placed first.
    #[arg(long, allow_negative_numbers = true, value_parser = parse_priority)]
    pub priority: Option<i32>,
}

/// A scheduling priority: a whole number from -1000 to 1000.
pub fn parse_priority(s: &str) -> Result<i32, String> {
    let max = hive_api::MAX_PRIORITY;
    s.parse::<i32>()
        .ok()
        .filter(|p| (-max..=max).contains(p))
        .ok_or_else(|| format!("priority {s:?}: expected a whole number from -{max} to {max}"))
}

/// `http:PORT[/PATH]`, `tcp:PORT` or `exec:COMMAND ARGS…`.
fn parse_check(s: &str) -> Result<hive_api::Probe, String> {
    use hive_api::probe::{ExecCheck, HttpCheck, TcpCheck};
    let bad = || format!("check {s:?}: expected http:PORT[/PATH], tcp:PORT or exec:COMMAND…");
    let port = |p: &str| p.parse::<u16>().map_err(|_| bad());
    let mut probe = hive_api::Probe::default();
    match s.split_once(':').ok_or_else(bad)? {
        ("http", rest) => {
            let (p, path) = match rest.find('/') {
                Some(i) => (&rest[..i], rest[i..].to_owned()),
                None => (rest, String::new()),
            };
            probe.http = Some(HttpCheck {
                port: port(p)?,
                path,
            });
        }
        ("tcp", p) => probe.tcp = Some(TcpCheck { port: port(p)? }),
        ("exec", cmd) => {
            let command: Vec<String> = cmd.split_whitespace().map(str::to_owned).collect();
            if command.is_empty() {
                return Err(bad());
            }
            probe.exec = Some(ExecCheck { command });
        }
        _ => return Err(bad()),
    }
    Ok(probe)
}

impl TemplateArgs {
    /// The Service these flags describe.
    pub fn service(
        &self,
        name: String,
        image: String,
        replicas: u32,
        args: Vec<String>,
    ) -> Result<Service> {
        let mut labels = std::collections::BTreeMap::new();
        for l in &self.labels {
            let (k, v) = key_value("label", l)?;
            labels.insert(k, v);
        }
        let env = self
            .env
            .iter()
            .map(|e| key_value("env", e).map(|(name, value)| EnvVar { name, value }))
            .collect::<Result<Vec<_>>>()?;
        let ports = self
            .ports
            .iter()
            .map(|p| port(p))
            .collect::<Result<Vec<_>>>()?;
        let mut template = ContainerSpec {
            image,
            command: self.entrypoint.clone().into_iter().collect(),
            args,
            env,
            ports,
            restart_policy: self.restart,
            pull_policy: self.pull,
            network: self.network.clone(),
            ip: self.ip.clone(),
            bandwidth: (self.bandwidth.is_some() || self.pps.is_some()).then(|| {
                hive_api::Bandwidth {
                    guaranteed_bps: self.bandwidth.map(|b| b.0),
                    max_bps: self.bandwidth.and_then(|b| b.1),
                    pps: self.pps,
                }
            }),
            ..Default::default()
        };
        let timing = |p: &hive_api::Probe| hive_api::Probe {
            period_secs: self.probe_every,
            failure_threshold: self.probe_failures,
            ..p.clone()
        };
        template.security_groups = self.security_groups.clone();
        template.readiness = self.readiness.as_ref().map(timing);
        template.liveness = self.liveness.as_ref().map(timing);
        template.resources.limits.cpu_millis = self.cpu;
        template.resources.requests.cpu_millis = self.cpu_request;
        template.resources.limits.memory_bytes = self.memory;
        template.resources.requests.memory_bytes = self.memory_request;
        template.resources.pids_limit = self.pids_limit;
        template.priority = self.priority.unwrap_or_default();
        Ok(Service {
            name,
            labels,
            spec: ServiceSpec {
                replicas,
                template,
                ..Default::default()
            },
            ..Default::default()
        })
    }
}

#[derive(Debug, Args)]
pub struct ScaleArgs {
    pub name: String,
    pub replicas: u32,
}

#[derive(Debug, Subcommand)]
pub enum InstanceCmd {
    /// List instances (same as `hive ps`).
    Ls(InstanceLsArgs),
    /// Show an instance.
    Get { name: String },
}

/// `hive instance ls` and `hive ps`.
#[derive(Debug, Args)]
pub struct InstanceLsArgs {
    /// Only the instances of this service.
    #[arg(long, short = 's')]
    pub service: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum NetworkCmd {
    /// List the tenant's networks.
    Ls,
    /// Create a network: `hive network create back --subnet 10.89.0.0/24`.
    Create {
        name: String,
        /// IPv4 subnet, /12 to /29; must not overlap the tenant's other networks.
        #[arg(long)]
        subnet: String,
        /// Gateway address (default: the subnet's first address).
        #[arg(long)]
        gateway: Option<String>,
    },
    /// Delete a network no instance uses.
    Rm { name: String },
}

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// List nodes.
    Ls,
    /// Bind a node to a tenant: it runs that tenant's instances only, and stays bound until
    /// unbound (a node the scheduler took from the pool goes back by itself). Refused while
    /// the node still runs another tenant's containers: cordon it and let them go first.
    Bind { node: String, tenant: String },
    /// Return a node to the shared pool.
    Unbind { node: String },
    /// Place nothing new on a node (what runs there stays).
    Cordon { node: String },
    /// Let the scheduler place on a node again.
    Uncordon { node: String },
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Keep printing new events.
    #[arg(long, short = 'f')]
    pub follow: bool,
}

fn parse_pull(s: &str) -> Result<PullPolicy, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| format!("pull policy {s:?}: expected always, if-not-present or never"))
}

fn parse_restart(s: &str) -> Result<RestartPolicy, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| format!("restart policy {s:?}: expected always, on-failure or never"))
}

/// Seconds from `90s`, `15m`, `12h`, `30d` or a plain number of seconds; more than zero.
fn parse_duration(s: &str) -> Result<u64, String> {
    parse_duration_or_zero(s).and_then(|n| {
        (n > 0)
            .then_some(n)
            .ok_or_else(|| format!("duration {s:?}: must be more than zero"))
    })
}

/// Seconds from `90s`, `15m`, `12h`, `30d` or a plain number of seconds.
pub(crate) fn parse_duration_or_zero(s: &str) -> Result<u64, String> {
    let bad = || format!("duration {s:?}: expected e.g. 3600s, 90m, 12h or 30d");
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86400),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(bad)
}

fn key_value(what: &str, s: &str) -> Result<(String, String)> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => bail!("{what} {s:?}: expected KEY=VALUE"),
    }
}

fn port(s: &str) -> Result<PortSpec> {
    let bad = || {
        anyhow::anyhow!(
            "port {s:?}: expected CONTAINER[/udp] or PUBLISHED:CONTAINER[/udp], ports 1-65535"
        )
    };
    let (ports, protocol) = match s.rsplit_once('/') {
        Some((p, "tcp")) => (p, Protocol::Tcp),
        Some((p, "udp")) => (p, Protocol::Udp),
        Some(_) => return Err(bad()),
        None => (s, Protocol::Tcp),
    };
    let num = |p: &str| p.parse::<u16>().ok().filter(|n| *n > 0).ok_or_else(bad);
    let (published_port, container_port) = match ports.split_once(':') {
        Some((h, c)) => (Some(num(h)?), num(c)?),
        None => (None, num(ports)?),
    };
    Ok(PortSpec {
        container_port,
        protocol,
        published_port,
    })
}

pub async fn tenant(ctx: &Ctx, cmd: TenantCmd) -> Result<()> {
    match cmd {
        TenantCmd::Create {
            name,
            registry_quota,
        } => {
            let t = ctx
                .client
                .create(
                    None,
                    &Tenant {
                        name,
                        quota: TenantQuota {
                            registry_bytes: registry_quota,
                        },
                        ..Default::default()
                    },
                )
                .await?;
            ctx.output.object(&t, TENANT_HEADERS, tenant_row)
        }
        TenantCmd::Quota { name, registry } => {
            let mut t: Tenant = ctx.client.get(None, &name).await?;
            if let Some(Limit(bytes)) = registry {
                t.quota.registry_bytes = bytes;
            }
            let t = ctx.client.update(None, &t).await?;
            ctx.output.object(&t, TENANT_HEADERS, tenant_row)
        }
        TenantCmd::Ls => {
            let list = ctx.client.list::<Tenant>(None).await?;
            print_tenants(ctx, &list.items)
        }
        TenantCmd::Rm { name } => {
            ctx.client.delete::<Tenant>(None, &name).await?;
            println!("tenant {name} deleted");
            Ok(())
        }
    }
}

const TENANT_HEADERS: &[&str] = &["NAME", "UID", "REGISTRY QUOTA", "AGE"];

fn tenant_row(t: &Tenant) -> Vec<String> {
    let quota = t
        .quota
        .registry_bytes
        .map_or_else(|| "-".to_owned(), human_bytes);
    vec![t.name.clone(), t.uid.clone(), quota, age(t.created_at)]
}

/// A limit, or `none` for no limit.
#[derive(Clone, Copy, Debug)]
pub struct Limit(Option<u64>);

fn registry_quota(s: &str) -> Result<Limit, String> {
    match s {
        "none" => Ok(Limit(None)),
        _ => quantity::bytes(s).map(|b| Limit(Some(b))),
    }
}

fn print_tenants(ctx: &Ctx, items: &[Tenant]) -> Result<()> {
    ctx.output.list(items, TENANT_HEADERS, tenant_row)
}

fn print_tokens(ctx: &Ctx, items: &[ApiToken]) -> Result<()> {
    ctx.output.list(
        items,
        &["ID", "NAME", "TENANT", "ROLE", "EXPIRES", "AGE"],
        |t| {
            vec![
                t.id.clone(),
                t.name.clone(),
                t.tenant.clone().unwrap_or("-".into()),
                t.role.to_string(),
                t.expires_at
                    .map(|e| e.to_rfc3339())
                    .unwrap_or("never".into()),
                age(Some(t.created_at)),
            ]
        },
    )
}

pub async fn token(ctx: &Ctx, cmd: TokenCmd) -> Result<()> {
    match cmd {
        TokenCmd::Create {
            name,
            role,
            expires,
            platform,
        } => {
            let (tenant, role) = if platform {
                (None, Role::PlatformAdmin)
            } else {
                (Some(ctx.tenant().await?), role)
            };
            let created = ctx
                .client
                .create_token(
                    tenant.as_deref(),
                    &TokenCreate {
                        name,
                        role,
                        expires_in_secs: expires,
                    },
                )
                .await?;
            match ctx.output {
                super::Output::Table => {
                    println!("{}", created.token);
                    eprintln!(
                        "token {} ({}{}) created; the secret above is shown only once",
                        created.info.id,
                        created.info.role,
                        created
                            .info
                            .tenant
                            .map(|t| format!(" in tenant {t}"))
                            .unwrap_or_default()
                    );
                    Ok(())
                }
                out => out.object(&created, &[], |_| vec![]),
            }
        }
        TokenCmd::Ls { platform } => {
            let tenant = if platform {
                None
            } else {
                Some(ctx.tenant().await?)
            };
            let list = ctx.client.list_tokens(tenant.as_deref()).await?;
            print_tokens(ctx, &list.items)
        }
        TokenCmd::Rm { id, platform } => {
            let tenant = if platform {
                None
            } else {
                Some(ctx.tenant().await?)
            };
            ctx.client.revoke_token(tenant.as_deref(), &id).await?;
            println!("token {id} revoked");
            Ok(())
        }
    }
}

const SERVICE_HEADERS: &[&str] = &[
    "NAME", "IMAGE", "REPLICAS", "READY", "VIP", "REVISION", "AGE",
];

fn service_row(s: &Service) -> Vec<String> {
    vec![
        s.name.clone(),
        s.spec.template.image.clone(),
        s.spec.replicas.to_string(),
        format!("{}/{}", s.status.ready_replicas, s.spec.replicas),
        if s.status.vip.is_empty() {
            "-".to_owned()
        } else {
            s.status.vip.clone()
        },
        s.revision.to_string(),
        age(s.created_at),
    ]
}

fn print_services(ctx: &Ctx, items: &[Service]) -> Result<()> {
    ctx.output.list(items, SERVICE_HEADERS, service_row)
}

fn print_service(ctx: &Ctx, s: &Service) -> Result<()> {
    ctx.output.object(s, SERVICE_HEADERS, service_row)
}

pub async fn service(ctx: &Ctx, cmd: ServiceCmd) -> Result<()> {
    match cmd {
        ServiceCmd::Create(c) => {
            let tenant = ctx.tenant().await?;
            let svc = c.template.service(c.name, c.image, c.replicas, c.args)?;
            let created = ctx.client.create(Some(&tenant), &svc).await?;
            print_service(ctx, &created)
        }
        ServiceCmd::Ls => {
            let tenant = ctx.tenant().await?;
            let list = ctx.client.list::<Service>(Some(&tenant)).await?;
            print_services(ctx, &list.items)
        }
        ServiceCmd::Get { name } => {
            let tenant = ctx.tenant().await?;
            let s = ctx.client.get::<Service>(Some(&tenant), &name).await?;
            print_service(ctx, &s)
        }
        ServiceCmd::Rm { name } => {
            let tenant = ctx.tenant().await?;
            ctx.client.delete::<Service>(Some(&tenant), &name).await?;
            println!("service {name} deleted");
            Ok(())
        }
        ServiceCmd::Scale(args) => scale(ctx, args).await,
        ServiceCmd::Update(args) => {
            let s = super::rollout::update(ctx, args).await?;
            print_service(ctx, &s)
        }
    }
}

/// Read, change `replicas`, write back under the read revision; retry on a conflicting write.
pub async fn scale(ctx: &Ctx, args: ScaleArgs) -> Result<()> {
    let tenant = ctx.tenant().await?;
    let svc = read_modify_write::<Service>(ctx, Some(&tenant), &args.name, "scale it", |s| {
        s.spec.replicas = args.replicas
    })
    .await?;
    print_service(ctx, &svc)
}

/// Reads object `name`, applies `change`, writes it back under the read revision; again
/// (5 times at most) when another writer (a controller, an agent) changed it in between.
/// `what` says what the change was for, in the error when it never landed.
async fn read_modify_write<R: Resource>(
    ctx: &Ctx,
    tenant: Option<&str>,
    name: &str,
    what: &str,
    change: impl Fn(&mut R),
) -> Result<R> {
    for _ in 0..5 {
        let mut obj = ctx.client.get::<R>(tenant, name).await?;
        change(&mut obj);
        match ctx.client.update(tenant, &obj).await {
            Ok(written) => return Ok(written),
            Err(e) if e.code() == Some(ErrorCode::Conflict) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    bail!(
        "{} {name} kept changing under 5 attempts to {what}; try again",
        R::KIND
    )
}

const INSTANCE_HEADERS: &[&str] = &[
    "NAME", "SERVICE", "NODE", "IP", "PHASE", "READY", "RESTARTS", "AGE",
];

fn instance_row(i: &Instance) -> Vec<String> {
    let phase = serde_json::to_value(i.status.phase)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    vec![
        i.name.clone(),
        i.spec.service.clone(),
        i.spec.node.clone().unwrap_or("-".into()),
        i.spec
            .network
            .as_ref()
            .map(|n| n.ip.clone())
            .unwrap_or("-".into()),
        phase,
        i.status.ready.to_string(),
        i.status.restarts.to_string(),
        age(i.created_at),
    ]
}

/// `hive ps` and `hive instance ls`: the tenant's instances, or one service's.
pub async fn list_instances(ctx: &Ctx, args: InstanceLsArgs) -> Result<()> {
    list_instances_in(ctx, &ctx.tenant().await?, args).await
}

async fn list_instances_in(ctx: &Ctx, tenant: &str, args: InstanceLsArgs) -> Result<()> {
    let mut items = ctx.client.list::<Instance>(Some(tenant)).await?.items;
    if let Some(service) = &args.service {
        items.retain(|i| i.spec.service == *service);
        // Nothing matched: say so when the name is wrong rather than print an empty table.
        // (A service just removed may still have instances stopping: they are listed.)
        if items.is_empty() {
            ctx.client.get::<Service>(Some(tenant), service).await?;
        }
    }
    ctx.output.list(&items, INSTANCE_HEADERS, instance_row)
}

pub async fn instance(ctx: &Ctx, cmd: InstanceCmd) -> Result<()> {
    let tenant = ctx.tenant().await?;
    match cmd {
        InstanceCmd::Ls(args) => list_instances_in(ctx, &tenant, args).await,
        InstanceCmd::Get { name } => {
            let i = ctx.client.get::<Instance>(Some(&tenant), &name).await?;
            ctx.output.object(&i, INSTANCE_HEADERS, instance_row)
        }
    }
}

const NETWORK_HEADERS: &[&str] = &["NAME", "SUBNET", "GATEWAY", "VNI", "AGE"];

fn network_row(n: &Network) -> Vec<String> {
    vec![
        n.name.clone(),
        n.spec.subnet.clone(),
        n.status.gateway.clone(),
        n.status.vni.to_string(),
        age(n.created_at),
    ]
}

pub async fn network(ctx: &Ctx, cmd: NetworkCmd) -> Result<()> {
    let tenant = ctx.tenant().await?;
    match cmd {
        NetworkCmd::Ls => {
            let list = ctx.client.list::<Network>(Some(&tenant)).await?;
            ctx.output.list(&list.items, NETWORK_HEADERS, network_row)
        }
        NetworkCmd::Create {
            name,
            subnet,
            gateway,
        } => {
            let net = Network {
                name,
                spec: NetworkSpec { subnet, gateway },
                ..Default::default()
            };
            let made = ctx.client.create(Some(&tenant), &net).await?;
            ctx.output.object(&made, NETWORK_HEADERS, network_row)
        }
        NetworkCmd::Rm { name } => {
            ctx.client.delete::<Network>(Some(&tenant), &name).await?;
            Ok(())
        }
    }
}

pub async fn node(ctx: &Ctx, cmd: NodeCmd) -> Result<()> {
    match cmd {
        NodeCmd::Ls => {
            let list = ctx.client.list::<Node>(None).await?;
            ctx.output.list(
                &list.items,
                &["NAME", "READY", "TENANT", "CPU", "MEMORY", "KERNEL", "AGE"],
                |n| {
                    vec![
                        n.name.clone(),
                        n.status.ready.to_string(),
                        n.spec.tenant.clone().unwrap_or("-".into()),
                        format!("{}m", n.status.capacity.cpu_millis),
                        format!("{}Mi", n.status.capacity.memory_bytes >> 20),
                        n.status.kernel.clone(),
                        age(n.created_at),
                    ]
                },
            )
        }
        NodeCmd::Bind { node, tenant } => {
            // A tenant that does not exist is named as such, not bound to.
            ctx.client.get::<Tenant>(None, &tenant).await?;
            change_node(ctx, &node, |n| {
                n.spec.tenant = Some(tenant.clone());
                // A shared node bound to one tenant is no longer shared.
                n.spec.shared = false;
                // The operator's binding: not the scheduler's to give back to the pool.
                n.labels.remove(POOL_BOUND_LABEL);
            })
            .await?;
            println!("node {node} bound to tenant {tenant}");
            Ok(())
        }
        NodeCmd::Unbind { node } => {
            change_node(ctx, &node, |n| {
                n.spec.tenant = None;
                n.labels.remove(POOL_BOUND_LABEL);
            })
            .await?;
            println!("node {node} returned to the pool");
            Ok(())
        }
        NodeCmd::Cordon { node } => {
            change_node(ctx, &node, |n| n.spec.unschedulable = true).await?;
            println!("node {node} cordoned");
            Ok(())
        }
        NodeCmd::Uncordon { node } => {
            change_node(ctx, &node, |n| n.spec.unschedulable = false).await?;
            println!("node {node} uncordoned");
            Ok(())
        }
    }
}

/// [`read_modify_write`] of node `node` (its agent and the scheduler write it too).
async fn change_node(ctx: &Ctx, node: &str, change: impl Fn(&mut Node)) -> Result<Node> {
    read_modify_write(ctx, None, node, "change it", change).await
}

fn event_row(e: &Event) -> Vec<String> {
    vec![
        e.created_at
            .map(|t| t.format("%Y-%m-%dT%H:%M:%S").to_string())
            .unwrap_or_default(),
        format!("{:?}", e.type_),
        e.reason.clone(),
        format!("{}/{}", e.object.kind, e.object.name),
        e.message.clone(),
    ]
}

const EVENT_HEADERS: &[&str] = &["TIME", "TYPE", "REASON", "OBJECT", "MESSAGE"];

pub async fn events(ctx: &Ctx, args: EventsArgs) -> Result<()> {
    let tenant = ctx.tenant().await?;
    let list = ctx.client.list::<Event>(Some(&tenant)).await?;
    if !args.follow {
        return ctx.output.list(&list.items, EVENT_HEADERS, event_row);
    }
    let mut revision = list.revision;
    let table = ctx.output == super::Output::Table;
    if table {
        print!(
            "{}",
            super::output::table(EVENT_HEADERS, list.items.iter().map(event_row).collect())
        );
    } else {
        for e in &list.items {
            println!("{}", serde_json::to_string(e)?);
        }
    }
    loop {
        let mut stream = ctx
            .client
            .watch::<Event>(Some(&tenant), Some(revision))
            .await?;
        while let Some(item) = stream.next().await {
            let ev = match item {
                Ok(ev) => ev,
                // A dropped connection: resume from the last revision seen.
                Err(ClientError::Transport { .. }) => break,
                Err(e) => return Err(e.into()),
            };
            revision = ev.revision;
            match (ev.type_, ev.object) {
                (WatchEventType::Added, Some(e)) => {
                    if table {
                        println!("{}", event_row(&e).join("   "));
                    } else {
                        println!("{}", serde_json::to_string(&e)?);
                    }
                }
                (WatchEventType::Error, _) => {
                    let err = ev.error.context("watch error without a body")?;
                    bail!("watch ended: {} ({})", err.message, err.code);
                }
                _ => {}
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_is_a_flag_of_run_create_and_update_from_minus_1000_to_1000() {
        use crate::cli::{Cli, Command};
        use clap::Parser;
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("hive").chain(args.iter().copied()))
        };
        let create =
            |p: &str| parse(&["service", "create", "web", "--image", "b", "--priority", p]);
        for (given, want) in [("-1000", -1000), ("-7", -7), ("0", 0), ("1000", 1000)] {
            let Command::Service(ServiceCmd::Create(c)) = create(given).unwrap().command else {
                panic!("not a service create");
            };
            let svc = c.template.service(c.name, c.image, 1, c.args).unwrap();
            assert_eq!(svc.spec.template.priority, want, "{given}");
            hive_api::Resource::validate(&svc).unwrap();
        }
        let Command::Service(ServiceCmd::Create(c)) =
            parse(&["service", "create", "web", "--image", "b"])
                .unwrap()
                .command
        else {
            panic!("not a service create");
        };
        let plain = c.template.service(c.name, c.image, 1, c.args).unwrap();
        assert_eq!(plain.spec.template.priority, 0, "the default");
        for bad in ["1001", "-1001", "high", "1.5", "99999999999"] {
            let err = create(bad).unwrap_err();
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation, "{bad}");
            assert!(
                err.to_string().contains(&format!(
                    "priority {bad:?}: expected a whole number from -1000 to 1000"
                )),
                "{err}"
            );
        }
        let Command::Run(r) = parse(&["run", "--priority", "-3", "img", "sleep", "1"])
            .unwrap()
            .command
        else {
            panic!("not a run");
        };
        assert_eq!(r.template.priority, Some(-3));
        assert_eq!(r.args, ["sleep", "1"]);
        let Command::Service(ServiceCmd::Update(u)) =
            parse(&["service", "update", "web", "--priority", "12"])
                .unwrap()
                .command
        else {
            panic!("not a service update");
        };
        assert_eq!(u.priority, Some(12));
        assert!(parse(&["service", "update", "web", "--priority", "2000"]).is_err());
    }

    #[test]
    fn ports_parse() {
        assert_eq!(
            port("80").unwrap(),
            PortSpec {
                container_port: 80,
                protocol: Protocol::Tcp,
                published_port: None
            }
        );
        assert_eq!(
            port("8080:80/udp").unwrap(),
            PortSpec {
                container_port: 80,
                protocol: Protocol::Udp,
                published_port: Some(8080)
            }
        );
        for bad in ["0", "x", "80/sctp", "70000", "1:2:3"] {
            assert!(port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90m"), Ok(5400));
        assert_eq!(parse_duration("30d"), Ok(30 * 86400));
        assert_eq!(parse_duration("15"), Ok(15));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("h").is_err());
    }
}
