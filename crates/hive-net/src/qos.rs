//! Bandwidth: HTB trees through `tc` (a netlink encoder may replace it later; these change
//! once per instance, not per packet).
//!
//! - **Upload** (instance → other nodes): one HTB tree on the node's underlay device, made
//!   when the first port with a rate arrives: `1:1` is the link (rate = ceil = the node's
//!   link capacity), `1:2` the default class for everything unclassified (the node's own
//!   traffic: a small rate, borrowing up to the link), and `1:<minor>` per port, rate =
//!   guaranteed, ceil = max. No tc filter classifies: the port's nft chain sets
//!   `meta priority` to `1:<minor>`, the priority survives bridging and VXLAN encapsulation,
//!   and HTB takes a priority naming one of its leaf classes as the class.
//! - **Download** (→ instance): an HTB tree on the host side of the port's veth (its egress is
//!   the instance's ingress): rate = guaranteed, ceil = max. It goes with the veth.
//!
//! A port's minor is its host veth's interface index (unique on the node while the veth
//! lives, and known again from the veth at removal, so nothing needs remembering).

use std::fs::File;

use crate::{NetError, netns};

/// `1:` — the handle of both trees.
const MAJOR: u32 = 1;
/// The link class and the default class of the uplink tree.
const LINK_MINOR: u32 = 1;
const DEFAULT_MINOR: u32 = 2;
/// Explicit: tc's default `r2q` makes quantums that are "too big" at Gbit rates.
const QUANTUM: u32 = 60_000;
/// The lowest rate HTB is given (tc's own floor is 8 bit/s).
const MIN_RATE_BPS: u64 = 8_000;

/// What one port may send and receive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Qos {
    /// Bits/s always available to it.
    pub guaranteed_bps: Option<u64>,
    /// Bits/s it may reach by borrowing what others leave.
    pub max_bps: Option<u64>,
    /// Small frames (under 256 bytes) per second it may send.
    pub pps: Option<u64>,
}

impl Qos {
    /// Whether it needs HTB classes (a packet rate alone does not).
    pub fn shapes(&self) -> bool {
        self.guaranteed_bps.is_some() || self.max_bps.is_some()
    }

    /// (rate, ceil) in bits/s under a link of `link_bps`.
    fn rates(&self, link_bps: u64) -> (u64, u64) {
        let ceil = self
            .max_bps
            .unwrap_or(link_bps)
            .clamp(MIN_RATE_BPS, link_bps);
        let rate = self
            .guaranteed_bps
            .unwrap_or(MIN_RATE_BPS)
            .clamp(MIN_RATE_BPS, ceil);
        (rate, ceil)
    }
}

/// The class id (`major << 16 | minor`) of the port whose host veth has `ifindex`.
pub(crate) fn class_of(ifindex: u32) -> Result<u32, NetError> {
    let minor = ifindex & 0xffff;
    if ifindex > 0xffff || minor <= DEFAULT_MINOR {
        return Err(NetError::invalid(
            "qos",
            format!("interface index {ifindex} cannot name an HTB class (1:3 to 1:ffff)"),
        ));
    }
    Ok(MAJOR << 16 | minor)
}

fn id(class: u32) -> String {
    format!("{:x}:{:x}", class >> 16, class & 0xffff)
}

async fn tc(ns: &File, op: &str, args: &[&str], stdin: Option<String>) -> Result<String, NetError> {
    netns::run_program(ns, "tc", "iproute2", args, stdin.map(String::into_bytes))
        .await
        .map(|out| String::from_utf8_lossy(&out).into_owned())
        .map_err(|detail| NetError::Tc {
            op: op.to_owned(),
            detail,
        })
}

/// Commands run by one `tc -batch -`, all or nothing reported.
async fn batch(ns: &File, op: &str, lines: &[String]) -> Result<(), NetError> {
    let mut text = lines.join("\n");
    text.push('\n');
    tc(ns, op, &["-batch", "-"], Some(text)).await.map(drop)
}

fn htb_class(dev: &str, parent: &str, class: &str, rate: u64, ceil: u64) -> String {
    format!(
        "class replace dev {dev} parent {parent} classid {class} htb rate {rate}bit ceil {ceil}bit quantum {QUANTUM}"
    )
}

/// Whether `dev`'s root qdisc is our HTB tree.
async fn has_tree(ns: &File, dev: &str) -> Result<bool, NetError> {
    let out = tc(
        ns,
        &format!("show the qdisc of {dev}"),
        &["qdisc", "show", "dev", dev, "root"],
        None,
    )
    .await?;
    Ok(out
        .lines()
        .any(|l| l.starts_with(&format!("qdisc htb {MAJOR:x}: root"))))
}

