//! Two nodes, two tenants with the identical subnet 10.77.0.0/24 on different VNIs,
//! instances on both nodes: connectivity, MTU, isolation, anti-spoofing, FDB reconcile and
//! clean removal, against the real kernel. Needs root and the tools listed in `common`.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use hive_net::{Attachment, NetError, PortCounters};

const VNI_A: u32 = 4101;
const VNI_B: u32 = 4102;

/// Builds the two-tenant topology and returns its instances: A1, A2, B1, B2 (node 1 / 2).
async fn two_tenants(t: &Topo) -> [Attachment; 4] {
    let a1 = inst(1, 1, 1, VNI_A);
    let a2 = inst(1, 2, 1, VNI_A);
    let b1 = inst(2, 1, 1, VNI_B);
    let b2 = inst(2, 2, 1, VNI_B);
    for n in &t.nodes {
        n.net.ensure_network(&network(VNI_A)).await.unwrap();
        n.net.ensure_network(&network(VNI_B)).await.unwrap();
    }
    for (a, node) in [(&a1, 0), (&a2, 1), (&b1, 0), (&b2, 1)] {
        t.nodes[node].net.attach(a).await.unwrap();
    }
    let (ip1, ip2) = (t.nodes[0].ip, t.nodes[1].ip);
    for (vni, local, remote) in [(VNI_A, &a1, &a2), (VNI_B, &b1, &b2)] {
        // The same list on both nodes: each skips its own endpoints.
        let eps = [endpoint(local, ip1), endpoint(remote, ip2)];
        t.nodes[0]
            .net
            .set_remote_endpoints(vni, &eps)
            .await
            .unwrap();
        t.nodes[1]
            .net
            .set_remote_endpoints(vni, &eps)
            .await
            .unwrap();
    }
    [a1, a2, b1, b2]
}

