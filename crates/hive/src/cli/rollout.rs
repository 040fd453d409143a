//! `hive rollout …` and `hive service update`: change a service's template or strategy and
//! follow, promote, roll back or undo the rollout that follows.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use hive_api::{
    Amount, CanaryUpdate, EnvVar, ErrorCode, RollingUpdate, RolloutAction, RolloutPhase, Service,
    Strategy, TemplateRevision,
};

use super::Ctx;
use super::output::age;

#[derive(Debug, Subcommand)]
pub enum RolloutCmd {
    /// Follow the rollout until it completes (exit 0), holds as a canary (exit 0), stalls or
    /// times out (exit 1).
    Status(StatusArgs),
    /// Let a holding canary roll on to every instance.
    Promote { service: String },
    /// Return an unfinished rollout to the template before it.
    Rollback { service: String },
    /// Set the template back to a kept revision (default: the previous one), as a new
    /// revision.
    Undo {
        service: String,
        #[arg(long)]
        to_revision: Option<u64>,
    },
    /// List the kept template revisions.
    History { service: String },
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    pub service: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

/// `hive service update`: what to change; anything not given is kept.
#[derive(Debug, Args)]
pub struct UpdateArgs {
    pub name: String,
    /// New image reference.
    #[arg(long)]
    pub image: Option<String>,
    /// Set an environment variable NAME=VALUE (repeatable; replaces one of the same name).
    #[arg(long = "env", short = 'e')]
    pub env: Vec<String>,
    /// Remove an environment variable (repeatable).
    #[arg(long = "env-rm")]
    pub env_rm: Vec<String>,
    /// Rolling updates: MAX_SURGE:MAX_UNAVAILABLE, counts or percents (`1:0`, `25%:25%`).
    #[arg(long, conflicts_with = "canary", value_parser = parse_rolling)]
    pub rolling: Option<RollingUpdate>,
    /// Canary updates: move STEP instances (or STEP%) and hold until promoted.
    #[arg(long, value_parser = parse_amount)]
    pub canary: Option<Amount>,
    /// New scheduling priority, -1000 to 1000 (part of the template: it rolls out like an
    /// image change, and only new instances are placed by it).
    #[arg(long, allow_negative_numbers = true, value_parser = super::resources::parse_priority)]
    pub priority: Option<i32>,
}

fn parse_amount(s: &str) -> Result<Amount, String> {
    let a = match s.parse::<u32>() {
        Ok(n) => Amount::Count(n),
        Err(_) => Amount::Percent(s.to_owned()),
    };
    a.validate("value").map_err(|e| e.message)?;
    Ok(a)
}

fn parse_rolling(s: &str) -> Result<RollingUpdate, String> {
    let (surge, unavailable) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: want MAX_SURGE:MAX_UNAVAILABLE"))?;
    Ok(RollingUpdate {
        max_surge: parse_amount(surge)?,
        max_unavailable: parse_amount(unavailable)?,
    })
}

impl UpdateArgs {
    fn apply(&self, svc: &mut Service) -> Result<()> {
        if let Some(image) = &self.image {
            svc.spec.template.image = image.clone();
        }
        for kv in &self.env {
            let Some((name, value)) = kv.split_once('=') else {
                bail!("--env {kv:?}: want NAME=VALUE");
            };
            let env = &mut svc.spec.template.env;
            match env.iter_mut().find(|e| e.name == name) {
                Some(e) => e.value = value.to_owned(),
                None => env.push(EnvVar {
                    name: name.to_owned(),
                    value: value.to_owned(),
                }),
            }
        }
        svc.spec
            .template
            .env
            .retain(|e| !self.env_rm.contains(&e.name));
        if let Some(p) = self.priority {
            svc.spec.template.priority = p;
        }
        if let Some(r) = &self.rolling {
            svc.spec.strategy = Strategy::Rolling(r.clone());
        }
        if let Some(step) = &self.canary {
            svc.spec.strategy = Strategy::Canary(CanaryUpdate { step: step.clone() });
        }
        Ok(())
    }
}

/// Read, change, write back under the read revision; again when it changed in between (the
/// controller writes the status as instances come and go).
pub async fn update(ctx: &Ctx, args: UpdateArgs) -> Result<Service> {
    let tenant = ctx.tenant().await?;
    for _ in 0..10 {
        let mut svc = ctx.client.get::<Service>(Some(&tenant), &args.name).await?;
        args.apply(&mut svc)?;
        match ctx.client.update(Some(&tenant), &svc).await {
            Ok(s) => return Ok(s),
            Err(e) if e.code() == Some(ErrorCode::Conflict) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    bail!(
        "service {} kept changing under 10 attempts to update it; try again",
        args.name
    )
}

const HISTORY_HEADERS: &[&str] = &["REVISION", "IMAGE", "AGE", "CAUSE"];

fn history_row(current: u64) -> impl Fn(&TemplateRevision) -> Vec<String> {
    move |h| {
        let mark = if h.revision == current {
            " (current)"
        } else {
            ""
        };
        vec![
            format!("{}{mark}", h.revision),
            h.template.image.clone(),
            age(h.created_at),
            h.cause.clone(),
        ]
    }
}

fn progress(s: &Service) -> String {
    format!(
        "revision {}: {} ({} replicas, {} updated, {} ready)",
        s.status.template_revision,
        s.status.rollout.message,
        s.spec.replicas,
        s.status.updated_replicas,
        s.status.ready_replicas
    )
}

pub async fn run(ctx: &Ctx, cmd: RolloutCmd) -> Result<()> {
    let tenant = ctx.tenant().await?;
    let t = tenant.as_str();
    let act = |service: String, action: RolloutAction| async move {
        let s = ctx.client.rollout(t, &service, &action).await?;
        println!("service {service}: {}", progress(&s));
        anyhow::Ok(())
    };
    match cmd {
        RolloutCmd::Promote { service } => act(service, RolloutAction::Promote).await,
        RolloutCmd::Rollback { service } => act(service, RolloutAction::Rollback).await,
        RolloutCmd::Undo {
            service,
            to_revision,
        } => act(service, RolloutAction::Undo { to_revision }).await,
        RolloutCmd::History { service } => {
            let s = ctx.client.get::<Service>(Some(&tenant), &service).await?;
            let row = history_row(s.status.template_revision);
            ctx.output.list(&s.status.history, HISTORY_HEADERS, row)
        }
        RolloutCmd::Status(args) => status(ctx, &tenant, args).await,
    }
}

/// Polls the service and prints each new state until the rollout settles.
async fn status(ctx: &Ctx, tenant: &str, args: StatusArgs) -> Result<()> {
    let t0 = Instant::now();
    let mut last = String::new();
    loop {
        let s = ctx
            .client
            .get::<Service>(Some(tenant), &args.service)
            .await?;
        let line = progress(&s);
        if line != last {
            println!("{line}");
            last = line;
        }
        match s.status.rollout.phase {
            RolloutPhase::Complete => return Ok(()),
            RolloutPhase::Paused => return Ok(()),
            RolloutPhase::Stalled => bail!(
                "service {}: rollout of revision {} stalled: {}",
                args.service,
                s.status.template_revision,
                s.status.rollout.message
            ),
            RolloutPhase::Progressing => {}
        }
        if t0.elapsed() > Duration::from_secs(args.timeout) {
            bail!(
                "service {}: rollout of revision {} not done after {} s",
                args.service,
                s.status.template_revision,
                args.timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategies_parse() {
        let r = parse_rolling("1:25%").unwrap();
        assert_eq!(r.max_surge, Amount::Count(1));
        assert_eq!(r.max_unavailable, Amount::Percent("25%".into()));
        assert!(parse_rolling("1").is_err());
        assert!(parse_rolling("1:200%").is_err());
        assert_eq!(parse_amount("10%").unwrap(), Amount::Percent("10%".into()));
        assert!(parse_amount("x").is_err());
    }

    #[test]
    fn updates_keep_what_is_not_given() {
        let mut svc: Service = serde_json::from_str(
            r#"{"name":"web","spec":{"template":{"image":"a","env":[{"name":"A","value":"1"},{"name":"B","value":"2"}]}}}"#,
        )
        .unwrap();
        let args = UpdateArgs {
            name: "web".into(),
            image: None,
            env: vec!["A=9".into(), "C=3".into()],
            env_rm: vec!["B".into()],
            rolling: None,
            canary: Some(Amount::Count(1)),
            priority: Some(-20),
        };
        args.apply(&mut svc).unwrap();
        assert_eq!(svc.spec.template.image, "a");
        assert_eq!(svc.spec.template.priority, -20);
        let env: Vec<(&str, &str)> = svc
            .spec
            .template
            .env
            .iter()
            .map(|e| (e.name.as_str(), e.value.as_str()))
            .collect();
        assert_eq!(env, [("A", "9"), ("C", "3")]);
        assert!(matches!(svc.spec.strategy, Strategy::Canary(_)));
    }
}
