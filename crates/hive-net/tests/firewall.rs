//! Security-group rules inside an instance's namespace, against the real kernel: only what a
//! rule allows reaches it, its own connections' replies always do, rules change live, and
//! removing them opens it to its network again. Needs root, nft, ping and iperf3.

mod common;

use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use hive_net::{Firewall, FwProtocol, FwRule, Ipv4Subnet, Protocol};

const VNI: u32 = 4301;

/// Whether a TCP connection from `from` to `to:port` (an iperf3 server there) succeeds.
fn tcp_reaches(from: &str, to_ns: &str, to: Ipv4Addr, port: u16) -> bool {
    let mut server = hive_net::testbed::ns_command(to_ns, "iperf3")
        .args(["-s", "-1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let ok = hive_net::testbed::ns_command(from, "iperf3")
        .args(["-c", &to.to_string(), "-p", &port.to_string(), "-t", "1"])
        .args(["--connect-timeout", "1000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success();
    let _ = server.kill();
    let _ = server.wait();
    ok
}

fn host(ip: Ipv4Addr) -> Ipv4Subnet {
    Ipv4Subnet::new(ip, 32).unwrap()
}

#[tokio::test]
async fn only_allowed_sources_and_replies_reach_a_guarded_instance() {
    let t = Topo::new().await;
    for n in &t.nodes {
        n.net.ensure_network(&network(VNI)).await.unwrap();
    }
    // The guarded instance on node 2; a friend and a stranger on node 1.
    let (friend, stranger, guarded) = (inst(1, 1, 1, VNI), inst(1, 1, 2, VNI), inst(1, 2, 1, VNI));
    t.nodes[0].net.attach(&friend).await.unwrap();
    t.nodes[0].net.attach(&stranger).await.unwrap();
    t.nodes[1].net.attach(&guarded).await.unwrap();
    let eps = [
        endpoint(&friend, t.nodes[0].ip),
        endpoint(&stranger, t.nodes[0].ip),
        endpoint(&guarded, t.nodes[1].ip),
    ];
    for n in &t.nodes {
        n.net.set_remote_endpoints(VNI, &eps).await.unwrap();
    }
    let (nf, ns_, ng) = (
        t.inst_ns(&friend.key),
        t.inst_ns(&stranger.key),
        t.inst_ns(&guarded.key),
    );
    let g = guarded.ip.to_string();
    // Without rules its network reaches it.
    assert_eq!(ping(&ns_, &g, 1, &[]), 1);
    assert!(tcp_reaches(&ns_, &ng, guarded.ip, 5301));

    // TCP 5301 from the friend only; published port 5302 from anyone.
    let mut fw = Firewall {
        published: vec![(Protocol::Tcp, 5302)],
        rules: vec![FwRule {
            protocol: FwProtocol::Tcp,
            ports: Some((5301, 5301)),
            sources: vec![host(friend.ip)],
        }],
    };
    t.nodes[1]
        .net
        .set_firewall(&guarded.key, Some(&fw))
        .await
        .unwrap();
    assert!(
        tcp_reaches(&nf, &ng, guarded.ip, 5301),
        "the friend is allowed"
    );
    assert!(
        !tcp_reaches(&ns_, &ng, guarded.ip, 5301),
        "the stranger is not"
    );
    assert!(!tcp_reaches(&nf, &ng, guarded.ip, 5303), "nor another port");
    assert!(
        tcp_reaches(&ns_, &ng, guarded.ip, 5302),
        "a published port is open"
    );
    assert_eq!(ping(&nf, &g, 1, &[]), 0, "no icmp rule");
    // Written over netlink; `nft` reads it back as it would have written it.
    let listing = in_ns_ok(&ng, &["nft", "list", "ruleset"]);
    let lines: Vec<&str> = listing.lines().map(str::trim).collect();
    for want in [
        "type filter hook input priority filter; policy drop;",
        "ct state established,related accept comment \"replies\"",
        "ct state invalid drop comment \"invalid\"",
        "iif \"lo\" accept comment \"loopback\"",
        "tcp dport 5302 accept comment \"published\"",
        &format!(
            "ip saddr {} tcp dport 5301 accept comment \"allowed\"",
            friend.ip
        ),
    ] {
        assert!(lines.contains(&want), "{want:?} in {listing}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("counter packets") && l.ends_with("drop comment \"dropped\"")),
        "{listing}"
    );
    // Its own connections' replies come back.
    assert_eq!(ping(&ng, &friend.ip.to_string(), 2, &[]), 2);
    assert!(tcp_reaches(&ng, &ns_, stranger.ip, 5304));

    // Changed live: ICMP from the whole network, a port range from the friend.
    fw.rules.push(FwRule {
        protocol: FwProtocol::Icmp,
        ports: None,
        sources: vec![Ipv4Subnet::new(Ipv4Addr::new(10, 77, 0, 0), 24).unwrap()],
    });
    fw.rules.push(FwRule {
        protocol: FwProtocol::Tcp,
        ports: Some((5305, 5306)),
        sources: vec![host(friend.ip)],
    });
    t.nodes[1]
        .net
        .set_firewall(&guarded.key, Some(&fw))
        .await
        .unwrap();
    assert_eq!(ping(&ns_, &g, 1, &[]), 1);
    assert!(!tcp_reaches(&ns_, &ng, guarded.ip, 5301), "still not TCP");
    assert!(tcp_reaches(&nf, &ng, guarded.ip, 5306), "in the range");
    assert!(!tcp_reaches(&nf, &ng, guarded.ip, 5307), "past the range");

    // No rules: open to its network again; removal leaves nothing.
    t.nodes[1]
        .net
        .set_firewall(&guarded.key, None)
        .await
        .unwrap();
    assert!(tcp_reaches(&ns_, &ng, guarded.ip, 5301));
    let tables = in_ns_ok(&ng, &["nft", "list", "tables"]);
    assert!(!tables.contains("fw"), "{tables}");
    for (a, node) in [(&friend, 0), (&stranger, 0), (&guarded, 1)] {
        t.nodes[node].net.detach(&a.key).await.unwrap();
    }
}
