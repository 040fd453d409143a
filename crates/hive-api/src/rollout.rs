//! How a change of a service's template reaches its instances: the update strategy (rolling
//! or canary), the template revisions the server numbers and keeps, the rollout's observed
//! state, and the actions users take on a rollout (promote, rollback, undo) checked against
//! that state in one place ([`apply`]).
//!
//! The server numbers revisions and keeps the history (in the same write as the spec
//! change, so no change goes unnumbered); the service controller moves instances and writes
//! the phase. Nothing here does I/O.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::service::{ContainerSpec, MAX_REPLICAS, Service};
use crate::validate::ValidationError;

/// Most template revisions a service keeps.
pub const MAX_HISTORY: usize = 10;
/// Most bytes the kept templates may take together (the current one is always kept).
pub const MAX_HISTORY_BYTES: usize = 256 * 1024;

/// A number of instances, or a percentage of `replicas` (`"25%"`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Amount {
    Count(u32),
    /// `"N%"`, N from 0 to 100.
    Percent(String),
}

impl Amount {
    fn percent(&self) -> Option<u32> {
        match self {
            Amount::Percent(s) => s.strip_suffix('%')?.parse().ok().filter(|p| *p <= 100),
            Amount::Count(_) => None,
        }
    }

    pub fn validate(&self, field: &str) -> Result<(), ValidationError> {
        match self {
            Amount::Count(n) if *n > MAX_REPLICAS => Err(ValidationError::new(
                field,
                format!("{n} is more than {MAX_REPLICAS}"),
            )),
            Amount::Count(_) => Ok(()),
            Amount::Percent(s) => match self.percent() {
                Some(_) if s.starts_with(|c: char| c.is_ascii_digit()) => Ok(()),
                _ => Err(ValidationError::new(
                    field,
                    format!("{s:?} is neither a count nor a percentage from \"0%\" to \"100%\""),
                )),
            },
        }
    }

    /// The number of instances this is out of `replicas`, percentages rounded up (`up`) or
    /// down.
    pub fn of(&self, replicas: u32, up: bool) -> u32 {
        match self {
            Amount::Count(n) => *n,
            Amount::Percent(_) => {
                let p = u64::from(self.percent().unwrap_or(0));
                let whole = p * u64::from(replicas);
                let v = if up { whole.div_ceil(100) } else { whole / 100 };
                v as u32
            }
        }
    }

    fn is_zero(&self) -> bool {
        match self {
            Amount::Count(n) => *n == 0,
            Amount::Percent(_) => self.percent() == Some(0),
        }
    }
}

fn quarter() -> Amount {
    Amount::Percent("25%".into())
}

/// How a template change replaces instances.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Replace instances a few at a time, waiting for the new ones to be ready.
    Rolling(RollingUpdate),
    /// Move `step` instances to the new template and hold until `promote` (then roll the
    /// rest as a rolling update with the default 25%/25%) or `rollback`.
    Canary(CanaryUpdate),
}

