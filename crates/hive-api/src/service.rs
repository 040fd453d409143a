//! Services: what a tenant wants running (an image, a command, replicas, resources, ports),
//! and the container template their instances are made from.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::meta::{Resource, Scope};
use crate::rollout::{RolloutStatus, Strategy, TemplateRevision};
use crate::validate::{self, ValidationError};

pub const MAX_REPLICAS: u32 = 1000;
pub const MAX_ARGS: usize = 256;
pub const MAX_ARG_BYTES: usize = 4096;
pub const MAX_ENV: usize = 256;
pub const MAX_ENV_VALUE_BYTES: usize = 32 * 1024;
pub const MAX_PORTS: usize = 64;
pub const MAX_IMAGE_REF_BYTES: usize = 512;
/// One thousand cores.
pub const MAX_CPU_MILLIS: u64 = 1_000_000;
/// 4 MiB: below this a container cannot start.
pub const MIN_MEMORY_BYTES: u64 = 4 << 20;
/// 16 TiB.
pub const MAX_MEMORY_BYTES: u64 = 16 << 40;
pub const MAX_PIDS: u64 = 4_194_304;

/// A service: `replicas` copies of one container template.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    #[serde(default)]
    #[schema(read_only)]
    pub tenant: String,
    #[serde(default)]
    #[schema(read_only)]
    pub uid: String,
    /// On update: the revision the change was based on (409 `conflict` if it moved on).
    #[serde(default)]
    pub revision: u64,
    #[serde(default)]
    #[schema(read_only)]
    pub created_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub spec: ServiceSpec,
    #[serde(default)]
    #[schema(read_only)]
    pub status: ServiceStatus,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// How many instances should run (0 to 1000).
    #[serde(default = "one")]
    pub replicas: u32,
    /// What each instance runs.
    pub template: ContainerSpec,
    /// How a change of `template` replaces running instances (default: rolling, 25%/25%).
    #[serde(default)]
    pub strategy: Strategy,
}

fn one() -> u32 {
    1
}

/// One container: image, process, resources, ports, restart policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContainerSpec {
    /// Image reference: `registry/repo[:tag][@digest]`.
    pub image: String,
    /// Replaces the image's entrypoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Replaces the image's cmd.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpec>,
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// When the node pulls the image; absent: `always` for `latest` or no tag, else
    /// `if-not-present` (see [`ContainerSpec::pull_policy`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_policy: Option<PullPolicy>,
    /// The tenant network instances join; absent: `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// A fixed address on that network (only for a single instance); absent: the server
    /// allocates one when the instance is placed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Network bandwidth of each instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<Bandwidth>,
    /// Decides `ready`: until it passes, the instance takes no part in rollouts' counts of
    /// ready replicas. Without one, a running container is ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<crate::Probe>,
    /// A container that fails it is killed, then restarted by its restart policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness: Option<crate::Probe>,
    /// Security groups of the tenant (at most 8): only what their rules allow reaches the
    /// instance (and its published ports, and replies). None: its network reaches it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_groups: Vec<String>,
    /// Order among the tenant's own pending instances: higher is placed first (default 0,
    /// from -1000 to 1000). It never moves an instance ahead of another tenant's: tenants are
    /// served in turn whatever their instances' priorities.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: i32,
}

fn is_zero(v: &i32) -> bool {
    *v == 0
}

/// Bounds of [`ContainerSpec::priority`].
pub const MAX_PRIORITY: i32 = 1000;

/// Most bits/s a bandwidth figure may be (1 Tbit/s).
pub const MAX_BPS: u64 = 1_000_000_000_000;
/// Least bits/s a bandwidth figure may be (HTB's granularity makes less meaningless).
pub const MIN_BPS: u64 = 8_000;
/// Most packets/s a packet-rate limit may be.
pub const MAX_PPS: u64 = 100_000_000;

/// An instance's share of its node's link.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Bandwidth {
    /// Bits/s reserved for the instance on its node: the scheduler places it only where the
    /// sum of guarantees stays within the node's `network_bps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guaranteed_bps: Option<u64>,
    /// Bits/s it may reach by borrowing what others leave idle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bps: Option<u64>,
    /// Packets/s of small frames (under 256 bytes) it may send.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pps: Option<u64>,
}

