//! End to end: the real `hive` binary. `hive up` serves on a free port with its own data dir
//! and CLI config; the CLI verbs run against it as a user would; `kill -9` and a restart lose
//! nothing that was acknowledged.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::{Cleanup, Killed, Up, fails, hive, json, names, ok, start_up};

#[test]
fn up_then_the_cli_manages_tenants_tokens_and_services_and_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let admin_cfg: PathBuf = dir.path().join("admin.json");
    let user_cfg: PathBuf = dir.path().join("user.json");
    let _cleanup = [
        Cleanup::of(&data),
        Cleanup {
            agent_dir: dir.path().join("extra-agent"),
        },
    ];
    let up = start_up(&data, &admin_cfg);

    // `hive up` logged the CLI in as the platform admin, tenant "default".
    let who = json(&admin_cfg, &["whoami"]);
    assert_eq!(who["role"], "platform-admin");
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    assert!(token.starts_with("hive_"));
    ok(&admin_cfg, &["tenant", "create", "acme"]);
    assert_eq!(
        names(&json(&admin_cfg, &["tenant", "ls"])),
        ["acme", "default"]
    );
    // Quotas: set at creation, changed, removed; bad quantities are refused.
    let q = json(
        &admin_cfg,
        &["tenant", "create", "quota-t", "--registry-quota", "2Mi"],
    );
    assert_eq!(q["quota"]["registry_bytes"], 2 << 20);
    let q = json(
        &admin_cfg,
        &["tenant", "quota", "quota-t", "--registry", "1G"],
    );
    assert_eq!(q["quota"]["registry_bytes"], 1_000_000_000u64);
    let q = json(
        &admin_cfg,
        &["tenant", "quota", "quota-t", "--registry", "none"],
    );
    assert!(q.get("quota").is_none(), "{q}");
    let out = hive(
        &admin_cfg,
        &["tenant", "quota", "quota-t", "--registry", "lots"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("quantity \"lots\""),
        "{err}"
    );
    ok(&admin_cfg, &["tenant", "rm", "quota-t"]);
    let nodes = json(&admin_cfg, &["node", "ls"]);
    assert_eq!(nodes.as_array().unwrap().len(), 1);
    assert!(
        nodes[0]["status"]["capacity"]["cpu_millis"]
            .as_u64()
            .unwrap()
            >= 1000
    );
    assert_eq!(nodes[0]["status"]["ready"], true);
    assert_eq!(nodes[0]["status"]["runtime"], "crun");
    assert!(nodes[0]["status"]["lease_renewed_at"].is_string());

    // `hive agent` registers another node and keeps its lease.
    let mut agent = Up {
        child: common::hive_command(&admin_cfg)
            .args([
                "agent",
                "--name",
                "extra-node",
                "--net-prefix",
                &common::unique_prefix(),
            ])
            .args(["--data-dir"])
            .arg(dir.path().join("extra-agent"))
            .env("HIVE_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        url: String::new(),
        netns: None,
    };
    let t0 = Instant::now();
    loop {
        let nodes = json(&admin_cfg, &["node", "ls"]);
        // Registration is a create then a status write: wait for both.
        let registered = nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == "extra-node")
            .cloned();
        if registered.as_ref().is_some_and(|n| {
            n["status"]["ready"] == true && n["status"]["lease_renewed_at"].is_string()
        }) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "hive agent did not register and report ready: {registered:?}"
        );
        assert!(
            agent.child.try_wait().unwrap().is_none(),
            "hive agent exited"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(agent);

    // A tenant admin token, used through `hive login` like a tenant would.
    let secret = ok(
        &admin_cfg,
        &[
            "--tenant",
            "acme",
            "token",
            "create",
            "--name",
            "dev",
            "--role",
            "tenant-admin",
        ],
    );
    let secret = secret.trim();
    ok(
        &user_cfg,
        &["login", "--server", &up.url, "--token", secret],
    );
    let who = json(&user_cfg, &["whoami"]);
    assert_eq!(
        (who["tenant"].as_str(), who["role"].as_str()),
        (Some("acme"), Some("tenant-admin"))
    );

    ok(
        &user_cfg,
        &[
            "service",
            "create",
            "web",
            "--image",
            // On loopback with nothing listening: the agent's pull fails at once and the
            // instances stay pending; no traffic leaves the machine.
            "127.0.0.1:9/acme/busybox:v1",
            "--replicas",
            "2",
            "-e",
            "A=1",
            "-p",
            "8080:80",
            "--memory",
            "64Mi",
            "--priority",
            "-5",
            "--",
            "httpd",
            "-f",
        ],
    );
    let svc = json(&user_cfg, &["service", "get", "web"]);
    assert_eq!(svc["spec"]["replicas"], 2);
    assert_eq!(svc["spec"]["template"]["priority"], -5);
    assert_eq!(
        svc["spec"]["template"]["args"],
        serde_json::json!(["httpd", "-f"])
    );
    assert_eq!(
        svc["spec"]["template"]["resources"]["limits"]["memory_bytes"],
        64 << 20
    );
    ok(&user_cfg, &["scale", "web", "5"]);
    let yaml = ok(&user_cfg, &["service", "get", "web", "-o", "yaml"]);
    assert!(yaml.contains("replicas: 5"), "{yaml}");
    // The service controller keeps instances at the replica count.
    let t0 = Instant::now();
    loop {
        let inst = json(&user_cfg, &["instance", "ls"]);
        if inst.as_array().unwrap().len() == 5 {
            // Each carries the template's priority, which orders it in the scheduler.
            for i in inst.as_array().unwrap() {
                assert_eq!(i["spec"]["template"]["priority"], -5, "{i}");
            }
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "5 instances expected: {inst}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let table = ok(&user_cfg, &["service", "ls"]);
    assert!(
        table.starts_with("NAME") && table.contains("web") && table.contains("0/5"),
        "{table}"
    );
    let inst_table = ok(&user_cfg, &["instance", "ls"]);
    assert!(
        inst_table.starts_with("NAME")
            && inst_table.contains("web-")
            && inst_table.contains("pending"),
        "{inst_table}"
    );
    let events = json(&user_cfg, &["events"]);
    // About the service (the scheduler's words are about its instances).
    let reasons: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["object"]["kind"] == "service")
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    // The users' changes, and the controller's word that the image never starts.
    let users: Vec<&str> = reasons
        .iter()
        .copied()
        .filter(|r| *r != "RolloutStalled")
        .collect();
    assert_eq!(users, ["Created", "Scaled"], "{reasons:?}");

    // Errors: one line, exit code 1, the server's message.
    let grace_dir = tempfile::tempdir().unwrap();
    fails(
        &user_cfg,
        &[
            "server",
            "--node-grace-secs",
            "3",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            grace_dir.path().to_str().unwrap(),
        ],
        "must be longer than the agents' lease renewal",
    );
    fails(
        &user_cfg,
        &["service", "get", "nope"],
        "service \"nope\" not found in tenant \"acme\"",
    );
    fails(
        &user_cfg,
        &["service", "create", "Bad", "--image", "busybox"],
        "name: \"Bad\" must be lower case",
    );
    fails(
        &user_cfg,
        &["--tenant", "default", "service", "ls"],
        "tenant \"default\" not found",
    );
    fails(
        &user_cfg,
        &["tenant", "create", "evil"],
        "may not create tenants",
    );
    // Argument errors are usage errors: exit 2, naming the bad value.
    for (args, expect) in [
        (
            &[
                "service", "create", "x", "--image", "busybox", "--memory", "lots",
            ][..],
            "memory quantity \"lots\"",
        ),
        (
            &[
                "service",
                "create",
                "x",
                "--image",
                "busybox",
                "--restart",
                "sometimes",
            ],
            "restart policy \"sometimes\"",
        ),
        (&["service", "create"], "required"),
        (
            &[
                "service",
                "create",
                "x",
                "--image",
                "busybox",
                "--priority",
                "1001",
            ],
            "priority \"1001\": expected a whole number from -1000 to 1000",
        ),
    ] {
        let out = hive(&user_cfg, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(expect),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    fails(
        &user_cfg,
        &[
            "service", "create", "x", "--image", "busybox", "-p", "99999",
        ],
        "port \"99999\"",
    );

    // kill -9 and restart on the same data dir: everything acknowledged is there.
    let pid = up.child.id();
    let up_netns = up.netns.clone();
    drop(up);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(" Z ")
    );
    let up2 = common::start_up_in(up_netns.as_ref().unwrap(), &data, &admin_cfg);
    let svc = serde_json::from_str::<Value>(&ok(
        &user_cfg,
        &["--server", &up2.url, "service", "get", "web", "-o", "json"],
    ))
    .unwrap();
    assert_eq!(svc["spec"]["replicas"], 5);
    assert_eq!(
        std::fs::read_to_string(data.join("admin.token")).unwrap(),
        token,
        "restart kept the admin token"
    );
    let ls = ok(&admin_cfg, &["--server", &up2.url, "tenant", "ls"]);
    assert!(ls.contains("acme"));
    ok(&admin_cfg, &["--server", &up2.url, "tenant", "rm", "acme"]);
    fails(
        &user_cfg,
        &["--server", &up2.url, "service", "ls"],
        "unknown or revoked",
    );
}

#[test]
fn completions_and_help_work_without_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("none.json");
    let bash = ok(&cfg, &["completions", "bash"]);
    assert!(bash.contains("hive") && bash.contains("service"));
    for cmd in [
        &["--help"][..],
        &["service", "create", "--help"],
        &["up", "--help"],
        &["token", "--help"],
    ] {
        let out = ok(&cfg, cmd);
        assert!(out.contains("Usage:"), "{cmd:?}");
    }
    fails(&cfg, &["service", "ls"], "no server");
    let spec: Value = serde_json::from_str(&ok(&cfg, &["openapi"])).unwrap();
    assert_eq!(spec["info"]["title"], "Hive API");
}

/// The instances' names in a table's first column, under its header.
fn first_column(table: &str) -> Vec<String> {
    let mut lines = table.lines();
    let header = lines.next().unwrap_or_default();
    assert!(header.starts_with("NAME"), "{table}");
    lines
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn ps_lists_the_tenants_instances_as_instance_ls_does() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cli.json");
    let _cleanup = Cleanup::of(&dir.path().join("data"));
    let _up = start_up(&dir.path().join("data"), &cfg);
    // Nothing listens on 127.0.0.1:9: the pulls fail at once and the instances stay pending.
    for (svc, replicas) in [("front", "2"), ("back", "1")] {
        ok(
            &cfg,
            &[
                "service",
                "create",
                svc,
                "--image",
                "127.0.0.1:9/default/busybox:v1",
                "--replicas",
                replicas,
            ],
        );
    }
    common::until(15, "3 instances", || {
        json(&cfg, &["ps"]).as_array().unwrap().len() == 3
    });

    let ps = ok(&cfg, &["ps"]);
    let ls = ok(&cfg, &["instance", "ls"]);
    // The same columns (their widths follow the contents, which the scheduler may change
    // between the two calls: an address assigned widens IP).
    let columns = |t: &str| -> Vec<String> {
        t.lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(columns(&ps), columns(&ls), "{ps}\n{ls}");
    assert!(
        ps.starts_with("NAME") && ps.contains("SERVICE") && ps.contains("PHASE"),
        "{ps}"
    );
    assert_eq!(first_column(&ps), first_column(&ls));
    assert_eq!(
        names(&json(&cfg, &["ps"])),
        names(&json(&cfg, &["instance", "ls"]))
    );
    let yaml: Value = yaml_serde::from_str(&ok(&cfg, &["ps", "-o", "yaml"])).unwrap();
    assert_eq!(names(&yaml), names(&json(&cfg, &["ps"])));

    // One service's instances only, in every format.
    let front = json(&cfg, &["ps", "--service", "front"]);
    let front = front.as_array().unwrap();
    assert_eq!(front.len(), 2, "{front:?}");
    assert!(front.iter().all(|i| i["spec"]["service"] == "front"));
    let back = first_column(&ok(&cfg, &["ps", "-s", "back"]));
    assert_eq!(back.len(), 1);
    assert!(back[0].starts_with("back-"), "{back:?}");
    assert_eq!(
        names(&json(&cfg, &["instance", "ls", "--service", "back"])),
        back
    );
    // A service that does not exist is an error naming it, not an empty list.
    fails(
        &cfg,
        &["ps", "--service", "nope"],
        "service \"nope\" not found in tenant \"default\"",
    );
}

#[test]
fn rm_removes_every_service_that_exists_and_names_each_that_failed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cli.json");
    let _cleanup = Cleanup::of(&dir.path().join("data"));
    let _up = start_up(&dir.path().join("data"), &cfg);
    for svc in ["w1", "w2", "w3"] {
        ok(
            &cfg,
            &[
                "service",
                "create",
                svc,
                "--image",
                "127.0.0.1:9/default/busybox:v1",
            ],
        );
    }
    common::until(15, "3 instances", || {
        json(&cfg, &["ps"]).as_array().unwrap().len() == 3
    });

    // The first name is missing: the others are removed all the same.
    let out = hive(&cfg, &["rm", "w0", "w1", "nope", "w2"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert_eq!(stdout, "w1 removed\nw2 removed\n", "{stderr}");
    let errors: Vec<&str> = stderr.lines().collect();
    assert_eq!(errors.len(), 2, "{stderr}");
    for (line, name) in errors.iter().zip(["w0", "nope"]) {
        assert!(
            line.starts_with(&format!("error: remove service {name}: "))
                && line.contains(&format!("service \"{name}\" not found")),
            "{stderr}"
        );
    }
    assert_eq!(names(&json(&cfg, &["service", "ls"])), ["w3"]);
    let left = json(&cfg, &["ps"]);
    let left = left.as_array().unwrap();
    assert!(
        left.len() == 1 && left[0]["spec"]["service"] == "w3",
        "{left:?}"
    );

    // Every name failing fails too; every name removed succeeds.
    let out = hive(&cfg, &["rm", "w1", "w2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 2);
    assert_eq!(ok(&cfg, &["rm", "w3"]), "w3 removed\n");
    assert!(json(&cfg, &["ps"]).as_array().unwrap().is_empty());
}

/// A port a program of the node listens on is never published there (a published port
/// would take its connections: the API server's, sshd's): the agent reports it in the
/// node's status and an instance publishing it waits, saying why.
#[test]
fn a_port_the_host_listens_on_is_never_published_and_the_instance_waits() {
    let dir = tempfile::tempdir().unwrap();
    let (data, cfg) = (dir.path().join("data"), dir.path().join("admin.json"));
    let _cleanup = Cleanup::of(&data);
    let ns = common::Netns::new();
    // The host's program, in the node's namespace before its agent registers.
    let port = "7443";
    let listener = Killed(
        ns.command("busybox")
            .args(["nc", "-ll", "-p", port, "-e", "true"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("busybox-static installed"),
    );
    let t0 = Instant::now();
    // On the IPv6 wildcard (busybox), or IPv4's.
    let listens = |file| {
        std::fs::read_to_string(format!("/proc/{}/net/{file}", listener.0.id()))
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains(":1D13 ") && l.split_whitespace().nth(3) == Some("0A"))
    };
    while !listens("tcp") && !listens("tcp6") {
        assert!(t0.elapsed() < Duration::from_secs(5), "nc never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _up = common::start_up_in(&ns, &data, &cfg);
    let node = &json(&cfg, &["node", "ls"])[0];
    let listening = node["status"]["listening"].as_array().unwrap();
    assert!(
        listening.contains(&serde_json::json!({"protocol": "tcp", "port": 7443})),
        "{node}"
    );
    ok(
        &cfg,
        &[
            "service",
            "create",
            "web",
            "--image",
            "127.0.0.1:9/default/busybox:v1",
            "-p",
            &format!("{port}:80"),
        ],
    );
    let t0 = Instant::now();
    loop {
        let inst = json(&cfg, &["instance", "ls"]);
        let first = &inst[0];
        if first["status"]["message"] == "0/1 nodes available: 1 node port taken by the host" {
            assert!(first["spec"]["node"].is_null(), "{first}");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "{inst}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The same number over UDP is free: that service is placed.
    ok(
        &cfg,
        &[
            "service",
            "create",
            "dns",
            "--image",
            "127.0.0.1:9/default/busybox:v1",
            "-p",
            &format!("{port}:53/udp"),
        ],
    );
    let t0 = Instant::now();
    while !json(&cfg, &["instance", "ls"])
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["spec"]["service"] == "dns" && i["spec"]["node"].is_string())
    {
        assert!(t0.elapsed() < Duration::from_secs(15), "dns never placed");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(listener);
}

/// A program of the node that starts listening on a port already published takes it back
/// (the agent checks the node's listeners at every pass), and the instance gets it again
/// once the program is gone; the instance runs on throughout.
#[test]
fn a_host_listener_newer_than_a_published_port_takes_it_back_until_it_goes() {
    let dir = tempfile::tempdir().unwrap();
    let (data, cfg) = (dir.path().join("data"), dir.path().join("admin.json"));
    let _cleanup = Cleanup::of(&data);
    let ns = common::Netns::new();
    let up = common::start_up_in(&ns, &data, &cfg);
    let host = up.url.trim_start_matches("http://").to_owned();
    let layout = common::busybox_layout(dir.path());
    let image = common::push_test_image(
        &ns,
        &layout,
        &host,
        &common::admin_token(&data),
        "default/busybox",
    );
    let port = "7445";
    ok(
        &cfg,
        &[
            "service",
            "create",
            "web",
            "--image",
            &image,
            "-p",
            &format!("{port}:80"),
            "--",
            "sh",
            "-c",
            "mkdir -p /www && echo from-instance >/www/index.html && exec httpd -f -p 80 -h /www",
        ],
    );
    // What answers at the node's 127.0.0.1:port (the host's program speaks no HTTP).
    let answer = || {
        let out = ns
            .command("curl")
            .args(["-sS", "--http0.9", "--max-time", "2"])
            .arg(format!("http://127.0.0.1:{port}/"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    common::until(90, "the instance answers at its published port", || {
        answer() == "from-instance"
    });
    let running = || json(&cfg, &["instance", "ls"])[0]["status"].clone();
    let before = running();
    assert_eq!(before["phase"], "running", "{before}");

    let listener = Killed(
        ns.command("busybox")
            .args(["nc", "-ll", "-p", port, "-e", "echo", "from-host"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("busybox-static installed"),
    );
    common::until(10, "the host's program gets its port", || {
        answer() == "from-host"
    });
    // The node reports it, so the scheduler places no other instance publishing it here.
    common::until(15, "the node lists the port", || {
        json(&cfg, &["node", "ls"])[0]["status"]["listening"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!({"protocol": "tcp", "port": 7445}))
    });
    drop(listener);
    common::until(10, "the instance gets its port back", || {
        answer() == "from-instance"
    });
    let after = running();
    assert_eq!(after["phase"], "running", "{after}");
    assert_eq!(after["container_id"], before["container_id"], "{after}");
    assert_eq!(after["restarts"], before["restarts"], "{after}");
    drop(up);
}