/// Makes the uplink tree if `dev` has none yet, and sets the link class to `link_bps`.
pub(crate) async fn ensure_uplink(ns: &File, dev: &str, link_bps: u64) -> Result<(), NetError> {
    let default_rate = (link_bps / 100).max(MIN_RATE_BPS);
    let mut lines = Vec::new();
    if !has_tree(ns, dev).await? {
        lines.push(format!(
            "qdisc replace dev {dev} root handle {MAJOR:x}: htb default {DEFAULT_MINOR:x}"
        ));
    }
    let root = format!("{MAJOR:x}:");
    let link = id(MAJOR << 16 | LINK_MINOR);
    lines.push(htb_class(dev, &root, &link, link_bps, link_bps));
    lines.push(htb_class(
        dev,
        &link,
        &id(MAJOR << 16 | DEFAULT_MINOR),
        default_rate,
        link_bps,
    ));
    batch(ns, &format!("set up the uplink tree of {dev}"), &lines).await
}

/// The port's uplink class and the download tree on its host veth.
pub(crate) async fn set_port(
    ns: &File,
    uplink: &str,
    port: &str,
    class: u32,
    qos: &Qos,
    link_bps: u64,
) -> Result<(), NetError> {
    let (rate, ceil) = qos.rates(link_bps);
    let link = id(MAJOR << 16 | LINK_MINOR);
    let root = format!("{MAJOR:x}:");
    let lines = [
        htb_class(uplink, &link, &id(class), rate, ceil),
        format!("qdisc replace dev {port} root handle {MAJOR:x}: htb default 10"),
        htb_class(port, &root, &link, ceil, ceil),
        htb_class(port, &link, &id(MAJOR << 16 | 0x10), rate, ceil),
    ];
    batch(ns, &format!("set the classes of port {port}"), &lines).await
}

/// Removes the uplink class of a port (its download tree went with its veth). A class or
/// tree that is not there is no error.
pub(crate) async fn remove_port(ns: &File, uplink: &str, class: u32) -> Result<(), NetError> {
    if !has_tree(ns, uplink).await? {
        return Ok(());
    }
    let args = ["class", "del", "dev", uplink, "classid", &id(class)];
    match tc(
        ns,
        &format!("remove class {} of {uplink}", id(class)),
        &args,
        None,
    )
    .await
    {
        Err(NetError::Tc { detail, .. })
            if detail.contains("No such file") || detail.contains("Cannot find") =>
        {
            Ok(())
        }
        r => r.map(drop),
    }
}

/// The port classes (not the link or default class) of the uplink tree.
pub(crate) async fn port_classes(ns: &File, uplink: &str) -> Result<Vec<u32>, NetError> {
    if !has_tree(ns, uplink).await? {
        return Ok(Vec::new());
    }
    let out = tc(
        ns,
        &format!("list the classes of {uplink}"),
        &["class", "show", "dev", uplink],
        None,
    )
    .await?;
    Ok(out
        .lines()
        .filter_map(|l| l.strip_prefix("class htb "))
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|c| {
            let (major, minor) = c.split_once(':')?;
            let (major, minor) = (
                u32::from_str_radix(major, 16).ok()?,
                u32::from_str_radix(minor, 16).ok()?,
            );
            (major == MAJOR && minor > DEFAULT_MINOR).then_some(major << 16 | minor)
        })
        .collect())
}

/// Removes the uplink tree (teardown), if it is ours.
pub(crate) async fn remove_uplink(ns: &File, uplink: &str) -> Result<(), NetError> {
    if !has_tree(ns, uplink).await? {
        return Ok(());
    }
    tc(
        ns,
        &format!("remove the tree of {uplink}"),
        &["qdisc", "del", "dev", uplink, "root"],
        None,
    )
    .await
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_named_by_interface_index() {
        assert_eq!(class_of(3).unwrap(), 0x0001_0003);
        assert_eq!(id(class_of(0x1234).unwrap()), "1:1234");
        for bad in [0, 1, 2, 0x1_0000, 0x1_0005] {
            assert!(class_of(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rates_borrow_up_to_max_within_the_link() {
        let link = 1_000_000_000;
        let q = |g, m| Qos {
            guaranteed_bps: g,
            max_bps: m,
            pps: None,
        };
        assert_eq!(
            q(Some(300_000_000), Some(600_000_000)).rates(link),
            (300_000_000, 600_000_000)
        );
        assert_eq!(q(Some(300_000_000), None).rates(link), (300_000_000, link));
        assert_eq!(
            q(None, Some(50_000_000)).rates(link),
            (MIN_RATE_BPS, 50_000_000)
        );
        // Above the link: held to it; a guarantee above the max: held to the max.
        assert_eq!(q(Some(2 * link), Some(3 * link)).rates(link), (link, link));
        assert_eq!(
            q(Some(500), Some(100_000)).rates(link),
            (MIN_RATE_BPS, 100_000)
        );
        assert!(!q(None, None).shapes());
    }
}
