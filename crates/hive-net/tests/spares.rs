//! Spare namespaces (one test in its own binary: it counts this process's namespace
//! descriptors). Told to, a node keeps namespaces ready; a port made from one has what a
//! port made from nothing has (sysctls, `lo`, address, route, a resolver; its veth pair made
//! ahead, renamed onto the bridge), and the spares go with the node's `NodeNet`. Needs root and the tools listed in
//! `common`, and busybox (`nslookup`).

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use common::*;
use hive_net::DnsZone;

const VNI: u32 = 4151;

/// Descriptors of this process open on network namespaces.
fn netns_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with("net:["))
        .count()
}

/// Polls `cond` for up to 5 s.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{what}: not after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What a port's namespace looks like from inside.
fn inside(ns: &str) -> Vec<String> {
    let mut seen: Vec<String> = [
        "net/ipv4/ip_forward",
        "net/ipv4/conf/all/rp_filter",
        "net/ipv4/conf/default/accept_redirects",
        "net/ipv4/ping_group_range",
        "net/ipv6/conf/all/disable_ipv6",
        "net/ipv6/conf/default/disable_ipv6",
    ]
    .iter()
    .map(|k| {
        format!(
            "{k}={}",
            in_ns_ok(ns, &["cat", &format!("/proc/sys/{k}")]).trim()
        )
    })
    .collect();
    let lo = in_ns_ok(ns, &["ip", "-o", "link", "show", "lo"]);
    seen.push(format!("lo up={}", lo.contains(",UP")));
    seen.push(in_ns_ok(
        ns,
        &["ip", "-o", "-4", "route", "show", "default"],
    ));
    seen
}