impl Default for Strategy {
    fn default() -> Self {
        Strategy::Rolling(RollingUpdate::default())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollingUpdate {
    /// How many instances may exist above `replicas` during an update (percentages round
    /// up; default 25%).
    #[serde(default = "quarter")]
    pub max_surge: Amount,
    /// How many of `replicas` may be not ready during an update (percentages round down;
    /// default 25%).
    #[serde(default = "quarter")]
    pub max_unavailable: Amount,
}

impl Default for RollingUpdate {
    fn default() -> Self {
        Self {
            max_surge: quarter(),
            max_unavailable: quarter(),
        }
    }
}

impl RollingUpdate {
    /// `(surge, unavailable)` for `replicas`; when both come to 0 one instance may be
    /// unavailable, or nothing could ever move (Kubernetes does the same).
    pub fn resolve(&self, replicas: u32) -> (u32, u32) {
        let surge = self.max_surge.of(replicas, true);
        let unavailable = self.max_unavailable.of(replicas, false).min(replicas);
        if surge == 0 && unavailable == 0 {
            (0, 1)
        } else {
            (surge, unavailable)
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CanaryUpdate {
    /// How many instances (or what share of `replicas`, rounded up, at least one) run the
    /// new template while the canary holds.
    pub step: Amount,
}

impl CanaryUpdate {
    /// The number of canary instances out of `replicas`.
    pub fn count(&self, replicas: u32) -> u32 {
        self.step.of(replicas, true).clamp(1, replicas.max(1))
    }
}

impl Strategy {
    pub fn validate(&self, field: &str) -> Result<(), ValidationError> {
        match self {
            Strategy::Rolling(r) => {
                r.max_surge
                    .validate(&format!("{field}.rolling.max_surge"))?;
                r.max_unavailable
                    .validate(&format!("{field}.rolling.max_unavailable"))?;
                if r.max_surge.is_zero() && r.max_unavailable.is_zero() {
                    return Err(ValidationError::new(
                        format!("{field}.rolling"),
                        "max_surge and max_unavailable are both 0: nothing could be replaced",
                    ));
                }
                Ok(())
            }
            Strategy::Canary(c) => {
                let f = format!("{field}.canary.step");
                c.step.validate(&f)?;
                if c.step.is_zero() {
                    return Err(ValidationError::new(f, "must be at least 1 (or 1%)"));
                }
                Ok(())
            }
        }
    }

    /// The rolling parameters in force: the strategy's own, or for a canary being promoted
    /// the defaults.
    pub fn rolling(&self) -> RollingUpdate {
        match self {
            Strategy::Rolling(r) => r.clone(),
            Strategy::Canary(_) => RollingUpdate::default(),
        }
    }
}

/// Where the rollout of the current template stands (written by the service controller).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum RolloutPhase {
    /// Every instance runs the current template and is ready.
    #[default]
    Complete,
    /// Instances are being replaced or are starting.
    Progressing,
    /// A canary holds: `promote` or `rollback`.
    Paused,
    /// New instances do not become ready (the message says why); old ones keep serving.
    Stalled,
}

impl std::fmt::Display for RolloutPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RolloutPhase::Complete => "complete",
            RolloutPhase::Progressing => "progressing",
            RolloutPhase::Paused => "paused",
            RolloutPhase::Stalled => "stalled",
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutStatus {
    #[serde(default)]
    pub phase: RolloutPhase,
    /// A canary of the current revision was promoted (or the revision came from `rollback`
    /// or `undo`, which never hold): it rolls to every instance.
    #[serde(default)]
    pub promoted: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// One kept template.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateRevision {
    pub revision: u64,
    #[serde(default)]
    pub created_at: Option<DateTime<Utc>>,
    /// Who made it and how (`updated by alice`, `undo to revision 2 by bob`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cause: String,
    pub template: ContainerSpec,
}

/// An action on a service's rollout (`POST …/services/{name}/rollout`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum RolloutAction {
    /// A holding canary rolls on to every instance.
    Promote,
    /// An unfinished rollout goes back to the template before it.
    Rollback,
    /// The template becomes a kept revision's (default: the one before the current), as a
    /// new revision.
    Undo {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to_revision: Option<u64>,
    },
}

/// Why a rollout action is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RolloutError {
    #[error(
        "service {service}: no canary holds to promote (rollout of revision {revision} is {phase})"
    )]
    NothingToPromote {
        service: String,
        revision: u64,
        phase: RolloutPhase,
    },
    #[error(
        "service {service}: the rollout of revision {revision} is complete; use undo to go back"
    )]
    NothingToRollBack { service: String, revision: u64 },
    #[error("to_revision: service {service} keeps no revision {revision} (kept: {kept})")]
    NotKept {
        service: String,
        revision: u64,
        kept: String,
    },
    #[error("service {service} keeps no revision before {revision}")]
    NoPrevious { service: String, revision: u64 },
    #[error("to_revision: revision {revision} is the template service {service} has now")]
    AlreadyCurrent { service: String, revision: u64 },
}

impl RolloutError {
    /// Whether the request names something that is not there (else: not now).
    pub fn is_invalid(&self) -> bool {
        matches!(
            self,
            RolloutError::NotKept { .. } | RolloutError::AlreadyCurrent { .. }
        )
    }
}

/// What an accepted action changes: the new object, and the Event that tells of it.
#[derive(Debug)]
pub struct Applied {
    pub service: Service,
    pub reason: &'static str,
    pub message: String,
}