impl Bandwidth {
    pub fn validate(&self, field: &str) -> Result<(), ValidationError> {
        for (name, v) in [
            ("guaranteed_bps", self.guaranteed_bps),
            ("max_bps", self.max_bps),
        ] {
            if let Some(v) = v
                && !(MIN_BPS..=MAX_BPS).contains(&v)
            {
                return Err(ValidationError::new(
                    format!("{field}.{name}"),
                    format!("{v} is outside {MIN_BPS}..={MAX_BPS} bits/s"),
                ));
            }
        }
        if let (Some(g), Some(m)) = (self.guaranteed_bps, self.max_bps)
            && g > m
        {
            return Err(ValidationError::new(
                format!("{field}.guaranteed_bps"),
                format!("{g} exceeds max_bps {m}"),
            ));
        }
        if let Some(p) = self.pps
            && !(1..=MAX_PPS).contains(&p)
        {
            return Err(ValidationError::new(
                format!("{field}.pps"),
                format!("{p} is outside 1..={MAX_PPS}"),
            ));
        }
        Ok(())
    }
}

impl ContainerSpec {
    /// The network instances join.
    pub fn network(&self) -> &str {
        self.network
            .as_deref()
            .unwrap_or(crate::network::DEFAULT_NETWORK)
    }

    /// The pull policy in force: the one given, else `always` for an image without a tag or
    /// tagged `latest` (it may move), else `if-not-present` (a tag or digest pins it).
    pub fn pull_policy(&self) -> PullPolicy {
        if let Some(p) = self.pull_policy {
            return p;
        }
        let (name, digest) = match self.image.split_once('@') {
            Some((n, _)) => (n, true),
            None => (self.image.as_str(), false),
        };
        let last = name.rsplit('/').next().unwrap_or(name);
        match last.split_once(':') {
            _ if digest => PullPolicy::IfNotPresent,
            Some((_, tag)) if tag != "latest" => PullPolicy::IfNotPresent,
            _ => PullPolicy::Always,
        }
    }
}

/// When a node pulls an instance's image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    /// Ask the registry every time (a moved tag is followed).
    Always,
    /// Use the image the node has under that reference; pull only when it has none.
    IfNotPresent,
    /// Never pull: the image must be on the node.
    Never,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnvVar {
    pub name: String,
    #[serde(default)]
    pub value: String,
}

/// CPU in millicores (1000 = one core), memory in bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResourceAmounts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
}

/// Requests are what the scheduler reserves; limits are what the cgroup enforces.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default)]
    pub requests: ResourceAmounts,
    #[serde(default)]
    pub limits: ResourceAmounts,
    /// Most processes the container may hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_limit: Option<u64>,
}

#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    pub container_port: u16,
    #[serde(default)]
    pub protocol: Protocol,
    /// Port on the node that forwards to `container_port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_port: Option<u16>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    #[default]
    Always,
    OnFailure,
    Never,
}

/// Observed by the controllers; the template's revision and history are kept by the
/// server (see [`crate::rollout`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceStatus {
    #[serde(default)]
    pub replicas: u32,
    #[serde(default)]
    pub ready_replicas: u32,
    /// Instances made from the current template.
    #[serde(default)]
    pub updated_replicas: u32,
    /// The current template's number: 1 at creation, one more at every change of
    /// `spec.template` (instances carry it in the label `hive.dev/revision`).
    #[serde(default)]
    pub template_revision: u64,
    #[serde(default)]
    pub rollout: RolloutStatus,
    /// The last templates (at most 10, fewer when together over 256 KiB), oldest first,
    /// the current one last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<TemplateRevision>,
    /// The service's virtual address on its network (`spec.template.network`): allocated by
    /// the server like an instance's address, kept for the service's life, balanced over
    /// its ready instances on every port of the template. Empty until allocated.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub vip: String,
}

impl Resource for Service {
    const KIND: &'static str = "service";
    const PLURAL: &'static str = "services";
    const SCOPE: Scope = Scope::Tenant;
    crate::impl_object_meta!(tenant);

    crate::impl_spec_status!();

    fn validate(&self) -> Result<(), ValidationError> {
        self.validate_meta()?;
        if !self.status.vip.is_empty() && self.status.vip.parse::<std::net::Ipv4Addr>().is_err() {
            return Err(ValidationError::new(
                "status.vip",
                format!("{:?} is not an IPv4 address", self.status.vip),
            ));
        }
        self.spec.validate("spec")
    }
}

