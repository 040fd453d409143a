//! Tenant networks end to end (root): a server and three agents, each node a network
//! namespace on a shared underlay bridge; two tenants with the same subnet run a service on
//! all three nodes. Within a tenant instances reach each other across nodes at the full MTU;
//! between tenants not one frame passes, though every address exists in both; a spoofed
//! source MAC is dropped; scaled to zero, every port, namespace and bridge is gone.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{hive, is_spare_veth, json, ok, until};
use serde_json::Value;

fn instances(cfg: &Path, tenant: &str) -> Vec<Value> {
    json(cfg, &["--tenant", tenant, "instance", "ls"])
        .as_array()
        .unwrap()
        .clone()
}

/// A command inside the network namespace of the process `pid` (the host's tools, the
/// container's network).
fn in_container(pid: u64, argv: &[&str]) -> Command {
    let mut c = Command::new("nsenter");
    c.args(["-t", &pid.to_string(), "-n", "--"]).args(argv);
    c
}

/// Echo replies to `count` pings from `pid` to `ip` (extra ping flags in `flags`).
fn pings(pid: u64, ip: &str, count: u32, flags: &[&str]) -> u32 {
    let n = count.to_string();
    let mut argv = vec!["ping", "-q", "-n", "-c", &n, "-i", "0.2", "-W", "1"];
    argv.extend(flags);
    argv.push(ip);
    let out = in_container(pid, &argv)
        .output()
        .expect("ping (iputils-ping)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(',')
        .find_map(|f| f.trim().strip_suffix(" received"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Captures ICMP echo requests carrying `pattern` inside `pid`'s network while `act` runs;
/// returns how many arrived.
fn captured_while(pid: u64, pattern: &str, act: impl FnOnce()) -> usize {
    // The payload pattern sits at the start of the ICMP data (after the 8-byte timestamp
    // ping puts first): match its first 4 bytes at offset 24 of the ICMP header (8 of header, 16 of timestamp).
    let filter = format!(
        "icmp[icmptype] == icmp-echo and icmp[24:4] == 0x{}",
        &pattern[..8]
    );
    let mut cap = in_container(
        pid,
        &["tcpdump", "-i", "any", "-nn", "-l", "-Q", "in", &filter],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .expect("tcpdump");
    std::thread::sleep(Duration::from_millis(800));
    act();
    std::thread::sleep(Duration::from_millis(300));
    let _ = cap.kill();
    let out = cap.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[test]
fn two_tenants_with_one_subnet_on_three_nodes_are_connected_and_isolated() {
    let dir = tempfile::tempdir().unwrap();
    let tt = common::TwoTenants::start(dir.path(), 3);
    let (cfg, cluster, host) = (&tt.cfg, &tt.cluster, &tt.host);
    // Both tenants' default networks are 10.88.0.0/16, on different VNIs.
    let vni = |t: &str| {
        json(cfg, &["--tenant", t, "network", "ls"])[0]["status"]["vni"]
            .as_u64()
            .unwrap()
    };
    assert_ne!(vni("red"), vni("blue"));
    for t in ["red", "blue"] {
        // Red's instances are shaped: 100 Mbit/s guaranteed, 400 at most, 5000 small
        // frames a second.
        let shaped: &[&str] = match t {
            "red" => &["--bandwidth", "100M:400M", "--pps", "5000"],
            _ => &[],
        };
        let mut args = vec!["--tenant", t, "service", "create", "web", "--image"];
        let image = format!("{host}/{t}/busybox:test");
        args.push(&image);
        args.extend(["--replicas", "3"]);
        args.extend(shaped);
        args.extend(["--", "sleep", "100000"]);
        ok(cfg, &args);
    }
    // (node, ip, pid) of each tenant's running instances, once all six run on all nodes.
    let placed = |t: &str| -> Vec<(String, String, u64)> {
        let mut v: Vec<_> = instances(cfg, t)
            .iter()
            .filter(|i| i["status"]["phase"] == "running" && i["status"]["ip"].is_string())
            .map(|i| {
                (
                    i["spec"]["node"].as_str().unwrap().to_owned(),
                    i["status"]["ip"].as_str().unwrap().to_owned(),
                    i["status"]["pid"].as_u64().unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let t0 = Instant::now();
    let (red, blue) = loop {
        let (r, b) = (placed("red"), placed("blue"));
        let spread = |v: &[(String, String, u64)]| {
            v.iter()
                .map(|x| &x.0)
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                == 3
        };
        if r.len() == 3 && b.len() == 3 && spread(&r) && spread(&b) {
            break (r, b);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "not all running with addresses: red {r:?} blue {b:?}\n{:#?}",
            instances(cfg, "red")
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // Each node's uplink has one HTB class for its red instance (none for blue's), and the
    // red port's chain carries the packet rate limit.
    for i in 1..=3 {
        let (ns, _) = cluster.node(&format!("n{i}"));
        let classes = ns.exec(["tc", "class", "show", "dev", "ul"]);
        assert_eq!(
            classes.matches("rate 100Mbit ceil 400Mbit").count(),
            1,
            "n{i}: {classes}"
        );
        let table = ns.exec(["nft", "list", "ruleset"]);
        assert_eq!(
            table.matches("limit rate over 5000/second").count(),
            1,
            "n{i}: {table}"
        );
    }
    // Addresses come from the same pool in both tenants: they overlap.
    let ips = |v: &[(String, String, u64)]| -> Vec<String> {
        let mut i: Vec<String> = v.iter().map(|x| x.1.clone()).collect();
        i.sort();
        i
    };
    assert_eq!(
        ips(&red),
        ips(&blue),
        "both tenants hold the same addresses"
    );

    for (name, t) in [("red", &red), ("blue", &blue)] {
        let (a, b, c) = (&t[0], &t[1], &t[2]);
        for (from, to) in [(a, b), (b, c), (c, a)] {
            // Across nodes, and at the full overlay MTU with DF set (1450 - 28 = 1422).
            assert_eq!(
                pings(from.2, &to.1, 3, &[]),
                3,
                "{name}: {from:?} -> {to:?}"
            );
            assert_eq!(
                pings(from.2, &to.1, 2, &["-M", "do", "-s", "1422"]),
                2,
                "{name}: DF 1422 {from:?} -> {to:?}"
            );
        }
        // One byte more than the MTU does not fit and is not fragmented.
        assert_eq!(pings(a.2, &b.1, 1, &["-M", "do", "-s", "1423"]), 0);
    }

    // Isolation: red pings each of its own addresses with a marked payload; red's instance
    // with that address sees the pings, blue's instance with the same address sees none.
    let pattern = "c0ffee00c0ffee00";
    let from = &red[0];
    for target in &red[1..] {
        let twin = blue.iter().find(|x| x.1 == target.1).unwrap();
        let mut in_red = 0;
        let in_blue = captured_while(twin.2, pattern, || {
            in_red = captured_while(target.2, pattern, || {
                pings(from.2, &target.1, 3, &["-p", pattern]);
            });
        });
        assert!(in_red >= 3, "red's {target:?} saw {in_red} of 3 pings");
        assert_eq!(in_blue, 0, "blue's {twin:?} saw red's pings");
    }

    // A spoofed source MAC gets nowhere; the real one works again after.
    let (a, b) = (&red[0], &red[1]);
    let link = String::from_utf8(
        in_container(a.2, &["ip", "-o", "link", "show", "eth0"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let mac = link
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .expect("eth0 has a MAC")
        .to_owned();
    let set_mac = |m: &str| {
        let s = in_container(a.2, &["ip", "link", "set", "eth0", "address", m])
            .status()
            .unwrap();
        assert!(s.success());
    };
    in_container(a.2, &["ip", "neigh", "flush", "all"])
        .status()
        .unwrap();
    set_mac("02:66:66:66:66:66");
    assert_eq!(pings(a.2, &b.1, 3, &[]), 0, "spoofed MAC got through");
    set_mac(&mac);
    assert_eq!(pings(a.2, &b.1, 3, &[]), 3);

    // Security groups: `guarded` takes TCP 8081 from the instances of group `friends` only;
    // changed live to take it from anyone; a group still in use is not deleted.
    let red_cli = |args: &[&str]| {
        let mut a = vec!["--tenant", "red"];
        a.extend_from_slice(args);
        ok(cfg, &a)
    };
    let image = format!("{host}/red/busybox:test");
    let out = hive(
        cfg,
        &[
            "--tenant",
            "red",
            "secgroup",
            "create",
            "guard",
            "--allow",
            "tcp/8081@friends",
        ],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not found"),
        "a rule naming a missing group: {out:?}"
    );
    red_cli(&["secgroup", "create", "friends"]);
    red_cli(&["secgroup", "create", "guard", "--allow", "tcp/8081@friends"]);
    for (svc, group) in [("guarded", "guard"), ("friend", "friends")] {
        red_cli(&[
            "service",
            "create",
            svc,
            "--image",
            &image,
            "--security-group",
            group,
            "--",
            "sleep",
            "100000",
        ]);
    }
    let running = |svc: &str| -> Option<(String, u64)> {
        instances(cfg, "red").iter().find_map(|i| {
            (i["spec"]["service"] == svc && i["status"]["phase"] == "running")
                .then(|| {
                    Some((
                        i["status"]["ip"].as_str()?.to_owned(),
                        i["status"]["pid"].as_u64()?,
                    ))
                })
                .flatten()
        })
    };
    until(60, "guarded and friend running", || {
        running("guarded").is_some() && running("friend").is_some()
    });
    let ((gip, gpid), (_, fpid)) = (running("guarded").unwrap(), running("friend").unwrap());
    let mut httpd = in_container(gpid, &["busybox", "httpd", "-f", "-p", "8081", "-h", "/"])
        .spawn()
        .expect("busybox httpd");
    let reaches = |pid: u64| {
        in_container(pid, &["curl", "-s", "-o", "/dev/null", "--max-time", "2"])
            .arg(format!("http://{gip}:8081/"))
            .status()
            .unwrap()
            .success()
    };
    let stranger = red[0].2;
    until(10, "a friend reaches guarded", || reaches(fpid));
    assert!(!reaches(stranger), "a stranger reached guarded");
    assert_eq!(pings(stranger, &gip, 1, &[]), 0, "no icmp rule");
    let t0 = Instant::now();
    red_cli(&["secgroup", "set", "guard", "--allow", "tcp/8081@0.0.0.0/0"]);
    until(10, "the changed rule lets the stranger in", || {
        reaches(stranger)
    });
    eprintln!("security group change in force after {:?}", t0.elapsed());
    let out = hive(cfg, &["--tenant", "red", "secgroup", "rm", "friends"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("still used"),
        "deleting a group in use: {out:?}"
    );
    let _ = httpd.kill();
    let _ = httpd.wait();
    red_cli(&["rm", "guarded", "friend"]);

    // Published ports: each tenant serves HTTP on a node port; a client in another node's
    // namespace reaches it through the node's underlay address, and the server sees the
    // client's own address.
    let mut served = Vec::new();
    for (t, node_port) in [("red", "8080"), ("blue", "8081")] {
        ok(
            cfg,
            &[
                "--tenant",
                t,
                "service",
                "create",
                "www",
                "--image",
                &format!("{host}/{t}/busybox:test"),
                "-p",
                &format!("{node_port}:80"),
                "--",
                "sh",
                "-c",
                &format!(
                    "busybox mkdir -p /www && echo hello-{t} >/www/index.html && \
                     exec busybox httpd -f -vv -p 80 -h /www"
                ),
            ],
        );
        served.push((t, node_port));
    }
    for (t, node_port) in &served {
        let t0 = Instant::now();
        let (node, pid) = loop {
            let i = instances(cfg, t)
                .into_iter()
                .find(|i| i["spec"]["service"] == "www" && i["status"]["phase"] == "running");
            if let Some(i) = i {
                break (
                    i["spec"]["node"].as_str().unwrap().to_owned(),
                    i["status"]["pid"].as_u64().unwrap(),
                );
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "{t}: www not running"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        let (node_ns, node_ip) = cluster.node(&node);
        let client = if node == "n1" { "n2" } else { "n1" };
        let (client_ns, client_ip) = cluster.node(client);
        // From another node to this one's address, and on the node itself at 127.0.0.1.
        for (from, ns, host) in [
            (client, &client_ns, &*node_ip),
            (&*node, &node_ns, "127.0.0.1"),
        ] {
            let url = format!("http://{host}:{node_port}/");
            until(20, &format!("{t}: {url} from {from}"), || {
                let out = ns
                    .command("curl")
                    .args(["-sS", "--max-time", "2", &url])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout).trim() == format!("hello-{t}")
            });
        }
        // busybox httpd -vv logs each request's peer address.
        until(
            10,
            &format!("{t}: the client's address in the server's log"),
            || ok(cfg, &["--tenant", t, "logs", "www"]).contains(&client_ip),
        );
        // The instance reaches neither the node's own address nor the other node's.
        for target in [&node_ip, &client_ip] {
            let out = in_container(
                pid,
                &[
                    "curl",
                    "-sS",
                    "--max-time",
                    "2",
                    &format!("http://{target}:7/"),
                ],
            )
            .output()
            .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && !err.contains("refused"),
                "{t}: instance reached {target}: {err}"
            );
        }
    }

    // Scaled to zero: every port, namespace, router and network is gone from every node.
    for t in ["red", "blue"] {
        ok(cfg, &["--tenant", t, "scale", "web", "0"]);
        ok(cfg, &["--tenant", t, "scale", "www", "0"]);
    }
    until(60, "ports, namespaces or networks left behind", || {
        (1..=3).all(|i| {
            let (ns, _) = cluster.node(&format!("n{i}"));
            let links = ns.exec(["ip", "-o", "link", "show"]);
            let ours = links
                .lines()
                .filter_map(|l| l.split(": ").nth(1))
                .map(|n| n.split('@').next().unwrap_or(n))
                // The spare namespaces' veths stay while the agent runs.
                .filter(|n| n.starts_with(&ns.prefix) && !is_spare_veth(&ns.prefix, n))
                .count();
            let files = std::fs::read_dir("/run/netns")
                .unwrap()
                .flatten()
                .filter(|e| {
                    let f = e.file_name().to_string_lossy().into_owned();
                    f.starts_with(&format!("{}-", ns.prefix))
                        || f.starts_with(&format!("{}_", ns.prefix))
                })
                .count();
            let tables = ns.exec(["nft", "list", "tables"]);
            let tables_left = tables.contains(&format!("{}pub", ns.prefix));
            // Only the uplink's link and default classes remain.
            let classes = ns
                .exec(["tc", "class", "show", "dev", "ul"])
                .lines()
                .count();
            ours == 0 && files == 0 && !tables_left && classes <= 2
        })
    });
    drop(tt);
}
