//! Prints how long the data plane's per-instance operations take on this machine (root):
//!
//! - `attach` / `detach` of 50 instances on an empty node (p50, p90, max);
//! - adding and removing one port's nft rules with ~1000 ports' rules installed, and a
//!   full `attach` / `detach` at that size.
//!
//! `cargo run -p hive-net --example netbench [ports]` (default 1000). It builds the same
//! throwaway two-node topology as the integration tests and removes it when done.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Topo, inst, network};

const VNI: u32 = 4201;

fn stats(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let pick = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    println!(
        "{name:<44} n={:<4} p50 {:>7.2} ms  p90 {:>7.2} ms  max {:>7.2} ms",
        v.len(),
        pick(0.5).as_secs_f64() * 1e3,
        pick(0.9).as_secs_f64() * 1e3,
        v[v.len() - 1].as_secs_f64() * 1e3
    );
}

fn attachment(i: u32) -> hive_net::Attachment {
    let mut a = inst(1, 1, 1, VNI);
    a.key = format!("bench-{i}");
    a.ip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 78, 0, 1)) + i);
    a.prefix_len = 16;
    a.gateway = std::net::Ipv4Addr::new(10, 78, 255, 254);
    a.mac = [0x02, 0x10, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8];
    a
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let ports: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let t = Topo::new().await;
    let net = &t.nodes[0].net;
    let mut def = network(VNI);
    def.subnet = hive_net::Ipv4Subnet::new(std::net::Ipv4Addr::new(10, 78, 0, 0), 16).unwrap();
    def.gateway = std::net::Ipv4Addr::new(10, 78, 255, 254);
    net.ensure_network(&def).await.unwrap();
    println!(
        "load average: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );

    // Warm-up (first nft run, page cache).
    net.attach(&attachment(60_000)).await.unwrap();
    net.detach("bench-60000").await.unwrap();

    let (mut att, mut det) = (Vec::new(), Vec::new());
    for i in 0..50 {
        let t0 = Instant::now();
        net.attach(&attachment(i)).await.unwrap();
        att.push(t0.elapsed());
    }
    for i in 0..50 {
        let t0 = Instant::now();
        net.detach(&format!("bench-{i}")).await.unwrap();
        det.push(t0.elapsed());
    }
    stats("attach, empty node", att);
    stats("detach, empty node", det);

    // ~1000 ports' rules (chains + map elements), installed one port per transaction.
    let t0 = Instant::now();
    for i in 0..ports {
        net.refresh_port_rules(&attachment(1000 + i)).await.unwrap();
    }
    println!(
        "installed {ports} ports' rules in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let (mut add, mut del, mut att, mut det) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..20 {
        let a = attachment(61_000 + i);
        let t0 = Instant::now();
        net.refresh_port_rules(&a).await.unwrap();
        add.push(t0.elapsed());
        let t0 = Instant::now();
        net.detach(&a.key).await.unwrap();
        del.push(t0.elapsed());
    }
    for i in 0..20 {
        let a = attachment(62_000 + i);
        let t0 = Instant::now();
        net.attach(&a).await.unwrap();
        att.push(t0.elapsed());
        let t0 = Instant::now();
        net.detach(&a.key).await.unwrap();
        det.push(t0.elapsed());
    }
    stats(&format!("add one port's rules, {ports} installed"), add);
    stats(
        &format!("remove one port (rules only), {ports} installed"),
        del,
    );
    stats(&format!("attach, {ports} ports' rules installed"), att);
    stats(&format!("detach, {ports} ports' rules installed"), det);

    let t0 = Instant::now();
    net.teardown_all().await.unwrap();
    println!(
        "teardown_all with {ports} ports' rules: {:.2} s",
        t0.elapsed().as_secs_f64()
    );
}