impl ServiceSpec {
    pub fn validate(&self, field: &str) -> Result<(), ValidationError> {
        if self.replicas > MAX_REPLICAS {
            return Err(ValidationError::new(
                format!("{field}.replicas"),
                format!("{} is more than {MAX_REPLICAS}", self.replicas),
            ));
        }
        if self.replicas > 1 && self.template.ip.is_some() {
            return Err(ValidationError::new(
                format!("{field}.template.ip"),
                format!(
                    "a fixed address can be given to one instance, not to {} replicas",
                    self.replicas
                ),
            ));
        }
        self.strategy.validate(&format!("{field}.strategy"))?;
        self.template.validate(&format!("{field}.template"))
    }
}

impl ContainerSpec {
    pub fn validate(&self, field: &str) -> Result<(), ValidationError> {
        image_reference(&format!("{field}.image"), &self.image)?;
        if !(-MAX_PRIORITY..=MAX_PRIORITY).contains(&self.priority) {
            return Err(ValidationError::new(
                format!("{field}.priority"),
                format!(
                    "{} is outside -{MAX_PRIORITY}..={MAX_PRIORITY}",
                    self.priority
                ),
            ));
        }
        if let Some(p) = &self.readiness {
            p.validate(&format!("{field}.readiness"))?;
        }
        if let Some(p) = &self.liveness {
            p.validate(&format!("{field}.liveness"))?;
        }
        let f = format!("{field}.security_groups");
        validate::count(
            &f,
            &self.security_groups,
            crate::secgroup::MAX_GROUPS_PER_INSTANCE,
        )?;
        for (i, g) in self.security_groups.iter().enumerate() {
            validate::name(&format!("{f}[{i}]"), g)?;
        }
        if let Some(n) = &self.network {
            validate::name(&format!("{field}.network"), n)?;
        }
        if let Some(ip) = &self.ip
            && ip.parse::<std::net::Ipv4Addr>().is_err()
        {
            return Err(ValidationError::new(
                format!("{field}.ip"),
                format!("{ip:?} is not an IPv4 address"),
            ));
        }
        for (list, name) in [(&self.command, "command"), (&self.args, "args")] {
            let f = format!("{field}.{name}");
            validate::count(&f, list, MAX_ARGS)?;
            for (i, arg) in list.iter().enumerate() {
                validate::kernel_string(&format!("{f}[{i}]"), arg, MAX_ARG_BYTES)?;
            }
        }
        let f = format!("{field}.env");
        validate::count(&f, &self.env, MAX_ENV)?;
        let mut seen = HashSet::new();
        for (i, var) in self.env.iter().enumerate() {
            let f = format!("{f}[{i}]");
            if var.name.is_empty() || var.name.contains('=') {
                return Err(ValidationError::new(
                    format!("{f}.name"),
                    "must be non-empty and must not contain '='",
                ));
            }
            validate::kernel_string(&format!("{f}.name"), &var.name, 256)?;
            validate::kernel_string(&format!("{f}.value"), &var.value, MAX_ENV_VALUE_BYTES)?;
            if !seen.insert(var.name.as_str()) {
                return Err(ValidationError::new(
                    format!("{f}.name"),
                    format!("{:?} is set twice", var.name),
                ));
            }
        }
        self.resources.validate(&format!("{field}.resources"))?;
        if let Some(b) = &self.bandwidth {
            b.validate(&format!("{field}.bandwidth"))?;
        }
        let f = format!("{field}.ports");
        validate::count(&f, &self.ports, MAX_PORTS)?;
        let mut container = HashSet::new();
        let mut published = HashSet::new();
        for (i, p) in self.ports.iter().enumerate() {
            let f = format!("{f}[{i}]");
            if p.container_port == 0 {
                return Err(ValidationError::new(
                    format!("{f}.container_port"),
                    "must be between 1 and 65535",
                ));
            }
            if !container.insert((p.container_port, p.protocol)) {
                return Err(ValidationError::new(
                    format!("{f}.container_port"),
                    format!("{} is listed twice", p.container_port),
                ));
            }
            if let Some(pp) = p.published_port {
                if pp == 0 {
                    return Err(ValidationError::new(
                        format!("{f}.published_port"),
                        "must be between 1 and 65535",
                    ));
                }
                if !published.insert((pp, p.protocol)) {
                    return Err(ValidationError::new(
                        format!("{f}.published_port"),
                        format!("{pp} is published twice"),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Resources {
    pub fn validate(&self, field: &str) -> Result<(), ValidationError> {
        for (amounts, which) in [(&self.requests, "requests"), (&self.limits, "limits")] {
            if let Some(cpu) = amounts.cpu_millis
                && !(1..=MAX_CPU_MILLIS).contains(&cpu)
            {
                return Err(ValidationError::new(
                    format!("{field}.{which}.cpu_millis"),
                    format!("{cpu} is outside 1..={MAX_CPU_MILLIS}"),
                ));
            }
            if let Some(mem) = amounts.memory_bytes
                && !(MIN_MEMORY_BYTES..=MAX_MEMORY_BYTES).contains(&mem)
            {
                return Err(ValidationError::new(
                    format!("{field}.{which}.memory_bytes"),
                    format!("{mem} is outside {MIN_MEMORY_BYTES}..={MAX_MEMORY_BYTES}"),
                ));
            }
        }
        if let (Some(r), Some(l)) = (self.requests.cpu_millis, self.limits.cpu_millis)
            && r > l
        {
            return Err(ValidationError::new(
                format!("{field}.requests.cpu_millis"),
                format!("request {r} exceeds limit {l}"),
            ));
        }
        if let (Some(r), Some(l)) = (self.requests.memory_bytes, self.limits.memory_bytes)
            && r > l
        {
            return Err(ValidationError::new(
                format!("{field}.requests.memory_bytes"),
                format!("request {r} exceeds limit {l}"),
            ));
        }
        if let Some(p) = self.pids_limit
            && !(1..=MAX_PIDS).contains(&p)
        {
            return Err(ValidationError::new(
                format!("{field}.pids_limit"),
                format!("{p} is outside 1..={MAX_PIDS}"),
            ));
        }
        Ok(())
    }
}

/// Checks an image reference's shape: `[host[:port]/]path[:tag][@algorithm:hex]`, path
/// components lower case `[a-z0-9]` separated by `.`, `_`, `__` or `-`, tags of
/// `[A-Za-z0-9_.-]` up to 128 characters (the distribution reference grammar).
pub fn image_reference(field: &str, reference: &str) -> Result<(), ValidationError> {
    let bad = |msg: String| Err(ValidationError::new(field, msg));
    if reference.is_empty() {
        return bad("must not be empty".into());
    }
    if reference.len() > MAX_IMAGE_REF_BYTES {
        return bad(format!(
            "{} bytes, at most {MAX_IMAGE_REF_BYTES} allowed",
            reference.len()
        ));
    }
    let (name_tag, digest) = match reference.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (reference, None),
    };
    if let Some(d) = digest {
        let Some((alg, hex)) = d.split_once(':') else {
            return bad(format!("digest {d:?} must be algorithm:hex"));
        };
        let alg_ok = !alg.is_empty()
            && alg
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+._-".contains(c));
        let hex_ok = hex.len() >= 32
            && hex
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase());
        if !alg_ok || !hex_ok {
            return bad(format!("digest {d:?} is not algorithm:lowercase-hex"));
        }
    }
    // A ':' after the last '/' starts the tag; one before it is a registry port.
    let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name_tag[last_slash..].find(':') {
        Some(i) => (
            &name_tag[..last_slash + i],
            Some(&name_tag[last_slash + i + 1..]),
        ),
        None => (name_tag, None),
    };
    if let Some(tag) = tag {
        let ok = !tag.is_empty()
            && tag.len() <= 128
            && tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
            && !tag.starts_with(['.', '-']);
        if !ok {
            return bad(format!(
                "tag {tag:?} must be 1 to 128 of A-Z, a-z, 0-9, '_', '.', '-'"
            ));
        }
    }
    let mut components: Vec<&str> = name.split('/').collect();
    // A first component with '.', ':' or "localhost" is a registry host.
    if components.len() > 1 {
        let host = components[0];
        if host.contains(['.', ':']) || host == "localhost" {
            let ok = host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
                && !host.starts_with(['.', '-', ':']);
            if !ok {
                return bad(format!(
                    "registry host {host:?} is not a host name with optional port"
                ));
            }
            components.remove(0);
        }
    }
    for comp in components {
        let ok = !comp.is_empty()
            && comp
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
            && comp.starts_with(|c: char| c.is_ascii_alphanumeric())
            && comp.ends_with(|c: char| c.is_ascii_alphanumeric())
            && !comp.contains("..");
        if !ok {
            return bad(format!(
                "path component {comp:?} must be lower case letters and digits separated by '.', '_' or '-'"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(json: &str) -> Service {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn minimal_service_defaults() {
        let s = svc(r#"{"name":"web","spec":{"template":{"image":"busybox"}}}"#);
        assert_eq!(s.spec.replicas, 1);
        assert_eq!(s.spec.template.restart_policy, RestartPolicy::Always);
        assert!(s.validate().is_ok());
    }

    #[test]
    fn priority_is_bounded_and_left_out_when_zero() {
        let mut s = svc(r#"{"name":"web","spec":{"template":{"image":"b","priority":1000}}}"#);
        assert_eq!(s.spec.template.priority, 1000);
        assert!(s.validate().is_ok());
        s.spec.template.priority = -1001;
        assert_eq!(s.validate().unwrap_err().field, "spec.template.priority");
        s.spec.template.priority = 0;
        let json = serde_json::to_string(&s).unwrap();
        assert!(!json.contains("priority"), "{json}");
    }

    #[test]
    fn unknown_fields_are_refused_at_every_level() {
        for body in [
            r#"{"name":"web","spec":{"template":{"image":"b"}},"x":1}"#,
            r#"{"name":"web","spec":{"template":{"image":"b"},"x":1}}"#,
            r#"{"name":"web","spec":{"template":{"image":"b","x":1}}}"#,
            r#"{"name":"web","spec":{"template":{"image":"b","resources":{"x":1}}}}"#,
        ] {
            let err = serde_json::from_str::<Service>(body).unwrap_err();
            assert!(err.to_string().contains("unknown field"), "{body}: {err}");
        }
    }

    #[test]
    fn spec_errors_name_the_field() {
        let mut s = svc(r#"{"name":"web","spec":{"template":{"image":"busybox"}}}"#);
        s.spec.replicas = 1001;
        assert_eq!(s.validate().unwrap_err().field, "spec.replicas");
        s.spec.replicas = 3;
        s.spec.template.args = vec!["ok".into(), "bad\0".into()];
        assert_eq!(s.validate().unwrap_err().field, "spec.template.args[1]");
        s.spec.template.args.clear();
        s.spec.template.env = vec![
            EnvVar {
                name: "A".into(),
                value: "1".into(),
            },
            EnvVar {
                name: "A".into(),
                value: "2".into(),
            },
        ];
        assert_eq!(s.validate().unwrap_err().field, "spec.template.env[1].name");
        s.spec.template.env.clear();
        s.spec.template.resources.requests.memory_bytes = Some(512 << 20);
        s.spec.template.resources.limits.memory_bytes = Some(256 << 20);
        assert_eq!(
            s.validate().unwrap_err().field,
            "spec.template.resources.requests.memory_bytes"
        );
        s.spec.template.resources = Resources::default();
        s.spec.template.ports = vec![
            PortSpec {
                container_port: 80,
                protocol: Protocol::Tcp,
                published_port: Some(8080),
            },
            PortSpec {
                container_port: 81,
                protocol: Protocol::Tcp,
                published_port: Some(8080),
            },
        ];
        assert_eq!(
            s.validate().unwrap_err().field,
            "spec.template.ports[1].published_port"
        );
    }

    #[test]
    fn a_vip_must_be_an_address() {
        let mut s = svc(r#"{"name":"web","spec":{"template":{"image":"busybox"}}}"#);
        s.status.vip = "10.88.0.9".into();
        assert!(s.validate().is_ok());
        s.status.vip = "10.88.0.300".into();
        assert_eq!(s.validate().unwrap_err().field, "status.vip");
    }

    #[test]
    fn image_references() {
        for good in [
            "busybox",
            "busybox:1.36",
            "library/busybox:latest",
            "127.0.0.1:5000/acme/web:v1",
            "localhost/busybox:test",
            "registry.example/a/b/c",
            "busybox@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert!(image_reference("image", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Busybox",
            "busy box",
            "a//b",
            "a/../b",
            "busybox:",
            "busybox:-x",
            "busybox@sha256:xyz",
            "acme/web:v1\0",
        ] {
            assert!(image_reference("image", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pull_policy_follows_the_tag() {
        let spec = |image: &str| ContainerSpec {
            image: image.into(),
            ..Default::default()
        };
        for (image, want) in [
            ("busybox", PullPolicy::Always),
            ("busybox:latest", PullPolicy::Always),
            ("127.0.0.1:7080/t/busybox", PullPolicy::Always),
            ("127.0.0.1:7080/t/busybox:v1", PullPolicy::IfNotPresent),
            ("reg/busybox@sha256:abc", PullPolicy::IfNotPresent),
        ] {
            assert_eq!(spec(image).pull_policy(), want, "{image}");
        }
        let mut s = spec("busybox:v1");
        s.pull_policy = Some(PullPolicy::Always);
        assert_eq!(s.pull_policy(), PullPolicy::Always);
    }
}
