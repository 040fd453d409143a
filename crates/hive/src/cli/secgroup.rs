//! `hive secgroup`: the tenant's security groups. A rule is `PROTO[/PORTS]@SOURCE`:
//! `tcp/80@10.0.0.0/8`, `udp/5000-5010@0.0.0.0/0`, `tcp/5432@web` (the instances of group
//! `web`), `icmp@10.88.0.0/16`, `any@db`.

use anyhow::Result;
use clap::Subcommand;
use hive_api::{RuleProtocol, SecurityGroup, SecurityGroupSpec, SecurityRule};

use super::Ctx;
use super::output::age;

#[derive(Debug, Subcommand)]
pub enum SecgroupCmd {
    /// List the tenant's security groups.
    Ls,
    /// Create a group: `hive secgroup create web --allow tcp/80@0.0.0.0/0`.
    Create {
        name: String,
        /// A rule `PROTO[/PORT[-PORT]]@CIDR|GROUP` (repeatable).
        #[arg(long = "allow", value_parser = parse_rule)]
        rules: Vec<SecurityRule>,
    },
    /// Replace a group's rules (its instances follow within a second).
    Set {
        name: String,
        #[arg(long = "allow", value_parser = parse_rule)]
        rules: Vec<SecurityRule>,
    },
    /// Delete a group no service and no other group uses.
    Rm { name: String },
}

/// `PROTO[/PORT[-PORT]]@SOURCE`, SOURCE a CIDR or a group name.
pub fn parse_rule(s: &str) -> Result<SecurityRule, String> {
    let bad =
        || format!("rule {s:?}: expected PROTO[/PORT[-PORT]]@CIDR|GROUP, e.g. tcp/80@10.0.0.0/8");
    let (left, source) = s.split_once('@').ok_or_else(bad)?;
    let (proto, ports) = match left.split_once('/') {
        Some((p, ports)) => (p, Some(ports)),
        None => (left, None),
    };
    let protocol = match proto {
        "tcp" => RuleProtocol::Tcp,
        "udp" => RuleProtocol::Udp,
        "icmp" => RuleProtocol::Icmp,
        "any" => RuleProtocol::Any,
        _ => return Err(bad()),
    };
    let port = |p: &str| p.parse::<u16>().map_err(|_| bad());
    let (from_port, to_port) = match ports.map(|p| p.split_once('-').unwrap_or((p, p))) {
        Some((a, b)) => (Some(port(a)?), Some(port(b)?)),
        None => (None, None),
    };
    let (cidr, group) = if source.contains('/') {
        (Some(source.to_owned()), None)
    } else {
        (None, Some(source.to_owned()))
    };
    let rule = SecurityRule {
        protocol,
        from_port,
        to_port,
        cidr,
        group,
    };
    rule.validate("rule").map_err(|e| e.to_string())?;
    Ok(rule)
}

fn shown(r: &SecurityRule) -> String {
    let proto = match r.protocol {
        RuleProtocol::Tcp => "tcp",
        RuleProtocol::Udp => "udp",
        RuleProtocol::Icmp => "icmp",
        RuleProtocol::Any => "any",
    };
    let ports = match r.ports() {
        Some((a, b)) if a == b => format!("/{a}"),
        Some((a, b)) => format!("/{a}-{b}"),
        None => String::new(),
    };
    let source = r.cidr.as_deref().or(r.group.as_deref()).unwrap_or("?");
    format!("{proto}{ports}@{source}")
}

const HEADERS: &[&str] = &["NAME", "RULES", "AGE"];

fn row(g: &SecurityGroup) -> Vec<String> {
    let rules: Vec<String> = g.spec.rules.iter().map(shown).collect();
    vec![
        g.name.clone(),
        if rules.is_empty() {
            "-".into()
        } else {
            rules.join(" ")
        },
        age(g.created_at),
    ]
}

pub async fn secgroup(ctx: &Ctx, cmd: SecgroupCmd) -> Result<()> {
    let tenant = ctx.tenant().await?;
    match cmd {
        SecgroupCmd::Ls => {
            let list = ctx.client.list::<SecurityGroup>(Some(&tenant)).await?;
            ctx.output.list(&list.items, HEADERS, row)
        }
        SecgroupCmd::Create { name, rules } => {
            let g = SecurityGroup {
                name,
                spec: SecurityGroupSpec { rules },
                ..Default::default()
            };
            let made = ctx.client.create(Some(&tenant), &g).await?;
            ctx.output.object(&made, HEADERS, row)
        }
        SecgroupCmd::Set { name, rules } => {
            let mut g: SecurityGroup = ctx.client.get(Some(&tenant), &name).await?;
            g.spec.rules = rules;
            let done = ctx.client.update(Some(&tenant), &g).await?;
            ctx.output.object(&done, HEADERS, row)
        }
        SecgroupCmd::Rm { name } => {
            ctx.client
                .delete::<SecurityGroup>(Some(&tenant), &name)
                .await?;
            println!("security group {name} deleted");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_read_like_they_are_written() {
        for s in [
            "tcp/80@10.0.0.0/8",
            "udp/5000-5010@0.0.0.0/0",
            "tcp/5432@web",
            "icmp@10.88.0.0/16",
            "any@db",
        ] {
            assert_eq!(shown(&parse_rule(s).unwrap()), s);
        }
        for bad in [
            "tcp/80",
            "sctp@web",
            "tcp/x@web",
            "tcp/9-8@web",
            "icmp/1@web",
            "tcp/80@Bad_Group",
        ] {
            assert!(parse_rule(bad).is_err(), "{bad}");
        }
    }
}
