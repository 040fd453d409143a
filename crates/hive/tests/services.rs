//! Service discovery end to end (root): a server and two agents, each node a network
//! namespace. Red runs `web` (two busybox httpd replicas printing their hostname, with a
//! readiness probe) and a client; the client resolves `web` and `web.red.hive` through its
//! node's resolver and reaches both replicas through the VIP; scaled to one, the client's
//! table on its node changes within a second and only the remaining replica answers. Blue's
//! client resolves none of red's names and red's VIP address reaches nothing of red's.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{json, ok, until};
use serde_json::Value;

fn instances(cfg: &Path, tenant: &str) -> Vec<Value> {
    json(cfg, &["--tenant", tenant, "instance", "ls"])
        .as_array()
        .unwrap()
        .clone()
}

/// Busybox inside the container of process `pid` (its network and mount namespaces: its
/// `/etc/resolv.conf`, its `/bin/busybox`).
fn busybox(pid: u64, args: &[&str]) -> (bool, String) {
    let out = Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-n", "-m", "--", "/bin/busybox"])
        .args(args)
        .output()
        .expect("nsenter");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The body of `GET /` from `host` port 80, from inside the container of `pid` (busybox
/// `nc`: the static busybox's `wget` crashes on these hosts).
fn get(pid: u64, host: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-n", "-m", "--", "/bin/busybox"])
        .args(["nc", "-w", "2", host, "80"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("nsenter");
    let _ = child
        .stdin
        .take()
        .unwrap()
        .write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n");
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    match text.split_once("\r\n\r\n") {
        Some((_, body)) => body.trim().to_owned(),
        None => format!("no answer: {}", String::from_utf8_lossy(&out.stderr).trim()),
    }
}

/// A running instance of `service` in `tenant`: (name, node, pid, uid).
fn running(cfg: &Path, tenant: &str, service: &str) -> Vec<(String, String, u64, String)> {
    instances(cfg, tenant)
        .iter()
        .filter(|i| i["spec"]["service"] == service && i["status"]["phase"] == "running")
        .filter(|i| i["status"]["pid"].is_u64())
        .map(|i| {
            (
                i["name"].as_str().unwrap().to_owned(),
                i["spec"]["node"].as_str().unwrap().to_owned(),
                i["status"]["pid"].as_u64().unwrap(),
                i["uid"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn services_resolve_and_balance_within_their_tenant_only() {
    let dir = tempfile::tempdir().unwrap();
    let tt = common::TwoTenants::start(dir.path(), 2);
    let (cfg, cluster, host) = (&tt.cfg, &tt.cluster, &tt.host);
    let image = |t: &str| format!("{host}/{t}/busybox:test");
    let create = |t: &str, name: &str, extra: &[&str], cmd: &str| {
        let img = image(t);
        let mut args = vec!["--tenant", t, "service", "create", name, "--image", &img];
        args.extend(extra);
        args.extend(["--", "sh", "-c", cmd]);
        ok(cfg, &args);
    };
    // Blue's service first: its VIP takes the same address red's will (both networks are
    // 10.88.0.0/16, both start allocating at .2).
    create("blue", "db", &["-p", "80"], "exec sleep 100000");
    create("blue", "cli", &[], "exec sleep 100000");
    create(
        "red",
        "web",
        &[
            "--replicas",
            "2",
            "-p",
            "80",
            "--readiness",
            "http:80/",
            "--probe-every",
            "1",
        ],
        "busybox mkdir -p /www && busybox hostname >/www/index.html && \
         exec busybox httpd -f -p 80 -h /www",
    );
    create("red", "cli", &[], "exec sleep 100000");
    let vip = |t: &str, s: &str| {
        json(cfg, &["--tenant", t, "service", "get", s])["status"]["vip"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let red_vip = vip("red", "web");
    assert_eq!(
        red_vip,
        vip("blue", "db"),
        "the same address in both tenants"
    );
    assert!(!red_vip.is_empty());
    // `service ls` shows it.
    assert!(ok(cfg, &["--tenant", "red", "service", "ls"]).contains(&red_vip));

    let t0 = Instant::now();
    let ready = || {
        instances(cfg, "red")
            .iter()
            .filter(|i| i["spec"]["service"] == "web" && i["status"]["ready"] == true)
            .count()
    };
    while ready() < 2
        || running(cfg, "red", "cli").is_empty()
        || running(cfg, "blue", "cli").is_empty()
    {
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "web not ready or clients not running: {:#?}",
            instances(cfg, "red")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let webs = running(cfg, "red", "web");
    let cli = running(cfg, "red", "cli").remove(0);
    let blue_cli = running(cfg, "blue", "cli").remove(0);

    // Names: the short one (searched) and the full one, A records of the VIP; the SRV of
    // port 80 lists both replicas.
    for name in ["web", "web.red.hive"] {
        let mut out = String::new();
        // busybox nslookup waits 5 s for a lost answer: give it several tries on a busy host.
        let t0 = Instant::now();
        while !out.contains(&red_vip) {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "red's client resolves {name}: {out}"
            );
            out = busybox(cli.2, &["nslookup", name]).1;
        }
    }
    let (_, srv) = busybox(cli.2, &["nslookup", "-type=srv", "_80._tcp.web.red.hive"]);
    for w in &webs {
        assert!(srv.contains(&format!("{}.web.red.hive", w.0)), "{srv}");
    }
    // Both replicas answer through the VIP, by name and by address.
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..30 {
        let host = match i % 3 {
            0 => "web".to_owned(),
            1 => "web.red.hive".to_owned(),
            _ => red_vip.clone(),
        };
        seen.insert(get(cli.2, &host));
    }
    let names: std::collections::BTreeSet<String> = webs.iter().map(|w| w.0.clone()).collect();
    assert_eq!(seen, names, "both replicas answer through the VIP");

    // Blue: none of red's names, and red's VIP address reaches nothing of red's.
    for name in ["web", "web.red.hive"] {
        let (_, out) = busybox(blue_cli.2, &["nslookup", name]);
        assert!(
            !out.contains(&red_vip) && out.contains("NXDOMAIN"),
            "blue resolved {name}: {out}"
        );
    }
    let t0 = Instant::now();
    let body = get(blue_cli.2, &red_vip);
    assert!(!names.iter().any(|n| body.contains(n)), "{body}");
    assert!(
        body.contains("refused") && t0.elapsed() < Duration::from_secs(1),
        "blue's own service at that address serves nothing on port 80: {body}"
    );

    // Scale to one: the client's table (on its node) drops the other replica within 1 s.
    let (cli_ns, _) = cluster.node(&cli.1);
    let netns = format!("{}-{}", cli_ns.prefix, cli.3);
    let table = || {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &netns,
                "nft",
                "list",
                "table",
                "ip",
                &cli_ns.prefix,
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let before = table();
    let web_ips: Vec<String> = instances(cfg, "red")
        .iter()
        .filter(|i| i["spec"]["service"] == "web")
        .map(|i| i["status"]["ip"].as_str().unwrap().to_owned())
        .collect();
    assert!(web_ips.iter().all(|ip| before.contains(ip)), "{before}");
    let t0 = Instant::now();
    ok(cfg, &["--tenant", "red", "scale", "web", "1"]);
    let scaled = t0.elapsed();
    let propagated = loop {
        let now = table();
        if web_ips
            .iter()
            .filter(|ip| now.contains(ip.as_str()))
            .count()
            == 1
        {
            break t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the table did not change: {now}"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    eprintln!(
        "scale to 1: CLI returned after {scaled:?}, client table changed after {propagated:?} \
         (client on {}, web on {:?})",
        cli.1,
        webs.iter().map(|w| &w.1).collect::<Vec<_>>()
    );
    assert!(
        propagated < Duration::from_secs(1),
        "endpoint change took {propagated:?}"
    );
    let left: Vec<String> = instances(cfg, "red")
        .iter()
        .filter(|i| i["spec"]["service"] == "web")
        .map(|i| i["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(left.len(), 1);
    for _ in 0..10 {
        assert_eq!(get(cli.2, "web"), left[0]);
    }

    // Everything goes: services deleted, no namespace, table or resolver left.
    for (t, s) in [
        ("red", "web"),
        ("red", "cli"),
        ("blue", "db"),
        ("blue", "cli"),
    ] {
        ok(cfg, &["--tenant", t, "service", "rm", s]);
    }
    until(60, "namespaces left behind", || {
        (1..=2).all(|i| {
            let (ns, _) = cluster.node(&format!("n{i}"));
            std::fs::read_dir("/run/netns")
                .unwrap()
                .flatten()
                .all(|e| !e.file_name().to_string_lossy().starts_with(&ns.prefix))
        })
    });
    let claims = json(cfg, &["--tenant", "red", "service", "ls"]);
    assert!(claims.as_array().unwrap().is_empty());
    drop(tt);
}
