//! Helpers shared by the end-to-end tests: a `hive up` child process and CLI calls.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const HIVE: &str = env!("CARGO_BIN_EXE_hive");

/// A running `hive up`, killed (by PID) when dropped.
pub struct Up {
    pub child: Child,
    pub url: String,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start_up(data: &Path, config: &Path) -> Up {
    let mut cmd = Command::new(HIVE);
    cmd.args(["up", "--login", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .env("HIVE_CONFIG", config);
    start_until(cmd, "hive up: API at ")
}

/// `hive server` alone (controllers included, no node), with `extra` arguments.
pub fn start_server(data: &Path, extra: &[&str]) -> Up {
    let mut cmd = Command::new(HIVE);
    cmd.args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .args(extra);
    start_until(cmd, "hive server: API at ")
}

/// `hive agent` for node `name` with its own data dir, registered with `server`, running
/// every tenant's instances (`--shared`).
pub fn start_agent(server: &str, token: &str, name: &str, data: &Path) -> Up {
    let mut cmd = Command::new(HIVE);
    cmd.args([
        "agent",
        "--shared",
        "--listen",
        "127.0.0.1:0",
        "--name",
        name,
    ])
    .args(["--server", server, "--token", token, "--data-dir"])
    .arg(data)
    .env("HIVE_CONFIG", data.join("no-cli-config.json"));
    start_until(cmd, "hive agent: node ")
}

/// Spawns `cmd` and waits for the stderr line starting with `marker`, whose next word is the
/// URL it serves at.
fn start_until(mut cmd: Command, marker: &str) -> Up {
    let child = cmd
        .env("HIVE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hive");
    // From here on the guard kills and reaps the child on every path, panics included.
    let mut up = Up {
        child,
        url: String::new(),
    };
    let stderr = up.child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            if let Some(rest) = line.strip_prefix(marker) {
                up.url = rest.split_whitespace().next().unwrap().to_owned();
                // Keep draining so the child never blocks on a full pipe.
                std::thread::spawn(move || while rx.recv().is_ok() {});
                return up;
            }
            seen.push(line);
        }
        if let Ok(Some(status)) = up.child.try_wait() {
            panic!("{marker}: hive exited with {status}: {}", seen.join("\n"));
        }
    }
    panic!(
        "hive did not report {marker:?} in 30 s: {}",
        seen.join("\n")
    );
}

pub fn hive(config: &Path, args: &[&str]) -> Output {
    Command::new(HIVE)
        .args(args)
        .env("HIVE_CONFIG", config)
        .env_remove("HIVE_SERVER")
        .env_remove("HIVE_TOKEN")
        .env_remove("HIVE_TENANT")
        .stdin(Stdio::null())
        .output()
        .expect("run hive")
}

pub fn ok(config: &Path, args: &[&str]) -> String {
    let out = hive(config, args);
    assert!(
        out.status.success(),
        "hive {}: {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn json(config: &Path, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    serde_json::from_str(&ok(config, &a)).unwrap()
}

pub fn fails(config: &Path, args: &[&str], expect: &str) {
    let out = hive(config, args);
    assert_eq!(
        out.status.code(),
        Some(1),
        "hive {} should fail",
        args.join(" ")
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("error: ") && err.contains(expect), "{err}");
}

pub fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Polls `done` every 100 ms until it holds; fails with `what` after `secs` seconds.
pub fn until(secs: u64, what: &str, mut done: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < Duration::from_secs(secs), "{what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
