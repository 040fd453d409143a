//! The node's containers as the agent last read them, so that a pass of the sync loop reads
//! again only those that may have changed instead of every container's directory and records
//! (a few syscalls per container, several passes per start: with 45 containers, a quarter
//! of the agent's CPU in a start).
//!
//! A container's records change when the agent starts, stops or removes it, which it says
//! ([`Known::touch`], [`Known::forget`]), and when its processes end, which the kernel says:
//! each running container's supervisor (or, with it gone, its init) is watched through a
//! pidfd by a task that sends the container's id on the agent's channel. Everything is read
//! again every [`REREAD_EVERY`] all the same (a change made behind the agent's back).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use crate::runtime::{ContainerState, Containers, watched_pid};

/// How often every container is read again from disk.
pub const REREAD_EVERY: Duration = Duration::from_secs(10);

/// See the module's doc.
#[derive(Debug)]
pub struct Known {
    /// Every container with a directory here; None: to be read.
    states: BTreeMap<String, Option<ContainerState>>,
    /// The watch of each running container's processes.
    watches: HashMap<String, Watch>,
    /// Where watches send the id of a container whose process ended.
    ended: UnboundedSender<String>,
    read_at: Instant,
}

/// A task waiting for a running container's process to end; stopped when dropped.
#[derive(Debug)]
struct Watch {
    pid: i32,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Known {
    /// Every container of `containers`, none read yet.
    pub fn load(containers: &Containers, ended: UnboundedSender<String>) -> Known {
        Known {
            states: containers.list().into_iter().map(|id| (id, None)).collect(),
            watches: HashMap::new(),
            ended,
            read_at: Instant::now(),
        }
    }

    /// The containers with a directory here, sorted.
    pub fn ids(&self) -> Vec<String> {
        self.states.keys().cloned().collect()
    }

    /// Container `id`'s state: as last read, or read now (and its processes watched if it
    /// runs). One with no directory here is [`ContainerState::Unknown`].
    pub fn state(&mut self, containers: &Containers, id: &str) -> ContainerState {
        match self.states.get(id) {
            None => ContainerState::Unknown,
            Some(Some(s)) => s.clone(),
            Some(None) => {
                let s = containers.state(id);
                self.watch(id, &s);
                self.states.insert(id.to_owned(), Some(s.clone()));
                s
            }
        }
    }

    /// Container `id` may have changed (started, stopped, its process ended): read it again
    /// when next asked, or forget it if its directory is gone.
    pub fn touch(&mut self, containers: &Containers, id: &str) {
        if containers.dir(id).is_dir() {
            self.states.insert(id.to_owned(), None);
        } else {
            self.forget(id);
        }
    }

    /// Container `id` is gone.
    pub fn forget(&mut self, id: &str) {
        self.states.remove(id);
        self.watches.remove(id);
    }

    /// Reads the list of containers again, and each one when next asked, once
    /// [`REREAD_EVERY`] has passed since the last time.
    pub fn reread_if_due(&mut self, containers: &Containers) {
        if self.read_at.elapsed() < REREAD_EVERY {
            return;
        }
        self.read_at = Instant::now();
        self.states = containers.list().into_iter().map(|id| (id, None)).collect();
        self.watches.retain(|id, _| self.states.contains_key(id));
    }

    /// Watches container `id` if it runs (keeping a watch of the same process that is still
    /// waiting), else drops its watch. The supervisor is the one watched while it lives: it
    /// records the container's exit before it ends. With it gone (killed), the init is.
    fn watch(&mut self, id: &str, state: &ContainerState) {
        let ContainerState::Running(s) = state else {
            self.watches.remove(id);
            return;
        };
        let pid = watched_pid(s);
        if self
            .watches
            .get(id)
            .is_some_and(|w| w.pid == pid && !w.task.is_finished())
        {
            return;
        }
        let (id, ended) = (id.to_owned(), self.ended.clone());
        let task = tokio::spawn(ended_of(id.clone(), pid, ended));
        self.watches.insert(id, Watch { pid, task });
    }
}

/// Sends `id` once process `pid` ends (at once if it cannot be watched: gone already).
async fn ended_of(id: String, pid: i32, ended: UnboundedSender<String>) {
    crate::runtime::ended(pid).await;
    let _ = ended.send(id);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::shim;
    use crate::runtime::{record_started, unrun};

    #[tokio::test]
    async fn states_are_read_once_and_again_when_touched_or_when_their_process_ends() {
        let dir = tempfile::tempdir().unwrap();
        let c = unrun(dir.path());
        let mut child = std::process::Command::new("sleep")
            .arg("1000")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        record_started(&c, "c1", pid);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut known = Known::load(&c, tx);
        assert_eq!(known.ids(), ["c1"]);
        assert!(matches!(known.state(&c, "c1"), ContainerState::Running(_)));
        assert_eq!(known.state(&c, "nope"), ContainerState::Unknown);

        // Read once: a change on disk is not seen until the container is touched.
        std::fs::remove_file(c.dir("c1").join(shim::STARTED)).unwrap();
        assert!(matches!(known.state(&c, "c1"), ContainerState::Running(_)));
        known.touch(&c, "c1");
        assert_eq!(known.state(&c, "c1"), ContainerState::Unknown);

        // Running again, watched: its end is sent (the test's child is no supervisor, so
        // nothing records an exit; the agent would read the records again).
        record_started(&c, "c1", pid);
        known.touch(&c, "c1");
        assert!(matches!(known.state(&c, "c1"), ContainerState::Running(_)));
        assert!(rx.try_recv().is_err());
        child.kill().unwrap();
        child.wait().unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert_eq!(got.unwrap().as_deref(), Some("c1"));
        known.touch(&c, "c1");
        assert!(matches!(known.state(&c, "c1"), ContainerState::Lost(_)));

        // A container whose directory went is forgotten when touched.
        std::fs::remove_dir_all(c.dir("c1")).unwrap();
        known.touch(&c, "c1");
        assert!(known.ids().is_empty());
        assert!(known.watches.is_empty());
    }

    #[tokio::test]
    async fn a_container_whose_process_is_gone_is_sent_at_once() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // No process has pid 0: nothing to watch.
        ended_of("c2".into(), 0, tx).await;
        assert_eq!(rx.recv().await.as_deref(), Some("c2"));
    }

    #[test]
    fn everything_is_read_again_once_due() {
        let dir = tempfile::tempdir().unwrap();
        let c = unrun(dir.path());
        std::fs::create_dir_all(c.dir("a")).unwrap();
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let mut known = Known::load(&c, tx);
        std::fs::create_dir_all(c.dir("b")).unwrap();
        known.reread_if_due(&c);
        assert_eq!(known.ids(), ["a"]);
        known.read_at -= REREAD_EVERY;
        known.reread_if_due(&c);
        assert_eq!(known.ids(), ["a", "b"]);
    }
}