/// Checks `action` against the rollout's state and returns the changed service. The one
/// place the lifecycle is enforced: promote only while a canary holds or is moving, rollback
/// only while a rollout is unfinished, undo to a kept revision other than the current.
pub fn apply(
    svc: &Service,
    action: &RolloutAction,
    by: &str,
    now: DateTime<Utc>,
) -> Result<Applied, RolloutError> {
    let name = svc.name.clone();
    let current = svc.status.template_revision;
    let phase = svc.status.rollout.phase;
    let mut out = svc.clone();
    match action {
        RolloutAction::Promote => {
            let canary = matches!(svc.spec.strategy, Strategy::Canary(_));
            if !canary || svc.status.rollout.promoted || phase == RolloutPhase::Complete {
                return Err(RolloutError::NothingToPromote {
                    service: name,
                    revision: current,
                    phase,
                });
            }
            out.status.rollout.promoted = true;
            out.status.rollout.phase = RolloutPhase::Progressing;
            out.status.rollout.message = format!("promoted by {by}");
            Ok(Applied {
                service: out,
                reason: "RolloutPromoted",
                message: format!("service {name}: revision {current} promoted by {by}"),
            })
        }
        RolloutAction::Rollback => {
            if phase == RolloutPhase::Complete {
                return Err(RolloutError::NothingToRollBack {
                    service: name,
                    revision: current,
                });
            }
            let prev = previous(svc)?;
            let cause = format!(
                "rollback of revision {current} to {} by {by}",
                prev.revision
            );
            out.spec.template = prev.template.clone();
            new_template(svc, &mut out, cause.clone(), now);
            out.status.rollout.promoted = true;
            Ok(Applied {
                service: out,
                reason: "RolledBack",
                message: format!("service {name}: {cause}"),
            })
        }
        RolloutAction::Undo { to_revision } => {
            let target = match to_revision {
                None => previous(svc)?,
                Some(r) if *r == current => {
                    return Err(RolloutError::AlreadyCurrent {
                        service: name,
                        revision: *r,
                    });
                }
                Some(r) => svc
                    .status
                    .history
                    .iter()
                    .find(|h| h.revision == *r)
                    .ok_or_else(|| RolloutError::NotKept {
                        service: name.clone(),
                        revision: *r,
                        kept: kept(svc),
                    })?,
            };
            if target.template == svc.spec.template {
                return Err(RolloutError::AlreadyCurrent {
                    service: name,
                    revision: target.revision,
                });
            }
            let cause = format!("undo to revision {} by {by}", target.revision);
            out.spec.template = target.template.clone();
            new_template(svc, &mut out, cause.clone(), now);
            out.status.rollout.promoted = true;
            Ok(Applied {
                service: out,
                reason: "RolloutUndone",
                message: format!("service {name}: {cause}"),
            })
        }
    }
}

/// The kept revision just before the current one.
fn previous(svc: &Service) -> Result<&TemplateRevision, RolloutError> {
    let current = svc.status.template_revision;
    svc.status
        .history
        .iter()
        .filter(|h| h.revision < current)
        .max_by_key(|h| h.revision)
        .ok_or_else(|| RolloutError::NoPrevious {
            service: svc.name.clone(),
            revision: current,
        })
}