#[tokio::test]
async fn cross_node_ping_full_mtu_and_tenant_isolation() {
    let t = Topo::new().await;
    let [a1, a2, b1, b2] = two_tenants(&t).await;
    let (na1, na2, nb1, nb2) = (
        t.inst_ns(&a1.key),
        t.inst_ns(&a2.key),
        t.inst_ns(&b1.key),
        t.inst_ns(&b2.key),
    );
    assert_eq!(t.nodes[0].net.mtu(), 1450);

    // Same IP 10.77.0.11 in both tenants: each reaches its own.
    assert_eq!(ping(&na1, "10.77.0.11", 3, &[]), 3, "A1 -> A2");
    assert_eq!(ping(&nb1, "10.77.0.11", 3, &[]), 3, "B1 -> B2");
    assert_eq!(ping(&nb2, "10.77.0.1", 3, &[]), 3, "B2 -> B1");
    let neigh = in_ns_ok(&na1, &["ip", "neigh", "show", "10.77.0.11"]);
    assert!(
        neigh.contains(&mac_str(a2.mac)),
        "A1 resolved A2's MAC: {neigh}"
    );
    let neigh = in_ns_ok(&nb1, &["ip", "neigh", "show", "10.77.0.11"]);
    assert!(
        neigh.contains(&mac_str(b2.mac)),
        "B1 resolved B2's MAC: {neigh}"
    );

    // Full overlay MTU with DF: 1422 + 8 ICMP + 20 IP = 1450. One byte more cannot leave.
    assert_eq!(
        ping(&na1, "10.77.0.11", 3, &["-M", "do", "-s", "1422"]),
        3,
        "DF ping at 1450"
    );
    assert_eq!(
        ping(&na1, "10.77.0.11", 1, &["-M", "do", "-s", "1423"]),
        0,
        "DF ping at 1451"
    );
    let link = in_ns_ok(&na1, &["ip", "-o", "link", "show", "eth0"]);
    assert!(link.contains("mtu 1450"), "{link}");

    // Isolation: B's instances see nothing of A's attempts, by IP, by ARP or by MAC.
    let cap1 = Capture::start(&nb1, "eth0", "");
    let cap2 = Capture::start(&nb2, "eth0", "");
    assert_eq!(ping(&na1, "10.77.0.11", 2, &[]), 2);
    let _ = in_ns(
        &na1,
        &[
            "arping",
            "-q",
            "-c",
            "2",
            "-w",
            "1",
            "-i",
            "eth0",
            "10.77.0.1",
        ],
    );
    in_ns_ok(
        &na1,
        &[
            "ip",
            "neigh",
            "replace",
            "10.77.0.99",
            "lladdr",
            &mac_str(b2.mac),
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    );
    in_ns_ok(
        &na1,
        &[
            "ip",
            "neigh",
            "replace",
            "10.77.0.98",
            "lladdr",
            &mac_str(b1.mac),
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    );
    assert_eq!(ping(&na1, "10.77.0.99", 2, &[]), 0, "unicast to B2's MAC");
    assert_eq!(ping(&na1, "10.77.0.98", 2, &[]), 0, "unicast to B1's MAC");
    // And the other way round, into A.
    in_ns_ok(
        &nb2,
        &[
            "ip",
            "neigh",
            "replace",
            "10.77.0.99",
            "lladdr",
            &mac_str(a1.mac),
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    );
    assert_eq!(ping(&nb2, "10.77.0.99", 1, &[]), 0);
    // Positive control: the captures do see B's own traffic.
    assert_eq!(ping(&nb1, "10.77.0.11", 1, &[]), 1);
    let (seen1, seen2) = (cap1.stop_sources(), cap2.stop_sources());
    let b_macs = [mac_str(b1.mac), mac_str(b2.mac)];
    assert!(
        seen2.contains(&b_macs[0]),
        "B2's capture saw B1's ping: {seen2:?}"
    );
    let foreign: Vec<&String> = seen1
        .iter()
        .chain(&seen2)
        .filter(|m| !b_macs.contains(m))
        .collect();
    assert!(
        foreign.is_empty(),
        "B1/B2 received frames from outside tenant B: {foreign:?}"
    );
    // A's traffic did flow meanwhile (the capture could have seen it).
    assert_eq!(ping(&na2, "10.77.0.1", 2, &[]), 2);
    // Nothing of A's was dropped as a spoof: isolation comes from the VNIs, not the filter.
    let c = t.nodes[0]
        .net
        .port_counters(&a1.key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.l2_spoof + c.arp_spoof + c.ip_spoof, 0, "{c:?}");

    // The wire carries VNI A for A's traffic.
    let wire = Capture::start(&t.nodes[1].ns, &t.nodes[1].dev, "udp port 4789");
    assert_eq!(ping(&na1, "10.77.0.11", 1, &[]), 1);
    let frames = wire.stop();
    assert!(
        frames.iter().any(|l| l.contains(&format!("vni {VNI_A}"))),
        "{frames:?}"
    );
    assert!(
        !frames.iter().any(|l| l.contains(&format!("vni {VNI_B}"))),
        "{frames:?}"
    );
}

#[tokio::test]
async fn spoofed_mac_ip_and_arp_are_dropped_and_counted() {
    let t = Topo::new().await;
    let [a1, _a2, _b1, _b2] = two_tenants(&t).await;
    // A third tenant-A instance on node 1: the same-node victim for ARP spoofing.
    let a3 = inst(1, 1, 3, VNI_A);
    t.nodes[0].net.attach(&a3).await.unwrap();
    let (na1, na3) = (t.inst_ns(&a1.key), t.inst_ns(&a3.key));
    let net = &t.nodes[0].net;
    let counters = || async { net.port_counters(&a1.key).await.unwrap().unwrap() };
    assert_eq!(ping(&na1, "10.77.0.11", 2, &[]), 2, "legit A1 -> A2");
    assert_eq!(ping(&na1, "10.77.0.3", 2, &[]), 2, "legit A1 -> A3");
    let before = counters().await;
    assert_eq!(before, PortCounters::default());

    // L2: a foreign source MAC.
    in_ns_ok(
        &na1,
        &["ip", "link", "set", "eth0", "address", "02:00:00:01:01:66"],
    );
    assert_eq!(ping(&na1, "10.77.0.11", 3, &[]), 0, "MAC-spoofed ping");
    in_ns_ok(
        &na1,
        &["ip", "link", "set", "eth0", "address", &mac_str(a1.mac)],
    );
    // The MAC change flushed A1's ARP cache, so what A1 sends (and loses) are ARP
    // requests from the spoofed MAC: the pings never leave.
    let c = counters().await;
    assert!(c.l2_spoof > before.l2_spoof, "{c:?}");

    // L3: a foreign IPv4 source on the right MAC.
    in_ns_ok(&na1, &["ip", "addr", "add", "10.77.0.50/24", "dev", "eth0"]);
    assert_eq!(
        ping(&na1, "10.77.0.11", 3, &["-I", "10.77.0.50"]),
        0,
        "IP-spoofed ping"
    );
    in_ns_ok(&na1, &["ip", "addr", "del", "10.77.0.50/24", "dev", "eth0"]);
    let c2 = counters().await;
    assert!(
        c2.ip_spoof + c2.arp_spoof > c.ip_spoof + c.arp_spoof,
        "{c2:?}"
    );
    // With A2's MAC already resolved, the spoofed IPv4 source itself is dropped.
    assert_eq!(ping(&na1, "10.77.0.11", 1, &[]), 1);
    in_ns_ok(&na1, &["ip", "addr", "add", "10.77.0.50/24", "dev", "eth0"]);
    assert_eq!(
        ping(&na1, "10.77.0.11", 3, &["-I", "10.77.0.50"]),
        0,
        "IP-spoofed ping"
    );
    in_ns_ok(&na1, &["ip", "addr", "del", "10.77.0.50/24", "dev", "eth0"]);
    let c2b = counters().await;
    assert!(c2b.ip_spoof >= c2.ip_spoof + 3, "{c2b:?}");
    let c2 = c2b;

    // ARP: a gratuitous ARP claiming A2's IP, and an ARP with a forged sender MAC.
    let a1_legit = format!(
        "arp and not (arp[8:4] = 0x{:02x}{:02x}{:02x}{:02x} and arp[12:2] = 0x{:02x}{:02x} and arp[14:4] = 0x0a4d0001)",
        a1.mac[0], a1.mac[1], a1.mac[2], a1.mac[3], a1.mac[4], a1.mac[5]
    );
    let cap = Capture::start(&na3, "eth0", &a1_legit);
    let _ = in_ns(
        &na1,
        &[
            "arping",
            "-q",
            "-U",
            "-c",
            "2",
            "-w",
            "1",
            "-i",
            "eth0",
            "-S",
            "10.77.0.11",
            "10.77.0.11",
        ],
    );
    let _ = in_ns(
        &na1,
        &[
            "arping",
            "-q",
            "-c",
            "2",
            "-w",
            "1",
            "-i",
            "eth0",
            "-s",
            &mac_str(inst(1, 2, 1, VNI_A).mac),
            "-S",
            "10.77.0.1",
            "10.77.0.3",
        ],
    );
    let seen = cap.stop();
    assert!(seen.is_empty(), "A3 received spoofed ARP: {seen:?}");
    let neigh = in_ns_ok(&na3, &["ip", "neigh", "show", "10.77.0.11"]);
    assert!(
        !neigh.contains(&mac_str(a1.mac)),
        "A3's ARP cache poisoned: {neigh}"
    );
    let c3 = counters().await;
    assert!(c3.arp_spoof >= c2.arp_spoof + 2, "{c3:?}");

    // IPv6 (another ethertype) is dropped too.
    let _ = in_ns(
        &na1,
        &["sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=0"],
    );
    std::thread::sleep(Duration::from_millis(1500));
    let _ = in_ns(
        &na1,
        &["sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=1"],
    );
    let c4 = counters().await;
    assert!(
        c4.other_ethertype > 0,
        "IPv6 frames (DAD, RS, MLD) counted as other: {c4:?}"
    );

    // Legit traffic still flows.
    assert_eq!(
        ping(&na1, "10.77.0.11", 3, &[]),
        3,
        "legit after the spoofs"
    );
    assert_eq!(
        ping(&na1, "10.77.0.3", 3, &[]),
        3,
        "legit same-node after the spoofs"
    );
}

fn fdb(t: &Topo, node: usize, vni: u32) -> String {
    in_ns_ok(
        &t.nodes[node].ns,
        &[
            "bridge",
            "fdb",
            "show",
            "dev",
            &format!("{}x{vni}", t.nodes[node].prefix),
        ],
    )
}

fn neigh(t: &Topo, node: usize, vni: u32) -> String {
    in_ns_ok(
        &t.nodes[node].ns,
        &[
            "ip",
            "neigh",
            "show",
            "dev",
            &format!("{}x{vni}", t.nodes[node].prefix),
        ],
    )
}

#[tokio::test]
async fn remote_endpoints_reconcile_fdb_bum_and_neighbours() {
    let t = Topo::new().await;
    let n1 = &t.nodes[0].net;
    n1.ensure_network(&network(VNI_A)).await.unwrap();
    let node2 = t.nodes[1].ip;
    let node3 = std::net::Ipv4Addr::new(10, 250, 0, 3);
    let (x, y, z) = (
        inst(1, 2, 1, VNI_A),
        inst(1, 2, 2, VNI_A),
        inst(1, 2, 3, VNI_A),
    );
    n1.set_remote_endpoints(VNI_A, &[endpoint(&x, node2), endpoint(&y, node3)])
        .await
        .unwrap();
    let f = fdb(&t, 0, VNI_A);
    for want in [
        format!("{} dst {node2} self static", mac_str(x.mac)),
        format!("{} dst {node3} self static", mac_str(y.mac)),
        format!("00:00:00:00:00:00 dst {node2} self static"),
        format!("00:00:00:00:00:00 dst {node3} self static"),
        format!(
            "{} master {}b{VNI_A} static",
            mac_str(x.mac),
            t.nodes[0].prefix
        ),
    ] {
        assert!(f.contains(&want), "want {want:?} in\n{f}");
    }
    let nb = neigh(&t, 0, VNI_A);
    assert!(
        nb.contains(&format!("{} lladdr {} PERMANENT", x.ip, mac_str(x.mac))),
        "{nb}"
    );

    // Idempotent: the same list again changes nothing.
    n1.set_remote_endpoints(VNI_A, &[endpoint(&x, node2), endpoint(&y, node3)])
        .await
        .unwrap();
    assert_eq!(fdb(&t, 0, VNI_A), f);

    // y moves to node2, z appears there, x goes: node3 has nothing left, so no BUM to it.
    n1.set_remote_endpoints(VNI_A, &[endpoint(&y, node2), endpoint(&z, node2)])
        .await
        .unwrap();
    let f = fdb(&t, 0, VNI_A);
    assert!(
        f.contains(&format!("{} dst {node2} self", mac_str(y.mac))),
        "{f}"
    );
    assert!(
        f.contains(&format!("{} dst {node2} self", mac_str(z.mac))),
        "{f}"
    );
    assert!(!f.contains(&mac_str(x.mac)), "{f}");
    assert!(!f.contains(&node3.to_string()), "{f}");
    assert_eq!(f.matches("00:00:00:00:00:00").count(), 1, "{f}");
    let nb = neigh(&t, 0, VNI_A);
    assert!(
        !nb.contains(&x.ip.to_string()) && nb.contains(&z.ip.to_string()),
        "{nb}"
    );

    // An endpoint on this very node is not remote; an unknown network is an error.
    n1.set_remote_endpoints(VNI_A, &[endpoint(&x, t.nodes[0].ip)])
        .await
        .unwrap();
    let f = fdb(&t, 0, VNI_A);
    assert!(!f.contains(" self"), "all remote entries gone:\n{f}");
    assert!(!f.contains(" static"), "all bridge entries gone:\n{f}");
    assert!(neigh(&t, 0, VNI_A).trim().is_empty());
    assert!(matches!(
        n1.set_remote_endpoints(VNI_B, &[]).await,
        Err(NetError::NoNetwork { vni: VNI_B, .. })
    ));
}

#[tokio::test]
async fn attach_is_idempotent_and_removal_leaves_nothing() {
    let mut t = Topo::new().await;
    let [a1, a2, b1, _b2] = two_tenants(&t).await;
    let n1 = &t.nodes[0].net;
    let first = n1.attach(&a1).await.unwrap();
    assert_eq!(
        first.netns_path,
        std::path::Path::new(NETNS_DIR).join(t.inst_ns(&a1.key))
    );
    assert_eq!(first.host_ifname.len(), 15);
    // Same key again: the same port, still working, rules not duplicated.
    assert_eq!(n1.attach(&a1).await.unwrap(), first);
    assert_eq!(ping(&t.inst_ns(&a1.key), "10.77.0.11", 2, &[]), 2);
    let table = t.nft_table(0).unwrap();
    assert_eq!(
        table
            .matches(&format!("chain {}_in", first.host_ifname))
            .count(),
        1
    );
    assert_eq!(
        table
            .matches(&format!("ether saddr != {}", mac_str(a1.mac)))
            .count(),
        1,
        "{table}"
    );

    // No forward-hook chain until egress rules exist (it cost every bridged frame).
    assert!(!table.contains("ports_out"), "{table}");
    assert!(!table.contains("hook forward"), "{table}");
    // One left by an earlier version goes when the node's NodeNet opens again.
    let prefix = t.nodes[0].prefix.clone();
    in_ns_ok(
        &t.nodes[0].ns,
        &[
            "nft",
            &format!(
                "add chain bridge {prefix} ports_out {{ type filter hook forward priority 0; policy accept; }}; add rule bridge {prefix} ports_out oifname vmap @out_ports"
            ),
        ],
    );
    assert!(t.nft_table(0).unwrap().contains("hook forward"));

    // An agent restart: a new NodeNet finds the existing port.
    t.reopen(0).await;
    let table = t.nft_table(0).unwrap();
    assert!(!table.contains("ports_out"), "{table}");
    assert!(!table.contains("hook forward"), "{table}");
    let n1 = &t.nodes[0].net;
    assert_eq!(n1.attach(&a1).await.unwrap(), first);
    assert_eq!(ping(&t.inst_ns(&a1.key), "10.77.0.11", 2, &[]), 2);

    // Reconcile keeps A1 and network A only: B1 and network B go, entirely.
    let keep_keys: HashSet<String> = [a1.key.clone()].into();
    let keep_vnis: HashSet<u32> = [VNI_A].into();
    n1.reconcile(&keep_keys, &keep_vnis).await.unwrap();
    let links = t.our_links(0);
    assert_eq!(
        links.len(),
        3,
        "A1's port, bridge and vxlan of A only: {links:?}"
    );
    assert!(!t.our_netns(0).iter().any(|n| n.ends_with(&b1.key)));
    assert!(t.our_netns(0).contains(&t.inst_ns(&a1.key)));
    assert_eq!(
        t.our_netns(1).len(),
        2,
        "node 2 untouched: {:?}",
        t.our_netns(1)
    );
    assert_eq!(
        ping(&t.inst_ns(&a1.key), "10.77.0.11", 2, &[]),
        2,
        "kept port still works"
    );
    let table = t.nft_table(0).unwrap();
    // ports_in and A1's chain; B1's chains and map element are gone.
    assert_eq!(
        table.matches("_in {").count(),
        2,
        "only A1's chain left:\n{table}"
    );
    assert_eq!(
        table.matches(" : jump ").count(),
        1,
        "only A1's element left:\n{table}"
    );

    // Detach: port, chain, map element and namespace go; twice is fine.
    n1.detach(&a1.key).await.unwrap();
    n1.detach(&a1.key).await.unwrap();
    assert!(t.our_netns(0).is_empty(), "{:?}", t.our_netns(0));
    let table = t.nft_table(0).unwrap();
    assert!(!table.contains(&first.host_ifname), "{table}");
    assert!(!t.our_links(0).contains(&first.host_ifname));
    assert!(n1.port_counters(&a1.key).await.unwrap().is_none());

    // Teardown: nothing of the prefix remains on either node.
    for n in &t.nodes {
        n.net.teardown_all().await.unwrap();
        n.net.teardown_all().await.unwrap();
    }
    for i in 0..2 {
        assert!(t.our_links(i).is_empty(), "node {i}: {:?}", t.our_links(i));
        assert!(t.nft_table(i).is_none(), "node {i} still has the table");
        let fdb = in_ns_ok(&t.nodes[i].ns, &["bridge", "fdb", "show"]);
        assert!(
            !fdb.contains(&mac_str(a2.mac)) && !fdb.contains(&t.nodes[i].prefix),
            "node {i}: {fdb}"
        );
        assert!(t.our_netns(i).is_empty(), "node {i}: {:?}", t.our_netns(i));
    }
    // A detach after teardown is still fine (nothing to remove).
    t.nodes[0].net.detach(&a1.key).await.unwrap();
}

#[tokio::test]
async fn attach_refuses_bad_input_and_unknown_networks() {
    let t = Topo::new().await;
    let n1 = &t.nodes[0].net;
    let a = inst(1, 1, 1, VNI_A);
    assert!(matches!(
        n1.attach(&a).await,
        Err(NetError::NoNetwork { vni: VNI_A, .. })
    ));
    n1.ensure_network(&network(VNI_A)).await.unwrap();
    n1.ensure_network(&network(VNI_A)).await.unwrap();
    for bad in [
        Attachment {
            key: "../x".into(),
            ..a.clone()
        },
        Attachment {
            mac: [1, 0, 0, 0, 0, 1],
            ..a.clone()
        },
        Attachment {
            gateway: "10.78.0.1".parse().unwrap(),
            ..a.clone()
        },
        Attachment {
            vni: 0,
            ..a.clone()
        },
    ] {
        assert!(
            matches!(n1.attach(&bad).await, Err(NetError::Invalid { .. })),
            "{bad:?}"
        );
    }
    // Nothing was left behind by the refused or failed attaches.
    assert!(t.our_netns(0).is_empty());
    assert_eq!(t.our_links(0).len(), 2, "{:?}", t.our_links(0));
    n1.remove_network(VNI_A).await.unwrap();
    n1.remove_network(VNI_A).await.unwrap();
    assert!(t.our_links(0).is_empty());
}

/// A network converged once is taken as converged for `fresh` (its devices are not read
/// again); a bridge removed behind the node's back meanwhile shows as `NoNetwork` at the next
/// attach, and ensuring it once `fresh` is over, or `attach_on`, makes it anew. Removing
/// the network forgets it.
#[tokio::test]
async fn a_network_ensured_recently_is_not_read_again_and_a_lost_bridge_is_made_again() {
    let t = Topo::new().await;
    let node = &t.nodes[0];
    let n1 = &node.net;
    let (def, a) = (network(VNI_A), inst(1, 1, 1, VNI_A));
    let fresh = Duration::from_secs(60);
    n1.ensure_network_within(&def, fresh).await.unwrap();
    let bridge = format!("{}b{VNI_A}", node.prefix);
    assert!(t.our_links(0).contains(&bridge), "{:?}", t.our_links(0));

    // Removed behind its back: not seen while the network counts as fresh.
    in_ns_ok(&node.ns, &["ip", "link", "del", &bridge]);
    n1.ensure_network_within(&def, fresh).await.unwrap();
    assert!(!t.our_links(0).contains(&bridge), "{:?}", t.our_links(0));
    assert!(matches!(
        n1.attach(&a).await,
        Err(NetError::NoNetwork { vni: VNI_A, .. })
    ));
    assert!(t.our_netns(0).is_empty(), "{:?}", t.our_netns(0));
    // Past its freshness it is read, and made again.
    n1.ensure_network_within(&def, Duration::ZERO)
        .await
        .unwrap();
    assert!(t.our_links(0).contains(&bridge), "{:?}", t.our_links(0));
    // Lost again: a port attached on it (as the agent does) makes it again and is on it.
    in_ns_ok(&node.ns, &["ip", "link", "del", &bridge]);
    n1.attach_on(&def, &a, fresh).await.unwrap();
    let port = in_ns_ok(&node.ns, &["ip", "-o", "link", "show", "master", &bridge]);
    assert_eq!(
        port.lines().count(),
        2,
        "the VXLAN device and the port: {port}"
    );

    // Another definition of the same VNI is converged at once.
    let other = hive_net::NetworkDef {
        gateway: "10.77.0.253".parse().unwrap(),
        ..def.clone()
    };
    in_ns_ok(
        &node.ns,
        &["ip", "link", "del", &format!("{}x{VNI_A}", node.prefix)],
    );
    n1.ensure_network_within(&other, fresh).await.unwrap();
    assert!(
        t.our_links(0).contains(&format!("{}x{VNI_A}", node.prefix)),
        "{:?}",
        t.our_links(0)
    );

    // Removed by the node: forgotten, so the next ensure makes it.
    n1.detach(&a.key).await.unwrap();
    n1.remove_network(VNI_A).await.unwrap();
    assert!(t.our_links(0).is_empty(), "{:?}", t.our_links(0));
    n1.ensure_network_within(&other, fresh).await.unwrap();
    assert!(t.our_links(0).contains(&bridge), "{:?}", t.our_links(0));
    n1.remove_network(VNI_A).await.unwrap();
    assert!(t.our_links(0).is_empty(), "{:?}", t.our_links(0));
}

/// Rules only (no veth, no namespace) for a port that stands in for one of many instances.
fn filler(i: u32) -> Attachment {
    Attachment {
        key: format!("fill-{i}"),
        vni: VNI_A,
        ip: std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 78, 0, 1)) + i),
        prefix_len: 16,
        mac: [0x02, 0x20, 0, 0, (i >> 8) as u8, i as u8],
        gateway: std::net::Ipv4Addr::new(10, 78, 255, 254),
        qos: Default::default(),
    }
}

