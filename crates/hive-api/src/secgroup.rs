//! Security groups: which traffic may reach an instance. An instance in no group takes
//! anything from its own network (and its published ports from anywhere); an instance in
//! one or more groups takes only what one of its groups' rules allows (and its published
//! ports), plus the replies of its own connections. Rules allow by protocol, port range and
//! source: a CIDR, or the instances of another group of the same tenant.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::meta::{Resource, Scope};
use crate::network::Ipv4Cidr;
use crate::validate::{self, ValidationError};

/// Most rules in one group.
pub const MAX_RULES: usize = 64;
/// Most groups one instance may be in.
pub const MAX_GROUPS_PER_INSTANCE: usize = 8;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecurityGroup {
    pub name: String,
    #[serde(default)]
    #[schema(read_only)]
    pub tenant: String,
    #[serde(default)]
    #[schema(read_only)]
    pub uid: String,
    #[serde(default)]
    pub revision: u64,
    #[serde(default)]
    #[schema(read_only)]
    pub created_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub spec: SecurityGroupSpec,
    #[serde(default)]
    #[schema(read_only)]
    pub status: SecurityGroupStatus,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecurityGroupSpec {
    /// What may reach the group's instances (at most 64 rules). None: only replies and
    /// published ports.
    #[serde(default)]
    pub rules: Vec<SecurityRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecurityGroupStatus {}

/// One allow rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecurityRule {
    pub protocol: RuleProtocol,
    /// First port (tcp and udp; none: every port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_port: Option<u16>,
    /// Last port (default: `from_port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_port: Option<u16>,
    /// Sources in this CIDR (`0.0.0.0/0`: anyone who can reach the instance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    /// Sources that are instances of this group of the same tenant (on the same network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RuleProtocol {
    #[default]
    Tcp,
    Udp,
    Icmp,
    /// Every protocol (no ports).
    Any,
}

/// A rule's source, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source<'a> {
    Cidr(Ipv4Cidr),
    Group(&'a str),
}

impl SecurityRule {
    /// The port range, if the rule has one.
    pub fn ports(&self) -> Option<(u16, u16)> {
        self.from_port
            .map(|from| (from, self.to_port.unwrap_or(from)))
    }

    pub fn source(&self) -> Option<Source<'_>> {
        match (&self.cidr, &self.group) {
            (Some(c), None) => c.parse().ok().map(Source::Cidr),
            (None, Some(g)) => Some(Source::Group(g)),
            _ => None,
        }
    }

    pub fn validate(&self, field: &str) -> Result<(), ValidationError> {
        match (&self.cidr, &self.group) {
            (Some(c), None) => {
                c.parse::<Ipv4Cidr>()
                    .map_err(|m| ValidationError::new(format!("{field}.cidr"), m))?;
            }
            (None, Some(g)) => validate::name(&format!("{field}.group"), g)?,
            _ => {
                return Err(ValidationError::new(
                    field,
                    "give exactly one source: cidr or group",
                ));
            }
        }
        let ported = matches!(self.protocol, RuleProtocol::Tcp | RuleProtocol::Udp);
        match (self.from_port, self.to_port) {
            (None, Some(_)) => Err(ValidationError::new(
                format!("{field}.to_port"),
                "needs from_port",
            )),
            (Some(_), _) if !ported => Err(ValidationError::new(
                format!("{field}.from_port"),
                "only tcp and udp rules have ports",
            )),
            (Some(0), _) => Err(ValidationError::new(
                format!("{field}.from_port"),
                "0 is not a port",
            )),
            (Some(a), Some(b)) if b < a => Err(ValidationError::new(
                format!("{field}.to_port"),
                format!("{b} is below from_port {a}"),
            )),
            _ => Ok(()),
        }
    }
}

impl Resource for SecurityGroup {
    const KIND: &'static str = "security group";
    const PLURAL: &'static str = "securitygroups";
    const SCOPE: Scope = Scope::Tenant;
    crate::impl_object_meta!(tenant);

    crate::impl_spec_status!();

    fn validate(&self) -> Result<(), ValidationError> {
        self.validate_meta()?;
        validate::count("spec.rules", &self.spec.rules, MAX_RULES)?;
        for (i, r) in self.spec.rules.iter().enumerate() {
            r.validate(&format!("spec.rules[{i}]"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(rules: &str) -> Result<SecurityGroup, String> {
        let g: SecurityGroup =
            serde_json::from_str(&format!(r#"{{"name":"web","spec":{{"rules":{rules}}}}}"#))
                .map_err(|e| e.to_string())?;
        g.validate().map_err(|e| e.to_string())?;
        Ok(g)
    }

    #[test]
    fn rules_need_one_source_and_sane_ports() {
        let g = group(
            r#"[{"protocol":"tcp","from_port":80,"cidr":"10.0.0.0/8"},
                {"protocol":"udp","from_port":5000,"to_port":5010,"group":"db"},
                {"protocol":"icmp","cidr":"0.0.0.0/0"}]"#,
        )
        .unwrap();
        assert_eq!(g.spec.rules[0].ports(), Some((80, 80)));
        assert_eq!(g.spec.rules[1].ports(), Some((5000, 5010)));
        assert_eq!(g.spec.rules[1].source(), Some(Source::Group("db")));
        for (bad, says) in [
            (
                r#"[{"protocol":"tcp","from_port":80}]"#,
                "exactly one source",
            ),
            (
                r#"[{"protocol":"tcp","cidr":"10.0.0.0/8","group":"x"}]"#,
                "exactly one source",
            ),
            (r#"[{"protocol":"tcp","cidr":"10.0.0.1/8"}]"#, "host bits"),
            (
                r#"[{"protocol":"tcp","cidr":"nonsense"}]"#,
                "spec.rules[0].cidr",
            ),
            (
                r#"[{"protocol":"tcp","to_port":9,"cidr":"0.0.0.0/0"}]"#,
                "needs from_port",
            ),
            (
                r#"[{"protocol":"tcp","from_port":9,"to_port":8,"cidr":"0.0.0.0/0"}]"#,
                "below",
            ),
            (
                r#"[{"protocol":"icmp","from_port":9,"cidr":"0.0.0.0/0"}]"#,
                "only tcp and udp",
            ),
            (
                r#"[{"protocol":"tcp","from_port":0,"cidr":"0.0.0.0/0"}]"#,
                "not a port",
            ),
            (
                r#"[{"protocol":"sctp","cidr":"0.0.0.0/0"}]"#,
                "unknown variant",
            ),
            (
                r#"[{"protocol":"tcp","group":"Bad_Name"}]"#,
                "spec.rules[0].group",
            ),
            (
                r#"[{"protocol":"tcp","cidr":"0.0.0.0/0","colour":1}]"#,
                "unknown field",
            ),
        ] {
            let e = group(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let many = format!(
            "[{}]",
            vec![r#"{"protocol":"any","cidr":"0.0.0.0/0"}"#; 65].join(",")
        );
        assert!(group(&many).unwrap_err().contains("spec.rules"));
    }
}
