//! End to end on one machine (root): `hive up` with its agent; an image built locally with
//! umoci from busybox-static and pushed with skopeo into Hive's own registry; a service that
//! runs it as a real container, reported Running with its pid; scaled to zero, the container,
//! its cgroup and its root filesystem are gone.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Up, json, ok, start_up};
use serde_json::Value;

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e} (install it: scripts/deps.sh)"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An OCI layout with image `test`: busybox-static and a few applets, one layer.
fn busybox_layout(dir: &Path) -> PathBuf {
    let layout = dir.join("oci");
    let l = layout.to_str().unwrap();
    let image = format!("{l}:test");
    run("umoci", &["init", "--layout", l]);
    run("umoci", &["new", "--image", &image]);
    run(
        "umoci",
        &[
            "config",
            "--image",
            &image,
            "--config.cmd",
            "/bin/sh",
            "--architecture",
            "amd64",
            "--os",
            "linux",
        ],
    );
    let bundle = dir.join("bundle");
    run(
        "umoci",
        &["unpack", "--image", &image, bundle.to_str().unwrap()],
    );
    let bin = bundle.join("rootfs/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).expect("busybox-static installed");
    for a in ["sh", "echo", "sleep"] {
        std::os::unix::fs::symlink("busybox", bin.join(a)).unwrap();
    }
    run(
        "umoci",
        &["repack", "--image", &image, bundle.to_str().unwrap()],
    );
    layout
}

/// Removes whatever the agent left if the test failed half way: containers, mounts, supervisors.
struct Cleanup {
    agent_dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let containers = self.agent_dir.join("containers");
        for e in std::fs::read_dir(&containers)
            .into_iter()
            .flatten()
            .flatten()
        {
            let id = e.file_name().to_string_lossy().into_owned();
            let _ = Command::new("runc")
                .arg("--root")
                .arg(self.agent_dir.join("runtime"))
                .args(["delete", "--force", &id])
                .output();
        }
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let dir = self.agent_dir.to_string_lossy().into_owned();
        for m in mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| m.starts_with(&dir))
        {
            let _ = Command::new("umount").args(["-l", m]).output();
        }
    }
}

fn instances(cfg: &Path) -> Vec<Value> {
    json(cfg, &["instance", "ls"]).as_array().unwrap().clone()
}

#[test]
fn a_service_runs_as_a_real_container_and_scaling_to_zero_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = dir.path().join("cli.json");
    let _cleanup = Cleanup {
        agent_dir: data.join("agent"),
    };
    let up: Up = start_up(&data, &cfg);
    let host = up.url.trim_start_matches("http://").to_owned();
    let token = std::fs::read_to_string(data.join("admin.token"))
        .unwrap()
        .trim()
        .to_owned();

    let layout = busybox_layout(dir.path());
    run(
        "skopeo",
        &[
            "copy",
            "--dest-tls-verify=false",
            "--dest-creds",
            &format!("hive:{token}"),
            &format!("oci:{}:test", layout.display()),
            &format!("docker://{host}/default/busybox:test"),
        ],
    );
    let image = format!("{host}/default/busybox:test");
    ok(
        &cfg,
        &[
            "service",
            "create",
            "web",
            "--image",
            &image,
            "--",
            "sh",
            "-c",
            "echo hello from hive; exec sleep 1000",
        ],
    );

    let t0 = Instant::now();
    let running = loop {
        let list = instances(&cfg);
        if let Some(i) = list.iter().find(|i| i["status"]["phase"] == "running") {
            break i.clone();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no instance running: {list:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(running["status"]["ready"], true, "{running:#}");
    let pid = running["status"]["pid"].as_u64().unwrap();
    let cmdline =
        std::fs::read(format!("/proc/{pid}/cmdline")).expect("the container's process exists");
    assert!(
        String::from_utf8_lossy(&cmdline).contains("sleep"),
        "{:?}",
        String::from_utf8_lossy(&cmdline)
    );
    let uid = running["uid"].as_str().unwrap();
    assert_eq!(running["status"]["container_id"], uid);
    let log = data
        .join("agent/containers")
        .join(uid)
        .join("container.log");
    let t0 = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("stdout F hello from hive")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no output in {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    ok(&cfg, &["scale", "web", "0"]);
    let agent_dir = data.join("agent").to_string_lossy().into_owned();
    let cgroup =
        Path::new("/sys/fs/cgroup/memory/hive/default/").join(running["name"].as_str().unwrap());
    let t0 = Instant::now();
    loop {
        let left = [
            ("instances", !instances(&cfg).is_empty()),
            ("process", Path::new(&format!("/proc/{pid}")).exists()),
            ("container dir", log.exists()),
            (
                "rootfs mount",
                std::fs::read_to_string("/proc/mounts")
                    .unwrap()
                    .contains(&agent_dir),
            ),
            ("cgroup", cgroup.exists()),
        ];
        let left: Vec<&str> = left.iter().filter(|(_, l)| *l).map(|(w, _)| *w).collect();
        if left.is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "scaled to zero, still there: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(up);
}
