//! Crash safety of the redb backend: a child process writes through several concurrent
//! writers (and compacts meanwhile) and is killed with SIGKILL at a random moment, eight
//! times over the same file. After each kill the file must open, every write the child saw
//! acknowledged must be there, revisions must be consistent and the log must be complete and
//! readable.
//!
//! The child is this test binary itself, re-run with `--exact crash_child --ignored` and an
//! environment variable naming the file; it prints `ack <revision> <key>` only after its txn
//! returned Ok, so each printed line is a promise of durability.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasher, Hasher};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use hive_store::{EventKind, Op, RedbStore, RedbStoreOptions, Revision, Store};

const CHILD_FILE_ENV: &str = "HIVE_STORE_CRASH_CHILD_FILE";
const CHILD_ROUND_ENV: &str = "HIVE_STORE_CRASH_CHILD_ROUND";
const ROUNDS: usize = 8;
const WRITERS: usize = 8;
/// The child keeps only this many revisions of history, compacting as it goes.
const HISTORY: Revision = 200;

fn value_for(key: &str) -> Bytes {
    Bytes::from(format!("value of {key}"))
}

fn counter_key(writer: usize) -> String {
    format!("/crash/counter/{writer}")
}

/// The writer side; only ever started by `acknowledged_writes_survive_kill_9`.
#[test]
#[ignore = "child process of acknowledged_writes_survive_kill_9, which runs it"]
fn crash_child() {
    let file = std::env::var(CHILD_FILE_ENV)
        .expect("crash_child runs only as the child of acknowledged_writes_survive_kill_9");
    let round: usize = std::env::var(CHILD_ROUND_ENV)
        .expect("round")
        .parse()
        .expect("round number");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(child(PathBuf::from(file), round));
}

async fn child(file: PathBuf, round: usize) {
    let store = Arc::new(RedbStore::open(&file, RedbStoreOptions::default()).expect("open"));
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            for n in 0u64.. {
                let key = format!("/crash/r{round}/w{writer}/{n:06}");
                let scratch = format!("/crash/scratch/{writer}/");
                let mut ops = vec![
                    Op::Create {
                        key: key.clone(),
                        value: value_for(&key),
                    },
                    Op::Put {
                        key: counter_key(writer),
                        value: Bytes::from(format!("{round} {n}")),
                    },
                ];
                // Multi-event revisions too: a few scratch keys, deleted as a prefix now and then.
                if n % 10 == 9 {
                    ops.push(Op::DeletePrefix { prefix: scratch });
                } else {
                    let scratch_key = format!("{scratch}{}", n % 3);
                    ops.push(Op::Put {
                        key: scratch_key,
                        value: Bytes::from_static(b"s"),
                    });
                }
                let revision = store.txn(ops).await.expect("txn").revision;
                println!("ack {revision} {key} {writer} {n}");
            }
        }));
    }
    let compactor = {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(30)).await;
                let current = store.current_revision().await.expect("current revision");
                store
                    .compact(current.saturating_sub(HISTORY))
                    .await
                    .expect("compact");
            }
        })
    };
    tasks.push(compactor);
    // Runs until killed; a task that fails makes the child exit early, which the parent reports.
    for task in tasks {
        task.await.expect("child task");
    }
}

/// One acknowledged write.
struct Ack {
    revision: Revision,
    key: String,
    writer: usize,
    n: u64,
}

fn parse_ack(line: &str) -> Option<Ack> {
    let mut parts = line.strip_prefix("ack ")?.split(' ');
    let ack = Ack {
        revision: parts.next()?.parse().ok()?,
        key: parts.next()?.to_owned(),
        writer: parts.next()?.parse().ok()?,
        n: parts.next()?.parse().ok()?,
    };
    parts.next().is_none().then_some(ack)
}

/// A per-process random number: enough to vary kill times between runs without a dependency.
fn random_u64() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("crash.redb");
    // key -> revision it was created at, for every acknowledged write of every round.
    let mut acked: BTreeMap<String, Revision> = BTreeMap::new();
    // writer -> last acknowledged counter value (round, n).
    let mut counters: BTreeMap<usize, (usize, u64)> = BTreeMap::new();
    let mut seed = random_u64();
    for round in 0..ROUNDS {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let delay = Duration::from_millis(50 + (seed >> 33) % 550);
        let lines = run_child_and_kill(&file, round, delay);
        let mut this_round = 0;
        for line in &lines {
            let Some(ack) = parse_ack(line) else {
                continue;
            };
            this_round += 1;
            acked.insert(ack.key, ack.revision);
            let last = counters.entry(ack.writer).or_insert((round, ack.n));
            *last = (*last).max((round, ack.n));
        }
        assert!(
            this_round > 0,
            "round {round}: the child acknowledged nothing"
        );
        eprintln!(
            "round {round}: killed after {delay:?} past the first ack, {this_round} acks, {} in total",
            acked.len()
        );
        check_integrity(&file, round);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(verify(&file, round, &acked, &counters));
    }
    eprintln!("{ROUNDS} rounds in {:?}", started.elapsed());
}

