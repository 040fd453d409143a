//! The arithmetic of one reconcile of a service: from its instances (current template or
//! not, ready or not) decide which to create and which to delete, and what phase the
//! rollout is in. No I/O, so every state is unit-tested here and the controller only
//! carries the plan out.
//!
//! Rolling (Kubernetes' Deployment rules): new instances are created while the total stays
//! within `replicas + surge`; old ones are deleted while the ready count stays at least
//! `replicas - unavailable` (unready old ones go first and freely: they serve nothing). A
//! canary caps the new instances at its step until promoted. Without old instances this is
//! plain scaling: create up to `replicas`, delete the surplus unready first, then newest.

use chrono::{DateTime, Utc};
use hive_api::{RolloutPhase, Strategy};

/// One instance as the plan sees it.
#[derive(Clone, Debug)]
pub struct Member {
    pub name: String,
    /// Made from the service's current template.
    pub current: bool,
    pub ready: bool,
    /// Why it is not starting (`ImagePullFailed: …`), when the agent or scheduler said.
    pub failing: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
}

/// What one reconcile does, and what the status says after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Instances of the current template to create.
    pub create: usize,
    pub delete: Vec<String>,
    pub phase: RolloutPhase,
    pub message: String,
    /// After the plan: instances, ready ones, current-template ones.
    pub replicas: u32,
    pub ready: u32,
    pub updated: u32,
    /// Old-template instances existed: creations and deletions are rollout steps.
    pub rolling: bool,
}

/// Deletion order: unready first, then the newest.
fn victims_first(v: &mut [&Member]) {
    v.sort_by(|a, b| a.ready.cmp(&b.ready).then(b.created_at.cmp(&a.created_at)));
}

