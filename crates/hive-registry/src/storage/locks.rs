//! Locks that hold across every process serving the same registry root (several API
//! servers on one shared directory): `flock(2)` on files under `locks/`, taken off the async
//! threads. A lock is released when its guard drops (the file is closed), and by the kernel
//! when its process dies, so a crashed server never leaves a registry locked.
//!
//! Within a process each caller opens its own descriptor, so the kernel orders them too;
//! the in-process `tokio` locks in front of them keep waiting cheap and fair there.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// A held `flock` on one file.
#[derive(Debug)]
pub(super) struct FileLock {
    file: File,
}

impl FileLock {
    /// Waits for the lock on `path` (created if missing): shared, or exclusive.
    pub(super) async fn acquire(path: PathBuf, exclusive: bool) -> io::Result<Self> {
        tokio::task::spawn_blocking(move || {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)?;
            if exclusive {
                file.lock()?;
            } else {
                file.lock_shared()?;
            }
            Ok(Self { file })
        })
        .await
        .map_err(io::Error::other)?
    }

    /// The counter kept in the locked file (0 when it holds none yet). Read under an
    /// exclusive lock, it is what the last holder wrote.
    pub(super) fn counter(&self) -> u64 {
        let mut b = [0u8; 8];
        match self.file.read_exact_at(&mut b, 0) {
            Ok(()) => u64::from_le_bytes(b),
            Err(_) => 0,
        }
    }

    /// Replaces the counter (under an exclusive lock). A torn write (a crash in the middle)
    /// reads back as some other number: holders that compare counters then count again,
    /// which is always safe.
    pub(super) fn set_counter(&self, value: u64) -> io::Result<()> {
        self.file.write_all_at(&value.to_le_bytes(), 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn exclusive_waits_for_shared_holders_and_counters_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locks/x");
        let a = FileLock::acquire(path.clone(), false).await.unwrap();
        let b = FileLock::acquire(path.clone(), false).await.unwrap();
        let p = path.clone();
        let mut x = tokio::spawn(async move { FileLock::acquire(p, true).await.unwrap() });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!x.is_finished(), "exclusive granted while shared held");
        drop(a);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !x.is_finished(),
            "exclusive granted while one shared is held"
        );
        drop(b);
        let x = tokio::time::timeout(Duration::from_secs(5), &mut x)
            .await
            .expect("exclusive after every shared lock is gone")
            .unwrap();
        assert_eq!(x.counter(), 0);
        x.set_counter(41).unwrap();
        drop(x);
        let again = FileLock::acquire(path, true).await.unwrap();
        assert_eq!(again.counter(), 41);
    }
}
