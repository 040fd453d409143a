//! Service VIPs and DNS inside instance namespaces, against the real kernel: a client on
//! node 1, backends on nodes 1 and 2 (the same network), routes balancing TCP over both,
//! a removed backend getting no new connection, a VIP without backends refused at once,
//! changes written alone (and whole again after a restart or a table changed by hand), the
//! resolver answering inside the namespace, and nothing left after removal. Needs root,
//! the tools listed in `common`, and busybox (`nc`, `nslookup`).

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::*;
use hive_net::{DnsZone, Protocol, ServiceRoute};

const VNI: u32 = 4201;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 200);
const VIP2: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 201);

/// What `n` connections from `ns` to the VIP were answered with.
fn answers(ns: &str, n: usize) -> Vec<String> {
    answers_at(ns, VIP, n)
}

/// What `n` connections from `ns` to `vip` were answered with.
fn answers_at(ns: &str, vip: Ipv4Addr, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let out = in_ns(ns, &["busybox", "nc", "-w", "2", &vip.to_string(), "80"]);
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        })
        .collect()
}

// Multi-threaded: the resolver's tasks run while the test blocks on busybox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vip_balances_over_backends_and_goes_with_its_namespace() {
    let mut t = Topo::new().await;
    let (client, b1, b2) = (inst(1, 1, 1, VNI), inst(1, 1, 2, VNI), inst(1, 2, 1, VNI));
    for n in &t.nodes {
        n.net.ensure_network(&network(VNI)).await.unwrap();
    }
    t.nodes[0].net.attach(&client).await.unwrap();
    t.nodes[0].net.attach(&b1).await.unwrap();
    t.nodes[1].net.attach(&b2).await.unwrap();
    let eps = [
        endpoint(&client, t.nodes[0].ip),
        endpoint(&b1, t.nodes[0].ip),
        endpoint(&b2, t.nodes[1].ip),
    ];
    for n in &t.nodes {
        n.net.set_remote_endpoints(VNI, &eps).await.unwrap();
    }
    let cns = t.inst_ns(&client.key);
    let _s1 = Server::start(&t.inst_ns(&b1.key), "b1");
    let _s2 = Server::start(&t.inst_ns(&b2.key), "b2");
    // The servers listen once a direct connection gets an answer.
    for ip in [b1.ip, b2.ip] {
        let t0 = Instant::now();
        while !String::from_utf8_lossy(
            &in_ns(&cns, &["busybox", "nc", "-w", "1", &ip.to_string(), "80"]).stdout,
        )
        .starts_with('b')
        {
            assert!(t0.elapsed() < Duration::from_secs(10), "server on {ip} up");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    let route = |backends: Vec<Ipv4Addr>| ServiceRoute {
        vip: VIP,
        ports: vec![(Protocol::Tcp, 80), (Protocol::Udp, 80)],
        backends,
    };
    let net = &t.nodes[0].net;
    let t0 = Instant::now();
    net.set_service_routes(&client.key, &[route(vec![b1.ip, b2.ip])])
        .await
        .unwrap();
    let setup = t0.elapsed();
    // Same again: idempotent.
    net.set_service_routes(&client.key, &[route(vec![b1.ip, b2.ip])])
        .await
        .unwrap();
    let got = answers(&cns, 30);
    let (n1, n2) = (
        got.iter().filter(|a| *a == "b1").count(),
        got.iter().filter(|a| *a == "b2").count(),
    );
    assert_eq!(n1 + n2, 30, "every connection answered: {got:?}");
    assert!(n1 > 0 && n2 > 0, "both backends seen: {got:?}");

    // b2 removed from the routes: no new connection reaches it.
    let t0 = Instant::now();
    net.set_service_routes(&client.key, &[route(vec![b1.ip])])
        .await
        .unwrap();
    let change = t0.elapsed();
    let got = answers(&cns, 15);
    assert!(got.iter().all(|a| a == "b1"), "only b1: {got:?}");

    // No backends: refused at once, not a timeout.
    net.set_service_routes(&client.key, &[route(vec![])])
        .await
        .unwrap();
    let t0 = Instant::now();
    let out = in_ns(&cns, &["busybox", "nc", "-w", "5", &VIP.to_string(), "80"]);
    let refused = t0.elapsed();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("refused"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(refused < Duration::from_secs(1), "refused in {refused:?}");
    // Another instance of the network (b1) has no routes: the VIP means nothing there.
    let out = in_ns(&t.inst_ns(&b1.key), &["nft", "list", "tables"]);
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty());

    // Changes write only what differs, and `nft` reads back what netlink wrote. They are
    // applied as such, not by the whole rewrite a failed change falls back to (which would
    // make the table again: a new handle).
    let handle = || {
        let tables = in_ns_ok(&cns, &["nft", "list", "tables"]);
        let name = tables
            .split_whitespace()
            .nth(2)
            .expect("one table")
            .to_owned();
        let table = in_ns_ok(&cns, &["nft", "-a", "list", "table", "ip", &name]);
        let first = table.lines().next().unwrap_or_default().to_owned();
        assert!(first.contains("# handle "), "{first}");
        first
    };
    let before = handle();
    net.set_service_routes(&client.key, &[route(vec![b1.ip]), route2(vec![b2.ip])])
        .await
        .unwrap();
    assert_eq!(handle(), before, "a change, not a rewrite");
    assert!(answers(&cns, 5).iter().all(|a| a == "b1"));
    assert!(answers_at(&cns, VIP2, 5).iter().all(|a| a == "b2"));
    let listing = in_ns_ok(&cns, &["nft", "list", "ruleset"]);
    for part in [
        "ip daddr . meta l4proto . th dport @ports_1 dnat to ip daddr . numgen random mod 1 map @be_1",
        "10.77.0.201 . tcp . 80",
        "10.77.0.201 . 0x00000000 : 10.77.0.11",
        // (`nft` shows the rule without its implied `meta l4proto tcp`)
        "ip daddr @vips reject with tcp reset",
    ] {
        assert!(listing.contains(part), "{part} in {listing}");
    }
    // A table changed behind our back is written whole on the next change.
    let table = listing
        .lines()
        .find_map(|l| l.strip_prefix("table ip "))
        .and_then(|l| l.split_whitespace().next())
        .expect("the table's name")
        .to_owned();
    in_ns_ok(&cns, &["nft", "delete", "table", "ip", &table]);
    // Written whole with two backend counts at once: each VIP balances over its own.
    net.set_service_routes(
        &client.key,
        &[route(vec![b1.ip, b2.ip]), route2(vec![b1.ip])],
    )
    .await
    .unwrap();
    let got = answers(&cns, 30);
    assert!(
        got.contains(&"b1".to_owned()) && got.contains(&"b2".to_owned()),
        "{got:?}"
    );
    assert!(answers_at(&cns, VIP2, 5).iter().all(|a| a == "b1"));
    // The count of two gone: its rule and sets go, the other VIP is untouched.
    let before = handle();
    net.set_service_routes(&client.key, &[route(vec![b2.ip]), route2(vec![b1.ip])])
        .await
        .unwrap();
    assert_eq!(handle(), before, "a change, not a rewrite");
    assert!(answers(&cns, 5).iter().all(|a| a == "b2"));
    assert!(answers_at(&cns, VIP2, 5).iter().all(|a| a == "b1"));
    let listing = in_ns_ok(&cns, &["nft", "list", "ruleset"]);
    assert!(
        !listing.contains("ports_2") && !listing.contains("be_2") && !listing.contains("mod 2"),
        "{listing}"
    );

    // The resolver inside the namespace.
    let mut zone = DnsZone {
        domain: "acme.hive".into(),
        ..Default::default()
    };
    zone.a.insert("web".into(), vec![VIP]);
    let t0 = Instant::now();
    // An instance's start and the agent's pass over running instances may ask at once: one
    // resolver is started, the other call only sets its zone (never a second bind).
    let (a, b) = tokio::join!(
        net.serve_dns(&client.key, zone.clone().into()),
        net.serve_dns(&client.key, zone.clone().into())
    );
    a.unwrap();
    b.unwrap();
    let dns_setup = t0.elapsed();
    for name in ["web.acme.hive", "web"] {
        let out = in_ns(&cns, &["busybox", "nslookup", name, "127.0.0.53"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&VIP.to_string()),
            "{name}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = in_ns(
        &cns,
        &["busybox", "nslookup", "web.blue.hive", "127.0.0.53"],
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(&VIP.to_string()),
        "another tenant's name is not answered"
    );
    eprintln!(
        "routes in a namespace: first {setup:?}, change {change:?}; refused in {refused:?}; \
         resolver started in {dns_setup:?}"
    );

    // No routes: the table goes.
    net.set_service_routes(&client.key, &[]).await.unwrap();
    net.set_service_routes(&client.key, &[]).await.unwrap();
    let out = in_ns_ok(&cns, &["nft", "list", "tables"]);
    assert!(out.trim().is_empty(), "{out}");
    // Detach takes the resolver along (its sockets would keep the namespace alive).
    net.set_service_routes(&client.key, &[route(vec![b1.ip])])
        .await
        .unwrap();
    net.detach(&client.key).await.unwrap();
    assert!(!net.serves_dns(&client.key));
    assert!(hive_net::testbed::Testbed::inst_ns(&t, &client.key).is_none());
    assert!(
        net.set_service_routes(&client.key, &[]).await.is_err(),
        "no namespace, no routes"
    );

    // Restarted (nothing remembered), the node rewrites a namespace's table whole.
    let ns1 = t.inst_ns(&b1.key);
    net.set_service_routes(&b1.key, &[route(vec![b1.ip])])
        .await
        .unwrap();
    t.reopen(0).await;
    let net = &t.nodes[0].net;
    net.set_service_routes(&b1.key, &[route(vec![b2.ip]), route2(vec![b2.ip])])
        .await
        .unwrap();
    assert!(answers(&ns1, 5).iter().all(|a| a == "b2"));
    assert!(answers_at(&ns1, VIP2, 5).iter().all(|a| a == "b2"));
}

fn route2(backends: Vec<Ipv4Addr>) -> ServiceRoute {
    ServiceRoute {
        vip: VIP2,
        ports: vec![(Protocol::Tcp, 80)],
        backends,
    }
}
