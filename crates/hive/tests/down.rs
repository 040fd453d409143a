//! End to end (root): `hive down` after `hive up` was killed removes everything that node
//! made — containers and their supervisors, root filesystem mounts, cgroups in every
//! hierarchy, network namespaces, links and nftables tables of its prefix — and nothing
//! while an agent holds the data dir.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::{
    Cleanup, HIVE, Killed, Netns, admin_token, alive, busybox_layout, cgroup_dirs, is_spare_veth,
    json, mounts, ok, push_test_image, start_up_in, until,
};
use serde_json::Value;

/// `hive down --data-dir data` in the node's namespace.
fn down(ns: &Netns, data: &Path, extra: &[&str]) -> Output {
    ns.command(HIVE)
        .arg("down")
        .arg("--data-dir")
        .arg(data)
        .args(extra)
        .env("HIVE_CONFIG", data.join("no-cli-config.json"))
        .output()
        .expect("run hive down")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// What of the node's network is in its namespace: netns files, links, nft tables.
fn network_of(ns: &Netns) -> (Vec<String>, Vec<String>, Vec<String>) {
    let p = &ns.prefix;
    let files = std::fs::read_dir("/run/netns")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|f| f.starts_with(&format!("{p}-")) || f.starts_with(&format!("{p}_")))
        .collect();
    let links = ns
        .exec(["ip", "-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| n.starts_with(p.as_str()))
        .collect();
    let tables = ns
        .exec(["nft", "list", "tables"])
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .last()
                .is_some_and(|t| t.starts_with(p.as_str()))
        })
        .map(str::to_owned)
        .collect();
    (files, links, tables)
}