/// Starts the child, lets it write for `delay` after its first acknowledgement, kills it with
/// SIGKILL and returns the complete lines it printed.
fn run_child_and_kill(file: &Path, round: usize, delay: Duration) -> Vec<String> {
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args([
            "crash_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_FILE_ENV, file)
        .env(CHILD_ROUND_ENV, round.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the child");
    let stdout = child.stdout.take().expect("child stdout");
    let mut stderr = child.stderr.take().expect("child stderr");
    let (line_tx, line_rx) = mpsc::channel::<String>();
    let stdout_reader = std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut lines = Vec::new();
        loop {
            let mut line = Vec::new();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                // A line cut by the kill was never fully printed: not a promise.
                Ok(_) if !line.ends_with(b"\n") => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&line).trim_end().to_owned();
                    let _ = line_tx.send(line.clone());
                    lines.push(line);
                }
            }
        }
        lines
    });
    let stderr_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });

    let deadline = Instant::now() + Duration::from_secs(20);
    let first_ack = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match line_rx.recv_timeout(left) {
            Ok(line) if line.starts_with("ack ") => break true,
            Ok(_) => {}
            Err(_) => break false,
        }
    };
    if first_ack {
        std::thread::sleep(delay);
    }
    let early_exit = child.try_wait().expect("poll the child");
    // Only our own child, by its pid: std sends SIGKILL.
    child.kill().expect("kill the child");
    child.wait().expect("reap the child");
    let lines = stdout_reader.join().expect("stdout reader");
    let stderr = stderr_reader.join().expect("stderr reader");
    assert!(
        first_ack,
        "round {round}: no acknowledgement within 20s; child stderr:\n{stderr}"
    );
    assert!(
        early_exit.is_none(),
        "round {round}: the child exited by itself ({early_exit:?}); child stderr:\n{stderr}"
    );
    lines
}

/// redb's own check of every page checksum of the committed trees.
fn check_integrity(file: &Path, round: usize) {
    let mut db = redb::Database::open(file)
        .unwrap_or_else(|e| panic!("round {round}: redb cannot open the file: {e}"));
    match db.check_integrity() {
        Ok(true) => {}
        Ok(false) => panic!("round {round}: the file was corrupt (redb repaired it)"),
        Err(e) => panic!("round {round}: the file is corrupt: {e}"),
    }
}

async fn verify(
    file: &Path,
    round: usize,
    acked: &BTreeMap<String, Revision>,
    counters: &BTreeMap<usize, (usize, u64)>,
) {
    let store = RedbStore::open(file, RedbStoreOptions::default())
        .unwrap_or_else(|e| panic!("round {round}: reopen: {e}"));
    let current = store.current_revision().await.expect("current revision");
    let compacted = store
        .compacted_revision()
        .await
        .expect("compacted revision");
    assert!(
        compacted <= current,
        "round {round}: compacted {compacted} > current {current}"
    );

    for (key, revision) in acked {
        let kv = store
            .get(key)
            .await
            .expect("get")
            .kv
            .unwrap_or_else(|| panic!("round {round}: acknowledged key {key} is lost"));
        assert_eq!(kv.value, value_for(key), "round {round}: value of {key}");
        assert_eq!(
            (kv.create_revision, kv.mod_revision),
            (*revision, *revision),
            "round {round}: revisions of {key}"
        );
        assert!(
            kv.mod_revision <= current,
            "round {round}: {key} is after current {current}"
        );
    }
    for (writer, (counter_round, n)) in counters {
        let kv = store
            .get(&counter_key(*writer))
            .await
            .expect("get")
            .kv
            .unwrap_or_else(|| panic!("round {round}: counter of writer {writer} is lost"));
        let text = String::from_utf8_lossy(&kv.value).into_owned();
        let parsed: Vec<u64> = text.split(' ').filter_map(|p| p.parse().ok()).collect();
        let [r, m] = parsed[..] else {
            panic!("round {round}: counter of writer {writer} reads {text:?}");
        };
        assert!(
            (r, m) >= (*counter_round as u64, *n),
            "round {round}: counter of writer {writer} went back to {text} from {counter_round} {n}"
        );
        assert!(
            kv.mod_revision <= current,
            "round {round}: counter after current"
        );
    }

    // Every value decodes and none is after the current revision.
    let all = store
        .list("/crash/", None, 0)
        .await
        .expect("list everything");
    let created: usize = all
        .kvs
        .iter()
        .filter(|kv| !kv.key.starts_with("/crash/counter/"))
        .count();
    assert!(
        created >= acked.len(),
        "round {round}: fewer keys than acknowledged"
    );
    assert!(
        all.kvs.iter().all(|kv| kv.mod_revision <= current),
        "round {round}"
    );

    // The store goes on from where it stopped; this write also marks the end of the log.
    let marker = store
        .txn(vec![Op::Put {
            key: "/crash/after".into(),
            value: Bytes::from_static(b"x"),
        }])
        .await
        .expect("write after reopen")
        .revision;
    assert_eq!(
        marker,
        current + 1,
        "round {round}: revisions do not continue"
    );

    // The retained log is complete: every revision after the compacted one has its events,
    // in order, and every acknowledged create in it is there.
    let mut watch = store
        .watch("", compacted)
        .await
        .expect("watch from compacted");
    let mut revisions = BTreeSet::new();
    let mut last = compacted;
    let mut creates = BTreeMap::new();
    while last < marker {
        let event = tokio::time::timeout(Duration::from_secs(20), watch.next())
            .await
            .unwrap_or_else(|_| panic!("round {round}: log ends at {last}, current is {current}"))
            .expect("watch ended")
            .unwrap_or_else(|e| panic!("round {round}: log unreadable after {last}: {e}"));
        assert!(
            event.revision() >= last,
            "round {round}: log out of order at {last}"
        );
        last = event.revision();
        revisions.insert(last);
        if event.kind == EventKind::Put && event.prev.is_none() {
            creates.insert(event.kv.key.clone(), last);
        }
    }
    assert_eq!(
        last, marker,
        "round {round}: log goes past the current revision"
    );
    let expected: BTreeSet<Revision> = (compacted + 1..=marker).collect();
    assert_eq!(
        revisions, expected,
        "round {round}: revisions missing from the log"
    );
    for (key, revision) in acked.iter().filter(|(_, r)| **r > compacted) {
        assert_eq!(
            creates.get(key),
            Some(revision),
            "round {round}: log lacks the create of {key}"
        );
    }
}