#[tokio::test]
async fn with_hundreds_of_ports_spoofs_are_dropped_and_removals_leave_the_rest() {
    let t = Topo::new().await;
    let [a1, _a2, _b1, _b2] = two_tenants(&t).await;
    let net = &t.nodes[0].net;
    for i in 0..300 {
        net.refresh_port_rules(&filler(i)).await.unwrap();
    }
    // A real port added after the 300, and the table's size as `nft` sees it.
    let a3 = inst(1, 1, 3, VNI_A);
    net.attach(&a3).await.unwrap();
    let (na1, na3) = (t.inst_ns(&a1.key), t.inst_ns(&a3.key));
    let table = t.nft_table(0).unwrap();
    assert_eq!(
        table.matches(" : jump ").count(),
        303,
        "a1, b1, a3, 300 fillers"
    );
    assert_eq!(
        net.port_counters(&filler(7).key).await.unwrap(),
        Some(PortCounters::default())
    );
    assert_eq!(ping(&na1, "10.77.0.11", 2, &[]), 2, "A1 -> A2 (remote)");
    assert_eq!(ping(&na3, "10.77.0.1", 2, &[]), 2, "A3 -> A1 (same node)");

    // A spoofed source MAC on A1 is dropped and counted on A1's port only.
    let c0 = net.port_counters(&a1.key).await.unwrap().unwrap();
    in_ns_ok(
        &na1,
        &["ip", "link", "set", "eth0", "address", "02:00:00:01:01:66"],
    );
    assert_eq!(ping(&na1, "10.77.0.3", 2, &[]), 0, "MAC-spoofed ping");
    in_ns_ok(
        &na1,
        &["ip", "link", "set", "eth0", "address", &mac_str(a1.mac)],
    );
    let c1 = net.port_counters(&a1.key).await.unwrap().unwrap();
    assert!(c1.l2_spoof > c0.l2_spoof, "{c1:?}");
    let c3 = net.port_counters(&a3.key).await.unwrap().unwrap();
    assert_eq!(c3.l2_spoof + c3.arp_spoof + c3.ip_spoof, 0, "{c3:?}");

    // Another port goes (A3, a real one) and so do 100 fillers: the rest keeps working.
    net.detach(&a3.key).await.unwrap();
    for i in 0..100 {
        net.detach(&filler(i).key).await.unwrap();
    }
    let table = t.nft_table(0).unwrap();
    assert_eq!(
        table.matches(" : jump ").count(),
        202,
        "a1, b1, 200 fillers"
    );
    assert!(net.port_counters(&a3.key).await.unwrap().is_none());
    assert!(net.port_counters(&filler(7).key).await.unwrap().is_none());
    assert!(net.port_counters(&filler(200).key).await.unwrap().is_some());
    assert_eq!(
        ping(&na1, "10.77.0.11", 3, &[]),
        3,
        "A1 -> A2 after removals"
    );
    // A1's rules still bite: a foreign IPv4 source (A2's MAC is resolved by now).
    in_ns_ok(&na1, &["ip", "addr", "add", "10.77.0.50/24", "dev", "eth0"]);
    assert_eq!(
        ping(&na1, "10.77.0.11", 3, &["-I", "10.77.0.50"]),
        0,
        "IP-spoofed ping after removals"
    );
    in_ns_ok(&na1, &["ip", "addr", "del", "10.77.0.50/24", "dev", "eth0"]);
    let c2 = net.port_counters(&a1.key).await.unwrap().unwrap();
    assert!(c2.ip_spoof >= c1.ip_spoof + 3, "{c2:?}");
}
