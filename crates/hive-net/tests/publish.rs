//! Published ports against the real kernel: node 1's underlay address and port forwarded to
//! an instance through its network's router, reached from node 2 (and from node 1 at
//! 127.0.0.1); the node's and the
//! router's tables as `nft` reads back what netlink wrote; a node port another network
//! holds refused; unpublishing removes the router and the node's table. Needs root, the
//! tools listed in `common`, and busybox (`nc`).

mod common;

use std::time::{Duration, Instant};

use common::*;
use hive_net::{Protocol, PublishedPort};

const VNI: u32 = 4301;
const OTHER_VNI: u32 = 4302;

#[tokio::test]
async fn a_published_port_reaches_its_instance_and_goes_with_its_router() {
    let t = Topo::new().await;
    let (node1, node2) = (&t.nodes[0], &t.nodes[1]);
    node1.net.ensure_network(&network(VNI)).await.unwrap();
    let web = inst(1, 1, 1, VNI);
    node1.net.attach(&web).await.unwrap();
    let _server = Server::start(&t.inst_ns(&web.key), "web");
    let port = PublishedPort {
        protocol: Protocol::Tcp,
        node_port: 8080,
        ip: web.ip,
        port: 80,
    };
    node1
        .net
        .set_published(&network(VNI), &[port])
        .await
        .unwrap();
    // Written again (the agent rewrites on every change): same result.
    node1
        .net
        .set_published(&network(VNI), &[port])
        .await
        .unwrap();

    // From node 2, to node 1's address: the instance answers.
    let target = node1.ip.to_string();
    let t0 = Instant::now();
    loop {
        let out = in_ns(&node2.ns, &["busybox", "nc", "-w", "2", &target, "8080"]);
        if String::from_utf8_lossy(&out.stdout).trim() == "web" {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no answer through 8080"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // From node 1 itself, at 127.0.0.1 (its loopback source masqueraded towards the router).
    let out = in_ns(
        &node1.ns,
        &["busybox", "nc", "-w", "2", "127.0.0.1", "8080"],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "web",
        "{out:?}"
    );

    // What netlink wrote, as nft reads it back.
    let table = format!("{}pub", node1.prefix);
    let node_table = in_ns_ok(&node1.ns, &["nft", "list", "table", "ip", &table]);
    for want in [
        "type inet_proto . inet_service : ipv4_addr",
        "tcp . 8080 : 169.254.0.2",
        &format!("ip daddr {target} dnat to meta l4proto . th dport map @ports"),
        &format!(
            "iifname \"{}t*\" ct state new counter packets 0 bytes 0 drop",
            node1.prefix
        ),
        "type nat hook output priority -100",
        "type filter hook input priority filter",
        "ip daddr 127.0.0.1 dnat to meta l4proto . th dport map @ports",
        "type nat hook postrouting priority srcnat",
        &format!(
            "oifname \"{}t*\" ip saddr 127.0.0.0/8 masquerade",
            node1.prefix
        ),
    ] {
        assert!(
            node_table.contains(want),
            "{want:?} missing from:\n{node_table}"
        );
    }
    let router_ns = format!("{}_r{VNI}", node1.prefix);
    let router_table = in_ns_ok(&router_ns, &["nft", "list", "table", "ip", "hive"]);
    for want in [
        &format!("iifname \"tr0\" tcp dport 8080 dnat to {}:80", web.ip),
        "iifname \"eth0\" oifname \"tr0\" ct state new counter packets 0 bytes 0 drop",
        "type nat hook prerouting priority dstnat",
    ] {
        assert!(
            router_table.contains(want),
            "{want:?} missing from:\n{router_table}"
        );
    }

    // Another network of the node may not take the same node port.
    node1.net.ensure_network(&network(OTHER_VNI)).await.unwrap();
    let other = PublishedPort {
        ip: "10.77.0.5".parse().unwrap(),
        ..port
    };
    let err = node1
        .net
        .set_published(&network(OTHER_VNI), &[other])
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("published by another network"),
        "{err}"
    );
    node1
        .net
        .set_published(&network(OTHER_VNI), &[])
        .await
        .unwrap();

    // Unpublished: the router and the node's table go.
    node1.net.set_published(&network(VNI), &[]).await.unwrap();
    let tables = in_ns_ok(&node1.ns, &["nft", "list", "tables"]);
    assert!(!tables.contains(&table), "{tables}");
    assert!(
        !std::path::Path::new(&format!("/run/netns/{router_ns}")).exists(),
        "router namespace {router_ns} left"
    );
    let out = in_ns(&node2.ns, &["busybox", "nc", "-w", "1", &target, "8080"]);
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty());
}