fn kept(svc: &Service) -> String {
    let v: Vec<String> = svc
        .status
        .history
        .iter()
        .map(|h| h.revision.to_string())
        .collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// Numbers a new service's template as revision 1.
pub fn first_template(svc: &mut Service, cause: String, now: DateTime<Utc>) {
    svc.status.template_revision = 1;
    svc.status.rollout = RolloutStatus {
        phase: RolloutPhase::Progressing,
        ..Default::default()
    };
    svc.status.history = vec![TemplateRevision {
        revision: 1,
        created_at: Some(now),
        cause,
        template: svc.spec.template.clone(),
    }];
}

/// When `next`'s template differs from `stored`'s: gives it the next revision number, keeps
/// it in the history (dropping the oldest past [`MAX_HISTORY`] or [`MAX_HISTORY_BYTES`]) and
/// starts its rollout (a canary holds again until promoted). Returns whether it did.
pub fn new_template(
    stored: &Service,
    next: &mut Service,
    cause: String,
    now: DateTime<Utc>,
) -> bool {
    if stored.spec.template == next.spec.template {
        return false;
    }
    let mut history = stored.status.history.clone();
    let mut last = stored.status.template_revision;
    if last == 0 {
        // Made before revisions were numbered: its template becomes revision 1.
        last = 1;
        history.push(TemplateRevision {
            revision: 1,
            created_at: stored.created_at,
            cause: String::new(),
            template: stored.spec.template.clone(),
        });
    }
    let revision = last + 1;
    history.push(TemplateRevision {
        revision,
        created_at: Some(now),
        cause,
        template: next.spec.template.clone(),
    });
    trim(&mut history);
    next.status.template_revision = revision;
    next.status.history = history;
    next.status.rollout = RolloutStatus {
        phase: RolloutPhase::Progressing,
        promoted: false,
        message: format!("revision {revision}: starting"),
    };
    true
}

fn trim(history: &mut Vec<TemplateRevision>) {
    let size = |h: &TemplateRevision| serde_json::to_vec(h).map_or(0, |v| v.len());
    while history.len() > MAX_HISTORY
        || (history.len() > 1 && history.iter().map(size).sum::<usize>() > MAX_HISTORY_BYTES)
    {
        history.remove(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::ServiceSpec;

    fn amount(json: &str) -> Amount {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn amounts_parse_validate_and_resolve() {
        assert_eq!(amount("3"), Amount::Count(3));
        assert_eq!(amount("\"25%\""), Amount::Percent("25%".into()));
        for bad in [
            "\"25\"", "\"101%\"", "\"-1%\"", "\"%\"", "\"+5%\"", "\"1.5%\"",
        ] {
            assert!(amount(bad).validate("f").is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<Amount>("-1").is_err());
        assert!(Amount::Count(1001).validate("f").is_err());
        // 25% of 10: 3 rounded up, 2 rounded down.
        assert_eq!(amount("\"25%\"").of(10, true), 3);
        assert_eq!(amount("\"25%\"").of(10, false), 2);
        assert_eq!(amount("\"100%\"").of(7, false), 7);
        assert_eq!(amount("\"0%\"").of(7, true), 0);
    }

    #[test]
    fn rolling_parameters_resolve_like_kubernetes() {
        let r = RollingUpdate::default();
        assert_eq!(r.resolve(4), (1, 1));
        assert_eq!(r.resolve(3), (1, 0));
        assert_eq!(r.resolve(1), (1, 0));
        assert_eq!(r.resolve(10), (3, 2));
        let zero = RollingUpdate {
            max_surge: Amount::Count(0),
            max_unavailable: Amount::Percent("10%".into()),
        };
        // 10% of 3 is 0: one may be unavailable, or nothing moves.
        assert_eq!(zero.resolve(3), (0, 1));
        let c = CanaryUpdate {
            step: Amount::Percent("10%".into()),
        };
        assert_eq!(c.count(3), 1);
        assert_eq!(c.count(20), 2);
        let c = CanaryUpdate {
            step: Amount::Count(5),
        };
        assert_eq!(c.count(3), 3);
    }

    #[test]
    fn strategies_are_validated_with_the_field() {
        let s: Strategy = serde_json::from_str(r#"{"rolling":{}}"#).unwrap();
        assert_eq!(s, Strategy::default());
        let s: Strategy =
            serde_json::from_str(r#"{"rolling":{"max_surge":0,"max_unavailable":"0%"}}"#).unwrap();
        assert_eq!(
            s.validate("spec.strategy").unwrap_err().field,
            "spec.strategy.rolling"
        );
        let s: Strategy = serde_json::from_str(r#"{"canary":{"step":0}}"#).unwrap();
        assert_eq!(
            s.validate("spec.strategy").unwrap_err().field,
            "spec.strategy.canary.step"
        );
        let s: Strategy = serde_json::from_str(r#"{"rolling":{"max_surge":"x"}}"#).unwrap();
        assert_eq!(
            s.validate("spec.strategy").unwrap_err().field,
            "spec.strategy.rolling.max_surge"
        );
        for bad in [
            r#"{"rolling":{"max_surg":1}}"#,
            r#"{"canary":{}}"#,
            r#"{"blue_green":{}}"#,
            r#"{"canary":{"step":1,"x":2}}"#,
        ] {
            assert!(serde_json::from_str::<Strategy>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn actions_parse_strictly() {
        let a: RolloutAction = serde_json::from_str(r#"{"action":"promote"}"#).unwrap();
        assert_eq!(a, RolloutAction::Promote);
        let a: RolloutAction =
            serde_json::from_str(r#"{"action":"undo","to_revision":3}"#).unwrap();
        assert_eq!(
            a,
            RolloutAction::Undo {
                to_revision: Some(3)
            }
        );
        for bad in [
            r#"{"action":"pause"}"#,
            r#"{"action":"undo","to":3}"#,
            r#"{}"#,
        ] {
            assert!(serde_json::from_str::<RolloutAction>(bad).is_err(), "{bad}");
        }
    }

    fn svc(image: &str) -> Service {
        let mut s = Service {
            name: "web".into(),
            spec: ServiceSpec {
                replicas: 3,
                template: ContainerSpec {
                    image: image.into(),
                    ..Default::default()
                },
                strategy: Strategy::Canary(CanaryUpdate {
                    step: Amount::Count(1),
                }),
            },
            ..Default::default()
        };
        first_template(&mut s, "created".into(), Utc::now());
        s
    }

    fn change(s: &Service, image: &str) -> Service {
        let mut next = s.clone();
        next.spec.template.image = image.into();
        assert!(new_template(s, &mut next, "updated".into(), Utc::now()));
        next
    }

    #[test]
    fn template_changes_are_numbered_and_the_history_is_bounded() {
        let mut s = svc("img:0");
        let same = s.clone();
        assert!(!new_template(&s, &mut s.clone(), String::new(), Utc::now()));
        assert_eq!(same.status.template_revision, 1);
        for i in 1..=14 {
            s = change(&s, &format!("img:{i}"));
        }
        assert_eq!(s.status.template_revision, 15);
        let kept: Vec<u64> = s.status.history.iter().map(|h| h.revision).collect();
        assert_eq!(kept, (6..=15).collect::<Vec<_>>());
        assert_eq!(s.status.history.last().unwrap().template.image, "img:14");

        // Big templates: fewer kept, the current one always.
        let mut big = svc("img:0");
        for i in 1..=5 {
            let mut next = big.clone();
            next.spec.template.args = vec!["x".repeat(100 * 1024), i.to_string()];
            assert!(new_template(&big, &mut next, String::new(), Utc::now()));
            big = next;
        }
        assert_eq!(big.status.history.len(), 2);
        assert_eq!(big.status.template_revision, 6);
    }

    #[test]
    fn the_lifecycle_is_checked_in_one_place() {
        let now = Utc::now();
        let v1 = svc("img:1");
        let mut v2 = change(&v1, "img:2");
        // A canary that is moving or holding may be promoted, once.
        v2.status.rollout.phase = RolloutPhase::Paused;
        let promoted = apply(&v2, &RolloutAction::Promote, "alice", now).unwrap();
        assert!(promoted.service.status.rollout.promoted);
        assert_eq!(promoted.service.spec, v2.spec);
        assert!(matches!(
            apply(&promoted.service, &RolloutAction::Promote, "alice", now),
            Err(RolloutError::NothingToPromote { .. })
        ));
        // Rollback: the template before, as revision 3, rolled without holding.
        let back = apply(&v2, &RolloutAction::Rollback, "bob", now).unwrap();
        assert_eq!(back.service.spec.template.image, "img:1");
        assert_eq!(back.service.status.template_revision, 3);
        assert!(back.service.status.rollout.promoted);
        assert_eq!(back.service.status.rollout.phase, RolloutPhase::Progressing);
        assert_eq!(
            back.service.status.history.last().unwrap().cause,
            "rollback of revision 2 to 1 by bob"
        );
        // A finished rollout cannot be rolled back, nor promoted; undo works.
        let mut done = v2.clone();
        done.status.rollout.phase = RolloutPhase::Complete;
        assert!(matches!(
            apply(&done, &RolloutAction::Rollback, "bob", now),
            Err(RolloutError::NothingToRollBack { .. })
        ));
        assert!(apply(&done, &RolloutAction::Promote, "bob", now).is_err());
        let undo = apply(
            &done,
            &RolloutAction::Undo { to_revision: None },
            "bob",
            now,
        )
        .unwrap();
        assert_eq!(undo.service.spec.template.image, "img:1");
        let to = |r| RolloutAction::Undo {
            to_revision: Some(r),
        };
        let e = apply(&done, &to(7), "bob", now).unwrap_err();
        assert!(e.is_invalid());
        assert_eq!(
            e.to_string(),
            "to_revision: service web keeps no revision 7 (kept: 1, 2)"
        );
        assert!(apply(&done, &to(2), "bob", now).unwrap_err().is_invalid());
        // Revision 1 has nothing before it.
        assert!(matches!(
            apply(&v1, &RolloutAction::Undo { to_revision: None }, "bob", now),
            Err(RolloutError::NoPrevious { .. })
        ));
        // A rolling service has no canary to promote.
        let mut rolling = v2.clone();
        rolling.spec.strategy = Strategy::default();
        assert!(apply(&rolling, &RolloutAction::Promote, "bob", now).is_err());
    }
}