// Multi-threaded: the resolver's tasks run while the test blocks on busybox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_from_spare_namespaces_match_fresh_ones_and_spares_go_with_the_node() {
    let baseline = netns_fds();
    {
        let t = Topo::new().await;
        let net = &t.nodes[0].net;
        net.ensure_network(&network(VNI)).await.unwrap();
        assert!(net.spare_namespaces().is_empty(), "none until asked for");
        let (a, b) = (inst(1, 1, 1, VNI), inst(1, 1, 2, VNI));
        let ns_inode = |key: &str| {
            std::fs::metadata(std::path::Path::new(NETNS_DIR).join(t.inst_ns(key)))
                .unwrap()
                .ino()
        };

        // With none ready, a port makes its own namespace.
        net.attach(&a).await.unwrap();
        assert!(net.spare_namespaces().is_empty());
        net.refill_spares();
        eventually("two spares", || net.spare_namespaces().len() == 2).await;
        let spares = net.spare_namespaces();
        assert!(!spares.contains(&ns_inode(&a.key)));
        // Each with its veth pair made ahead: the host side under a spare name, down, on no
        // bridge.
        let node = &t.nodes[0];
        let spare_links = || -> Vec<String> {
            t.our_links(0)
                .into_iter()
                .filter(|l| l.starts_with(&format!("{}s", node.prefix)))
                .collect()
        };
        eventually("two spare veths", || spare_links().len() == 2).await;
        let ipv6_off = |dev: &str| {
            in_ns_ok(
                &node.ns,
                &[
                    "cat",
                    &format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6"),
                ],
            )
            .trim()
                == "1"
        };
        for l in spare_links() {
            let shown = in_ns_ok(&node.ns, &["ip", "-o", "link", "show", &l]);
            assert!(
                !shown.contains("master") && !shown.contains(",UP"),
                "{shown}"
            );
            assert!(ipv6_off(&l), "{l}: IPv6 on");
        }

        // The next port is one of them, named.
        net.attach(&b).await.unwrap();
        assert!(
            spares.contains(&ns_inode(&b.key)),
            "{} not one of the spares {spares:?}",
            ns_inode(&b.key)
        );
        assert_eq!(net.spare_namespaces().len(), 1);
        // Its veth is one of the spare's, renamed onto the bridge, with the port's address
        // inside.
        assert_eq!(spare_links().len(), 1);
        let eth = in_ns_ok(&t.inst_ns(&b.key), &["ip", "-o", "link", "show", "eth0"]);
        // `2: eth0@if17: …`: the host side's index.
        let peer = eth
            .split("eth0@if")
            .nth(1)
            .and_then(|r| r.split(':').next())
            .expect("eth0's peer")
            .to_owned();
        let shown = in_ns_ok(&node.ns, &["ip", "-o", "link", "show"])
            .lines()
            .find(|l| l.starts_with(&format!("{peer}: ")))
            .expect("the host side")
            .to_owned();
        assert!(
            shown.contains(&format!("master {}b{VNI}", node.prefix))
                && shown.contains(",UP")
                && !shown.contains(&format!(": {}s", node.prefix)),
            "{shown}"
        );
        assert!(eth.contains(&mac_str(b.mac)), "{eth}");
        // IPv6 still off on it under its new name, as on the port made from nothing.
        let host_name = |line: &str| {
            line.split(": ")
                .nth(1)
                .and_then(|r| r.split('@').next())
                .expect("a link name")
                .to_owned()
        };
        assert!(ipv6_off(&host_name(&shown)), "{shown}");
        let eth_a = in_ns_ok(&t.inst_ns(&a.key), &["ip", "-o", "link", "show", "eth0"]);
        let mtu = |s: &str| {
            s.split(" mtu ")
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .map(str::to_owned)
        };
        assert_eq!(mtu(&eth), mtu(&eth_a), "{eth}\n{eth_a}");
        // Topped up again when asked.
        net.refill_spares();
        eventually("two spares again", || {
            let now = net.spare_namespaces();
            now.len() == 2 && !now.contains(&ns_inode(&b.key))
        })
        .await;

        // Both ports alike inside, and as the instance needs them.
        let (ns_a, ns_b) = (t.inst_ns(&a.key), t.inst_ns(&b.key));
        let (seen_a, seen_b) = (inside(&ns_a), inside(&ns_b));
        assert_eq!(seen_a, seen_b);
        for want in [
            "net/ipv4/ip_forward=0",
            "net/ipv4/conf/all/rp_filter=1",
            "net/ipv4/ping_group_range=0\t2147483647",
            "net/ipv6/conf/all/disable_ipv6=1",
            "lo up=true",
        ] {
            assert!(seen_b.iter().any(|s| s == want), "{want}: {seen_b:?}");
        }
        assert!(
            seen_b
                .iter()
                .any(|s| s.contains("default via 10.77.0.254 dev eth0"))
        );
        let addr = in_ns_ok(&ns_b, &["ip", "-o", "-4", "addr", "show", "eth0"]);
        assert!(addr.contains("10.77.0.2/24"), "{addr}");
        assert_eq!(ping(&ns_a, "10.77.0.2", 2, &[]), 2);
        assert_eq!(ping(&ns_b, "10.77.0.1", 2, &[]), 2);

        // A resolver in each: on the sockets bound ahead in the spare, or bound now.
        let mut zone = DnsZone {
            domain: "acme.hive".into(),
            ..Default::default()
        };
        zone.a
            .insert("web".into(), vec!["10.77.0.200".parse().unwrap()]);
        for (key, ns) in [(&a.key, &ns_a), (&b.key, &ns_b)] {
            net.serve_dns(key, zone.clone().into()).await.unwrap();
            let out = in_ns(ns, &["busybox", "nslookup", "web.acme.hive", "127.0.0.53"]);
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("10.77.0.200"), "{key}: {text}");
        }

        net.detach(&a.key).await.unwrap();
        net.detach(&b.key).await.unwrap();
        for n in &t.nodes {
            n.net.teardown_all().await.unwrap();
        }
        assert!(t.our_netns(0).is_empty(), "{:?}", t.our_netns(0));
        assert!(net.spare_namespaces().len() == 2);
    }
    // The testbed's nodes and the two spares are closed with it.
    eventually("no namespace descriptor left", || netns_fds() <= baseline).await;
}