pub fn plan(replicas: u32, strategy: &Strategy, promoted: bool, members: &[Member]) -> Plan {
    let n = replicas as usize;
    let (new, old): (Vec<&Member>, Vec<&Member>) = members.iter().partition(|m| m.current);
    let (surge, unavailable) = strategy.rolling().resolve(replicas);
    let canary = match strategy {
        Strategy::Canary(c) if !promoted && !old.is_empty() => Some(c.count(replicas) as usize),
        _ => None,
    };
    // Old instances are never made: when there are too few of them (the service grew during
    // a hold), new ones fill the gap.
    let new_target = match canary {
        Some(step) => step.max(n.saturating_sub(old.len())).min(n),
        None => n,
    };
    let old_target = n - new_target;
    let total = members.len();

    let mut create = 0;
    let mut delete: Vec<String> = Vec::new();
    let mut new_left: Vec<&Member> = new.clone();
    if new.len() < new_target {
        let want = new_target - new.len();
        create = if old.is_empty() {
            want
        } else {
            want.min((n + surge as usize).saturating_sub(total))
        };
    } else if new.len() > new_target {
        victims_first(&mut new_left);
        for v in new_left.drain(..new.len() - new_target) {
            delete.push(v.name.clone());
        }
    }

    let mut old_left: Vec<&Member> = old.clone();
    if old.len() > old_target {
        let surplus = old.len() - old_target;
        let ready_now = new_left.iter().chain(&old).filter(|m| m.ready).count();
        let min_available = n.saturating_sub(unavailable as usize);
        let mut budget = ready_now.saturating_sub(min_available);
        victims_first(&mut old_left);
        let mut gone = 0;
        while gone < surplus {
            let Some(v) = old_left.first() else { break };
            if v.ready {
                if budget == 0 {
                    break;
                }
                budget -= 1;
            }
            delete.push(v.name.clone());
            old_left.remove(0);
            gone += 1;
        }
    }

    let updated = new_left.len() + create;
    let new_ready = new_left.iter().filter(|m| m.ready).count();
    let ready = new_ready + old_left.iter().filter(|m| m.ready).count();
    let failing = new_left.iter().find_map(|m| {
        m.failing
            .as_ref()
            .map(|f| format!("instance {}: {f}", m.name))
    });
    let (phase, message) = if old_left.is_empty() && updated == n && new_ready == n {
        (
            RolloutPhase::Complete,
            format!("{n} of {n} updated and ready"),
        )
    } else if canary.is_some()
        && old_left.len() == old_target
        && updated == new_target
        && new_ready == new_target
    {
        (
            RolloutPhase::Paused,
            format!("canary: {new_target} of {n} updated and ready; promote or rollback"),
        )
    } else if let Some(why) = failing {
        (
            RolloutPhase::Stalled,
            format!("{updated} of {n} updated, {ready} ready; new instances do not start: {why}"),
        )
    } else {
        (
            RolloutPhase::Progressing,
            format!(
                "{updated} of {} updated, {new_ready} of them ready, {} old left",
                new_target,
                old_left.len()
            ),
        )
    };
    Plan {
        create,
        delete,
        phase,
        message,
        replicas: (updated + old_left.len()) as u32,
        ready: ready as u32,
        updated: updated as u32,
        rolling: !old.is_empty(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hive_api::{Amount, CanaryUpdate, RollingUpdate};

    /// `spec`: one letter per instance, in creation order: `N`/`n` new ready/unready,
    /// `O`/`o` old ready/unready, `f` new failing.
    fn members(spec: &str) -> Vec<Member> {
        spec.chars()
            .enumerate()
            .map(|(i, c)| Member {
                name: format!("{c}{i}"),
                current: matches!(c, 'N' | 'n' | 'f'),
                ready: c.is_ascii_uppercase(),
                failing: (c == 'f').then(|| "ImagePullFailed: no such image".into()),
                created_at: Some(DateTime::from_timestamp(i as i64, 0).unwrap_or_default()),
            })
            .collect()
    }

    fn rolling(surge: u32, unavailable: u32) -> Strategy {
        Strategy::Rolling(RollingUpdate {
            max_surge: Amount::Count(surge),
            max_unavailable: Amount::Count(unavailable),
        })
    }

    fn canary(step: u32) -> Strategy {
        Strategy::Canary(CanaryUpdate {
            step: Amount::Count(step),
        })
    }

    /// Applies plans, making every created instance ready at once when `ready_new`, until
    /// nothing changes; returns the phases seen and the final members.
    fn run(
        n: u32,
        s: &Strategy,
        promoted: bool,
        spec: &str,
        ready_new: bool,
    ) -> (Vec<Plan>, Vec<Member>) {
        let mut m = members(spec);
        let mut plans = Vec::new();
        for round in 0..50 {
            let p = plan(n, s, promoted, &m);
            // Never below replicas - unavailable ready ones, counting before this round's
            // creations are ready.
            let min = n.saturating_sub(s.rolling().resolve(n).1);
            let before_ready = m.iter().filter(|x| x.ready).count() as u32;
            if before_ready >= min {
                assert!(p.ready >= min, "round {round}: {p:?}");
            }
            let idle = p.create == 0 && p.delete.is_empty();
            m.retain(|x| !p.delete.contains(&x.name));
            for i in 0..p.create {
                m.push(Member {
                    name: format!("c{round}-{i}"),
                    current: true,
                    ready: false,
                    failing: None,
                    created_at: Some(DateTime::from_timestamp(1000 + round, 0).unwrap_or_default()),
                });
            }
            assert!(
                m.len() <= (n + s.rolling().resolve(n).0) as usize || !p.rolling,
                "round {round}: {} instances",
                m.len()
            );
            plans.push(p);
            if ready_new {
                for x in m.iter_mut().filter(|x| x.current) {
                    x.ready = true;
                }
            }
            if idle {
                break;
            }
        }
        (plans, m)
    }

    #[test]
    fn plain_scaling_without_old_instances() {
        let p = plan(3, &rolling(1, 0), false, &members("N"));
        assert_eq!((p.create, p.delete.len(), p.rolling), (2, 0, false));
        assert_eq!(p.phase, RolloutPhase::Progressing);
        // Scale down: unready first, then the newest.
        let p = plan(1, &rolling(1, 0), false, &members("NnNN"));
        assert_eq!(p.delete, vec!["n1", "N3", "N2"]);
        let p = plan(2, &rolling(1, 0), false, &members("NN"));
        assert_eq!(p.phase, RolloutPhase::Complete);
    }

    #[test]
    fn a_rolling_update_surges_and_waits_for_readiness() {
        // 3 replicas, surge 1, unavailable 0: one new, then one old goes when it is ready.
        let p = plan(3, &rolling(1, 0), false, &members("OOO"));
        assert_eq!((p.create, p.delete.clone()), (1, vec![]));
        let p = plan(3, &rolling(1, 0), false, &members("OOOn"));
        assert_eq!((p.create, p.delete.clone()), (0, vec![]));
        assert_eq!(p.phase, RolloutPhase::Progressing);
        let p = plan(3, &rolling(1, 0), false, &members("OOON"));
        assert_eq!((p.create, p.delete.clone()), (0, vec!["O2".to_string()]));
        // Unavailable 1: one old goes at once, beside the surge.
        let p = plan(3, &rolling(1, 1), false, &members("OOO"));
        assert_eq!((p.create, p.delete.len()), (1, 1));
        // Unready old ones go first and freely.
        let p = plan(3, &rolling(1, 0), false, &members("OoON"));
        assert_eq!(p.delete, vec!["o1"]);
        let p = plan(3, &rolling(1, 1), false, &members("OoON"));
        assert_eq!(p.delete, vec!["o1", "O2"]);
        let (plans, end) = run(3, &rolling(1, 0), false, "OOO", true);
        assert_eq!(plans.last().unwrap().phase, RolloutPhase::Complete);
        assert!(end.iter().all(|m| m.current && m.ready) && end.len() == 3);
        let (plans, _) = run(10, &Strategy::default(), false, "OOOOOOOOOO", true);
        assert_eq!(plans.last().unwrap().phase, RolloutPhase::Complete);
        // Default 25%/25% of 10: surge 3, unavailable 2 → 3 created and 2 deleted at once.
        assert_eq!((plans[0].create, plans[0].delete.len()), (3, 2));
    }

    #[test]
    fn new_instances_that_never_start_stall_the_rollout_at_max_unavailable() {
        let (plans, end) = run(3, &rolling(1, 1), false, "OOO", false);
        let last = plans.last().unwrap();
        assert_eq!(last.phase, RolloutPhase::Progressing);
        // Two old ones serve, two new ones wait: 3 - 1 ready, 3 + 1 in all.
        assert_eq!(end.iter().filter(|m| !m.current && m.ready).count(), 2);
        assert_eq!(end.len(), 4);
        // With a reason from the node, the phase says stalled and why.
        let p = plan(3, &rolling(1, 1), false, &members("OOff"));
        assert_eq!(p.phase, RolloutPhase::Stalled);
        assert!(p.message.contains("ImagePullFailed"), "{}", p.message);
        assert_eq!((p.create, p.delete.len()), (0, 0));
    }

    #[test]
    fn a_canary_holds_at_its_step_until_promoted() {
        let (plans, end) = run(4, &canary(1), false, "OOOO", true);
        let last = plans.last().unwrap();
        assert_eq!(last.phase, RolloutPhase::Paused, "{last:?}");
        assert_eq!(end.iter().filter(|m| m.current).count(), 1);
        assert_eq!(end.len(), 4);
        // Promoted: the rest rolls.
        let spec: String = end
            .iter()
            .map(|m| if m.current { 'N' } else { 'O' })
            .collect();
        let (plans, end) = run(4, &canary(1), true, &spec, true);
        assert_eq!(plans.last().unwrap().phase, RolloutPhase::Complete);
        assert!(end.iter().all(|m| m.current));
        // A canary bigger than the service is a whole rollout.
        let (plans, _) = run(2, &canary(5), false, "OO", true);
        assert_eq!(plans.last().unwrap().phase, RolloutPhase::Complete);
        // Growing during a hold: old instances are never made, so new ones fill the gap.
        let p = plan(6, &canary(1), false, &members("OOONN"));
        assert_eq!((p.create, p.delete.len()), (1, 0));
        // Shrinking during a hold: the canary stays at its step, old ones go.
        let p = plan(2, &canary(1), false, &members("OOON"));
        assert_eq!((p.create, p.delete.len()), (0, 2));
        assert_eq!(p.phase, RolloutPhase::Paused);
        // A fresh service under a canary strategy just scales.
        let p = plan(3, &canary(1), false, &members(""));
        assert_eq!(p.create, 3);
    }
}