#[test]
fn hive_down_removes_everything_a_killed_hive_up_left_and_refuses_while_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = dir.path().join("cli.json");
    // If the test fails half way: containers, supervisors and mounts go all the same.
    let _cleanup = Cleanup::of(&data);
    let ns = Netns::new();
    let mut up = start_up_in(&ns, &data, &cfg);
    let host = up.url.trim_start_matches("http://").to_owned();
    let layout = busybox_layout(dir.path());
    let image = push_test_image(&ns, &layout, &host, &admin_token(&data), "default/busybox");
    // Two instances on the tenant network, one with a published port (the network's router
    // namespace, its two veths and the node's DNAT table; the node's underlay is loopback,
    // whose MTU no veth takes).
    for (name, publish) in [("web", "18080:80"), ("back", "")] {
        let mut args = vec!["service", "create", name, "--image", &image];
        if !publish.is_empty() {
            args.extend(["-p", publish]);
        }
        args.extend(["--", "sleep", "1000"]);
        ok(&cfg, &args);
    }
    let mut running: Vec<Value> = Vec::new();
    until(90, "2 instances running", || {
        running = json(&cfg, &["instance", "ls"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["status"]["phase"] == "running")
            .cloned()
            .collect();
        running.len() == 2
    });

    // While hive up runs, its data dir is locked: nothing is touched, the holder is named.
    let refused = down(&ns, &data, &[]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused.stdout));
    let err = text(&refused.stderr);
    assert!(
        err.contains("is in use by process") && err.contains(&up.child.id().to_string()),
        "{err}"
    );
    assert_eq!(json(&cfg, &["instance", "ls"]).as_array().unwrap().len(), 2);

    // What the node made, seen before the kill (each must be there for the test to prove
    // anything).
    let mut pids = BTreeSet::new();
    let mut cgroups = Vec::new();
    for i in &running {
        pids.insert(i["status"]["pid"].as_u64().unwrap());
        let started: Value = serde_json::from_slice(
            &std::fs::read(
                data.join("agent/containers")
                    .join(i["uid"].as_str().unwrap())
                    .join("started.json"),
            )
            .unwrap(),
        )
        .unwrap();
        pids.insert(started["shim_pid"].as_u64().unwrap());
        let cg = format!("/hive/default/{}", i["name"].as_str().unwrap());
        assert!(cgroup_dirs(&cg).len() > 1, "{cg}: no cgroups");
        cgroups.push(cg);
    }
    let data_mounts = || -> Vec<PathBuf> {
        mounts()
            .into_iter()
            .map(|(p, _)| p)
            .filter(|p| p.starts_with(&data))
            .collect()
    };
    // Two root filesystems, and the tmpfs mounts of the runtime's and the containers' state
    // and the watch state (beside them, spare root filesystems composed ahead, as many as
    // the agent has made by now).
    let spares = data.join("agent/images/spares");
    let all = data_mounts();
    let (spare, own): (Vec<&PathBuf>, Vec<&PathBuf>) =
        all.iter().partition(|p| p.starts_with(&spares));
    assert_eq!(own.len(), 5, "{all:?}");
    assert!(spare.len() <= 2, "{all:?}");
    for state in ["agent/runtime", "agent/containers", "agent/watch"] {
        let tmpfs = std::fs::canonicalize(&data).unwrap().join(state);
        assert!(
            mounts()
                .iter()
                .any(|(p, fstype)| *p == tmpfs && fstype == "tmpfs"),
            "no tmpfs at {}: {:?}",
            tmpfs.display(),
            data_mounts()
        );
    }
    // A namespace and a port each, the network's bridge and VXLAN device, the node's table;
    // for the published port the router's namespace, its leg and transit veths, the node's
    // DNAT table.
    // Beside them, the veth pairs of spare namespaces (`{prefix}s{n}`), as many as made.
    let is_spare = |l: &String| is_spare_veth(&ns.prefix, l);
    let t0 = std::time::Instant::now();
    loop {
        let (files, mut links, tables) = network_of(&ns);
        links.retain(|l| !is_spare(l));
        if files.len() == 3 && links.len() == 6 && tables.len() == 2 {
            break;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(15),
            "the node's network: {files:?} {links:?} {tables:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    // kill -9 of hive up: by design its containers keep running.
    up.child.kill().unwrap();
    up.child.wait().unwrap();
    assert!(pids.iter().all(|p| alive(*p)), "{pids:?}");
    // The spare namespaces went with the process, their veth pairs with them.
    until(10, "spare veths left after the kill", || {
        !network_of(&ns).1.iter().any(is_spare)
    });

    // A process in a namespace of the prefix that is no container of this node: another node
    // uses the prefix here, so its network is left alone (and said so); the rest goes.
    let foreign = format!("{}-not-this-node", ns.prefix);
    common::run("ip", &["netns", "add", &foreign]);
    let mut squatter = Killed(
        std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{foreign}"))
            .args(["--", "sleep", "600"])
            .spawn()
            .unwrap(),
    );
    until(10, "the squatter in its namespace", || {
        let ours = std::fs::read_link(format!("/proc/{}/ns/net", squatter.0.id()));
        let theirs = std::fs::read_link("/proc/self/ns/net");
        matches!((ours, theirs), (Ok(a), Ok(b)) if a != b)
    });
    let first = down(&ns, &data, &[]);
    let (stdout, stderr) = (text(&first.stdout), text(&first.stderr));
    assert_eq!(first.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains(&format!("/run/netns/{foreign}"))
            && stderr.contains("another node uses the prefix"),
        "{stderr}"
    );
    assert!(!stdout.contains("removed link"), "{stdout}");
    assert_eq!(network_of(&ns).1.len(), 6, "the network was touched");
    // Forced: the network goes too, that namespace's file included.
    let out = down(&ns, &data, &["--force"]);
    squatter.0.kill().unwrap();
    let stdout = format!("{stdout}{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    eprintln!("hive down said:\n{stdout}");
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for said in [
        "stopped container",
        "removed cgroup /hive/default/",
        "removed root filesystem of",
        "removed container",
        "removed link",
        "removed network namespace",
        "removed nftables table",
    ] {
        assert!(stdout.contains(said), "{said:?} missing from:\n{stdout}");
    }
    // Nothing of the node is left.
    let left: Vec<&u64> = pids.iter().filter(|p| alive(**p)).collect();
    assert!(left.is_empty(), "processes left: {left:?}\n{stdout}");
    for cg in &cgroups {
        assert_eq!(cgroup_dirs(cg), Vec::<PathBuf>::new(), "{stdout}");
    }
    assert_eq!(data_mounts(), Vec::<PathBuf>::new(), "{stdout}");
    let empty = Vec::<String>::new();
    assert_eq!(
        network_of(&ns),
        (empty.clone(), empty.clone(), empty),
        "{stdout}"
    );
    assert_eq!(
        std::fs::read_dir(data.join("agent/containers"))
            .unwrap()
            .count(),
        0
    );

    // Again: nothing left to do, and it says so.
    let again = down(&ns, &data, &[]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(
        text(&again.stdout).contains("nothing of the node"),
        "{}",
        text(&again.stdout)
    );
    // Not a node's data dir: refused, naming it.
    let out = down(&ns, dir.path(), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("not an agent data dir"),
        "{}",
        text(&out.stderr)
    );
}

/// A start in flight when the node went (its supervisor has its configuration, the runtime
/// has not returned): `hive down` stops the supervisor and the runtime it runs before it
/// removes the container, which they would otherwise finish starting after the teardown.
/// The supervisor is found by the directory it works in: its configuration came on stdin,
/// its command line names no container.
#[test]
fn hive_down_stops_a_start_in_flight() {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let agent = data.join("agent");
    // If the test fails half way, the supervisor and its runtime go all the same.
    let _cleanup = Cleanup::of(&data);
    let id = "in-flight-0";
    let cdir = agent.join("containers").join(id);
    std::fs::create_dir_all(cdir.join("bundle")).unwrap();
    std::fs::create_dir_all(agent.join("runtime")).unwrap();
    // A runtime that never returns.
    let runtime = dir.path().join("hanging-runtime");
    std::fs::write(&runtime, "#!/bin/sh\nexec sleep 600\n").unwrap();
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = serde_json::json!({
        "id": id,
        "bundle": cdir.join("bundle"),
        "state_dir": cdir,
        "runtime_kind": "runc",
        "runtime_binary": runtime,
        "runtime_root": agent.join("runtime"),
        "cgroups_path": "/hive/down-test/in-flight",
        "log_max_bytes": 4096,
        "log_keep": 1,
    });
    let mut shim = Killed(
        Command::new(HIVE)
            .args(["shim", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("hive shim"),
    );
    let mut stdin = shim.0.stdin.take().unwrap();
    stdin.write_all(config.to_string().as_bytes()).unwrap();
    drop(stdin);
    // The supervisor in the container's directory, the runtime under it.
    let procs = || -> Vec<(i32, i32, String)> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter_map(|pid| {
                let ppid = common::parent_of(pid as u64)? as i32;
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                Some((
                    pid,
                    ppid,
                    String::from_utf8_lossy(&cmdline).replace('\0', " "),
                ))
            })
            .collect()
    };
    let mut pair = None;
    until(10, "the supervisor running its runtime", || {
        let all = procs();
        let supervisor = all.iter().find(|(pid, _, cmd)| {
            cmd.contains(" shim -")
                && std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|c| c == cdir)
        });
        pair = supervisor.and_then(|(s, _, _)| {
            all.iter()
                .find(|(_, ppid, cmd)| ppid == s && cmd.starts_with("sleep 600"))
                .map(|(r, _, _)| (*s, *r))
        });
        pair.is_some()
    });
    let (supervisor, runtime_pid) = pair.unwrap();

    let out = Command::new(HIVE)
        .arg("down")
        .arg("--data-dir")
        .arg(&data)
        .env("HIVE_CONFIG", data.join("no-cli-config.json"))
        .output()
        .expect("run hive down");
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(
        stdout.contains(&format!(
            "stopped supervisor {supervisor} of container {id}, a start in flight"
        )),
        "{stdout}"
    );
    assert!(
        !alive(supervisor as u64),
        "supervisor {supervisor} left\n{stdout}"
    );
    assert!(
        !alive(runtime_pid as u64),
        "runtime {runtime_pid} left\n{stdout}"
    );
    assert!(!cdir.exists(), "{stdout}");
    // The supervisor's parent saw it die before it answered, and says so.
    let t0 = Instant::now();
    while shim.0.try_wait().unwrap().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the shim's parent lives on"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut said = String::new();
    std::io::Read::read_to_string(&mut shim.0.stderr.take().unwrap(), &mut said).unwrap();
    assert!(said.contains("died before reporting"), "{said}");
}
