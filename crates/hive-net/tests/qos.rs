//! Bandwidth and packet rate of ports under contention, measured with iperf3 between two
//! namespace nodes whose links are set to 200 Mbit/s (so CPU is never the bottleneck):
//! guarantees hold, idle bandwidth is borrowed up to the maximum, the maximum caps, the
//! packet rate limit holds on small frames while bulk TCP from the same port is untouched,
//! and removal leaves no class behind. Needs root, iproute2's `tc` and iperf3.

mod common;

use std::process::{Child, Stdio};
use std::time::Duration;

use common::*;
use hive_net::{Attachment, Qos};

const VNI_A: u32 = 4201;
const VNI_B: u32 = 4202;
const LINK: u64 = 200_000_000;
/// TCP payload per wire byte HTB counts at the uplink: 1398 of a 1514-byte outer frame
/// (inner MTU 1450 less IP and TCP headers with timestamps; VXLAN, UDP, IP and Ethernet
/// outside).
const GOODPUT: f64 = 1398.0 / 1514.0;

fn qos(g: Option<u64>, max: Option<u64>, pps: Option<u64>) -> Qos {
    Qos {
        guaranteed_bps: g,
        max_bps: max,
        pps,
    }
}

fn iperf_server(ns: &str, port: u16) -> Server {
    let child = hive_net::testbed::ns_command(ns, "iperf3")
        .args(["-s", "-1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start iperf3 -s");
    std::thread::sleep(Duration::from_millis(300));
    Server(child)
}

/// Starts an iperf3 client; its JSON report when waited for.
fn iperf_client(ns: &str, dst: &str, port: u16, secs: u32, extra: &[&str]) -> Child {
    hive_net::testbed::ns_command(ns, "iperf3")
        .args([
            "-c",
            dst,
            "-p",
            &port.to_string(),
            "-t",
            &secs.to_string(),
            "-O",
            "1",
            "-J",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start iperf3 -c")
}

fn report(c: Child) -> serde_json::Value {
    let out = c.wait_with_output().expect("iperf3 -c");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(
        out.status.success() && v["error"].is_null(),
        "iperf3: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    v
}

/// TCP goodput in Mbit/s as the receiver saw it.
fn mbit(v: &serde_json::Value) -> f64 {
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("sum_received")
        / 1e6
}

fn within(got: f64, want: f64, tolerance: f64) -> bool {
    (got - want).abs() <= want * tolerance
}

async fn endpoints(t: &Topo, vni: u32, a: &Attachment, b: &Attachment) {
    let eps = [endpoint(a, t.nodes[0].ip), endpoint(b, t.nodes[1].ip)];
    for n in &t.nodes {
        n.net.set_remote_endpoints(vni, &eps).await.unwrap();
    }
}

fn uplink_classes(t: &Topo) -> String {
    in_ns_ok(
        &t.nodes[0].ns,
        &["tc", "class", "show", "dev", &t.nodes[0].dev],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guarantees_hold_idle_bandwidth_is_borrowed_max_caps_and_pps_limits_small_frames() {
    let t = Topo::with_link(LINK).await;
    for n in &t.nodes {
        n.net.ensure_network(&network(VNI_A)).await.unwrap();
        n.net.ensure_network(&network(VNI_B)).await.unwrap();
    }
    // Two tenants' senders on node 1: A guaranteed 150 of the 200 Mbit/s, B 50 with a
    // maximum of 80. Receivers on node 2.
    let mut a1 = inst(1, 1, 1, VNI_A);
    a1.qos = qos(Some(150_000_000), Some(LINK), None);
    let mut b1 = inst(2, 1, 1, VNI_B);
    b1.qos = qos(Some(50_000_000), Some(80_000_000), None);
    let (a2, b2) = (inst(1, 2, 1, VNI_A), inst(2, 2, 1, VNI_B));
    for (a, node) in [(&a1, 0), (&a2, 1), (&b1, 0), (&b2, 1)] {
        t.nodes[node].net.attach(a).await.unwrap();
    }
    endpoints(&t, VNI_A, &a1, &a2).await;
    endpoints(&t, VNI_B, &b1, &b2).await;
    let (na1, na2, nb1, nb2) = (
        t.inst_ns(&a1.key),
        t.inst_ns(&a2.key),
        t.inst_ns(&b1.key),
        t.inst_ns(&b2.key),
    );
    let classes = uplink_classes(&t);
    assert!(classes.contains("rate 150Mbit ceil 200Mbit"), "{classes}");
    assert!(classes.contains("rate 50Mbit ceil 80Mbit"), "{classes}");
    let dst = |a: &Attachment| a.ip.to_string();

    // Alone, A borrows what B leaves: well above its guarantee, up to the link.
    let _s = iperf_server(&na2, 5201);
    let alone_a = mbit(&report(iperf_client(&na1, &dst(&a2), 5201, 3, &[])));
    let link_goodput = LINK as f64 / 1e6 * GOODPUT;
    assert!(
        alone_a > 150.0 * GOODPUT * 1.1 && alone_a <= link_goodput * 1.05,
        "A alone: {alone_a:.1} Mbit/s"
    );
    // Alone, B is capped at its maximum.
    let _s = iperf_server(&nb2, 5202);
    let alone_b = mbit(&report(iperf_client(&nb1, &dst(&b2), 5202, 3, &[])));
    assert!(
        within(alone_b, 80.0 * GOODPUT, 0.05),
        "B alone: {alone_b:.1} Mbit/s, max 80 ({:.1} of goodput)",
        80.0 * GOODPUT
    );
    // Together, each gets its guarantee (they add up to the link).
    let (_sa, _sb) = (iperf_server(&na2, 5203), iperf_server(&nb2, 5204));
    let ca = iperf_client(&na1, &dst(&a2), 5203, 4, &[]);
    let cb = iperf_client(&nb1, &dst(&b2), 5204, 4, &[]);
    let (both_a, both_b) = (mbit(&report(ca)), mbit(&report(cb)));
    assert!(
        within(both_a, 150.0 * GOODPUT, 0.05) && within(both_b, 50.0 * GOODPUT, 0.05),
        "contention: A {both_a:.1} (guaranteed {:.1}), B {both_b:.1} (guaranteed {:.1}) Mbit/s",
        150.0 * GOODPUT,
        50.0 * GOODPUT
    );

    // A packet rate of 2000/s on small frames: a UDP flood of 64-byte datagrams arrives at
    // that rate, the rest is dropped and counted; bulk TCP from the same port is not slowed.
    let mut p1 = inst(1, 1, 2, VNI_A);
    p1.qos = qos(None, None, Some(2000));
    t.nodes[0].net.attach(&p1).await.unwrap();
    endpoints(&t, VNI_A, &p1, &a2).await;
    let np1 = t.inst_ns(&p1.key);
    let _s = iperf_server(&na2, 5205);
    let udp = report(iperf_client(
        &np1,
        &dst(&a2),
        5205,
        3,
        &["-u", "-b", "0", "-l", "64"],
    ));
    // Over the 3 measured seconds (its `seconds` also counts the drain after the end).
    let sum = &udp["end"]["sum_received"];
    let received = sum["bytes"].as_f64().unwrap() / 64.0;
    let pps = received / 3.0;
    assert!(
        within(pps, 2000.0, 0.05),
        "{pps:.0} small packets/s arrived, limit 2000: {sum}"
    );
    let dropped = t.nodes[0]
        .net
        .port_counters(&p1.key)
        .await
        .unwrap()
        .unwrap();
    assert!(dropped.pps_limited > 1000, "{dropped:?}");
    let _s = iperf_server(&na2, 5206);
    let bulk = mbit(&report(iperf_client(&np1, &dst(&a2), 5206, 2, &[])));
    assert!(
        bulk > 100.0,
        "bulk TCP behind the packet limit: {bulk:.1} Mbit/s"
    );

    // Removal leaves only the link and default classes; teardown leaves no tree.
    for (a, node) in [(&a1, 0), (&b1, 0), (&p1, 0)] {
        t.nodes[node].net.detach(&a.key).await.unwrap();
    }
    let classes = uplink_classes(&t);
    assert_eq!(classes.lines().count(), 2, "{classes}");
    t.nodes[0].net.teardown_all().await.unwrap();
    let qdisc = in_ns_ok(
        &t.nodes[0].ns,
        &["tc", "qdisc", "show", "dev", &t.nodes[0].dev],
    );
    assert!(!qdisc.contains("htb"), "{qdisc}");
    eprintln!(
        "qos: A alone {alone_a:.1}, B alone {alone_b:.1}, together A {both_a:.1} B {both_b:.1} Mbit/s; \
         small frames {pps:.0}/s (limit 2000), bulk TCP {bulk:.1} Mbit/s"
    );
}
