//! Netlink (rtnetlink) requests the data plane needs: links, addresses, routes, FDB and
//! neighbour entries. Thin, typed wrappers; no policy. Every function works on whatever
//! namespace the handle's socket is bound to.

use std::net::Ipv4Addr;

use futures_util::{StreamExt, TryStreamExt};
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_ECHO, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
    NetlinkMessage, NetlinkPayload,
};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder,
};

use crate::NetError;
use crate::error::netlink_errno;

pub(crate) const VXLAN_PORT: u16 = 4789;
const ENODEV: i32 = 19;
const ENOENT: i32 = 2;
const EEXIST: i32 = 17;
const NUD_REACHABLE: u16 = 0x02;
const NUD_NOARP: u16 = 0x40;

/// What we read back about a link.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    pub(crate) index: u32,
    pub(crate) name: String,
    pub(crate) mtu: u32,
    pub(crate) up: bool,
    pub(crate) controller: Option<u32>,
    pub(crate) kind: Option<InfoKind>,
    pub(crate) vxlan: Vec<InfoVxlan>,
}

impl Link {
    fn from_msg(m: LinkMessage) -> Self {
        let mut l = Link {
            index: m.header.index,
            name: String::new(),
            mtu: 0,
            up: m.header.flags.contains(LinkFlags::Up),
            controller: None,
            kind: None,
            vxlan: Vec::new(),
        };
        for a in m.attributes {
            match a {
                LinkAttribute::IfName(n) => l.name = n,
                LinkAttribute::Mtu(v) => l.mtu = v,
                LinkAttribute::Controller(c) => l.controller = Some(c),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        match i {
                            LinkInfo::Kind(k) => l.kind = Some(k),
                            LinkInfo::Data(InfoData::Vxlan(v)) => l.vxlan = v,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        l
    }

    pub(crate) fn vxlan_matches(&self, vni: u32, local: Ipv4Addr, dev: u32) -> bool {
        let has = |want: &InfoVxlan| self.vxlan.iter().any(|v| v == want);
        has(&InfoVxlan::Id(vni))
            && has(&InfoVxlan::Local(local))
            && has(&InfoVxlan::Link(dev))
            && has(&InfoVxlan::Port(VXLAN_PORT))
            && has(&InfoVxlan::Learning(false))
            && has(&InfoVxlan::Proxy(true))
    }
}

fn is(e: &rtnetlink::Error, errno: i32) -> bool {
    netlink_errno(e) == Some(errno)
}

pub(crate) async fn get(h: &Handle, name: &str) -> Result<Option<Link>, NetError> {
    let mut s = h.link().get().match_name(name.to_owned()).execute();
    match s.try_next().await {
        Ok(m) => Ok(m.map(Link::from_msg)),
        Err(e) if is(&e, ENODEV) => Ok(None),
        Err(e) => Err(NetError::netlink(format!("get link {name}"), e)),
    }
}

pub(crate) async fn list(h: &Handle) -> Result<Vec<Link>, NetError> {
    h.link()
        .get()
        .execute()
        .map_ok(Link::from_msg)
        .try_collect()
        .await
        .map_err(|e| NetError::netlink("list links", e))
}

async fn add(h: &Handle, what: String, msg: LinkMessage) -> Result<(), NetError> {
    h.link()
        .add(msg)
        .execute()
        .await
        .map_err(|e| NetError::netlink(what, e))
}

async fn set(h: &Handle, what: String, msg: LinkMessage) -> Result<(), NetError> {
    h.link()
        .set(msg)
        .execute()
        .await
        .map_err(|e| NetError::netlink(what, e))
}

/// A bridge, created down (callers bring it up once it is configured).
pub(crate) async fn add_bridge(h: &Handle, name: &str, mtu: u32) -> Result<(), NetError> {
    let msg = LinkMessageBuilder::<LinkBridge>::new(name).mtu(mtu).build();
    add(h, format!("create bridge {name}"), msg).await
}

/// A VXLAN device: no learning, ARP answered locally from its neighbour table (`proxy`),
/// remote endpoints only from static FDB entries; enslaved to `bridge`, created down.
pub(crate) async fn add_vxlan(
    h: &Handle,
    name: &str,
    vni: u32,
    local: Ipv4Addr,
    dev: u32,
    mtu: u32,
    bridge: u32,
) -> Result<(), NetError> {
    let msg = LinkVxlan::new(name, vni)
        .local(local)
        .port(VXLAN_PORT)
        .dev(dev)
        .learning(false)
        .proxy(true)
        .mtu(mtu)
        .controller(bridge)
        .build();
    add(h, format!("create vxlan {name} (vni {vni})"), msg).await
}

/// A veth pair whose peer is created directly inside the namespace `peer_ns` with its
/// final name, MAC and MTU; the host side is enslaved to `bridge` and left down. Returns
/// the host side as the kernel echoes it (`NLM_F_ECHO`, kernels since 6.3), or None from a
/// kernel that does not. (The echo is sent before the kernel enslaves the device, so it
/// names no controller: the request succeeding says it is `bridge`.)
#[allow(clippy::too_many_arguments)]
pub(crate) async fn add_veth(
    h: &Handle,
    host: &str,
    peer: &str,
    peer_ns: std::os::fd::RawFd,
    mac: [u8; 6],
    mtu: u32,
    bridge: u32,
) -> Result<Option<Link>, NetError> {
    let peer_msg = LinkUnspec::new_with_name(peer)
        .address(mac.to_vec())
        .mtu(mtu)
        .setns_by_fd(peer_ns)
        .build();
    let msg = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(host.to_owned())
        .mtu(mtu)
        .controller(bridge)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
        .build();
    let what = format!("create veth {host}");
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewLink(msg));
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL | NLM_F_ECHO;
    let mut resp = h
        .clone()
        .request(req)
        .map_err(|e| NetError::netlink(what.clone(), e))?;
    let mut made = None;
    while let Some(m) = resp.next().await {
        match m.payload {
            NetlinkPayload::Error(e) if e.code.is_some() => {
                return Err(NetError::netlink(what, rtnetlink::Error::NetlinkError(e)));
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => {
                made = Some(Link {
                    controller: Some(bridge),
                    ..Link::from_msg(l)
                });
            }
            _ => {}
        }
    }
    Ok(made.filter(|l| l.name == host))
}

/// A veth pair whose peer is created directly inside `peer_ns` as `peer`; the host side is
/// on no bridge and left down.
pub(crate) async fn add_veth_pair(
    h: &Handle,
    host: &str,
    peer: &str,
    peer_ns: std::os::fd::RawFd,
    mtu: u32,
) -> Result<(), NetError> {
    let peer_msg = LinkUnspec::new_with_name(peer)
        .mtu(mtu)
        .setns_by_fd(peer_ns)
        .build();
    let msg = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(host.to_owned())
        .mtu(mtu)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
        .build();
    add(h, format!("create veth {host}"), msg).await
}

/// The IPv4 addresses of one link (or of all), as (link index, address).
pub(crate) async fn ipv4_addresses(
    h: &Handle,
    index: Option<u32>,
) -> Result<Vec<(u32, Ipv4Addr)>, NetError> {
    use rtnetlink::packet_route::address::AddressAttribute;
    let mut req = h.address().get();
    if let Some(i) = index {
        req = req.set_link_index_filter(i);
    }
    let msgs: Vec<_> = req
        .execute()
        .try_collect()
        .await
        .map_err(|e| NetError::netlink("list addresses", e))?;
    Ok(msgs
        .into_iter()
        .flat_map(|m| {
            let idx = m.header.index;
            m.attributes.into_iter().filter_map(move |a| match a {
                AddressAttribute::Address(std::net::IpAddr::V4(ip)) => Some((idx, ip)),
                _ => None,
            })
        })
        .collect())
}

pub(crate) async fn set_up(h: &Handle, index: u32, name: &str) -> Result<(), NetError> {
    set(
        h,
        format!("set {name} up"),
        LinkUnspec::new_with_index(index).up().build(),
    )
    .await
}

/// Renames veth `index` (its host side, down) to `name` and puts it on `bridge` with `mtu`, in
/// one message; returns it as it now is (still down: the kernel renames no link that is up),
/// with no read back.
pub(crate) async fn rename_veth_onto(
    h: &Handle,
    index: u32,
    name: &str,
    mtu: u32,
    bridge: u32,
) -> Result<Link, NetError> {
    let msg = LinkUnspec::new_with_index(index)
        .name(name.to_owned())
        .mtu(mtu)
        .controller(bridge)
        .build();
    set(
        h,
        format!("rename link {index} to {name} on bridge {bridge}"),
        msg,
    )
    .await?;
    Ok(Link {
        index,
        name: name.to_owned(),
        mtu,
        up: false,
        controller: Some(bridge),
        kind: Some(InfoKind::Veth),
        vxlan: Vec::new(),
    })
}

pub(crate) async fn set_address(
    h: &Handle,
    index: u32,
    name: &str,
    mac: [u8; 6],
) -> Result<(), NetError> {
    let msg = LinkUnspec::new_with_index(index)
        .address(mac.to_vec())
        .build();
    set(h, format!("set the address of {name}"), msg).await
}

pub(crate) async fn set_mtu_controller(
    h: &Handle,
    index: u32,
    name: &str,
    mtu: u32,
    controller: Option<u32>,
) -> Result<(), NetError> {
    let mut b = LinkUnspec::new_with_index(index).mtu(mtu);
    if let Some(c) = controller {
        b = b.controller(c);
    }
    set(h, format!("set mtu/master of {name}"), b.build()).await
}

/// Deletes a link; a missing one is fine.
pub(crate) async fn del(h: &Handle, index: u32, name: &str) -> Result<(), NetError> {
    match h.link().del(index).execute().await {
        Ok(()) => Ok(()),
        Err(e) if is(&e, ENODEV) => Ok(()),
        Err(e) => Err(NetError::netlink(format!("delete link {name}"), e)),
    }
}

pub(crate) async fn del_by_name(h: &Handle, name: &str) -> Result<(), NetError> {
    match get(h, name).await? {
        Some(l) => del(h, l.index, name).await,
        None => Ok(()),
    }
}

pub(crate) async fn add_address(
    h: &Handle,
    index: u32,
    ip: Ipv4Addr,
    prefix_len: u8,
    ifname: &str,
) -> Result<(), NetError> {
    h.address()
        .add(index, ip.into(), prefix_len)
        .replace()
        .execute()
        .await
        .map_err(|e| NetError::netlink(format!("add address {ip}/{prefix_len} to {ifname}"), e))
}

pub(crate) async fn replace_default_route(
    h: &Handle,
    gateway: Ipv4Addr,
    oif: u32,
) -> Result<(), NetError> {
    let msg = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(gateway)
        .output_interface(oif)
        .build();
    h.route()
        .add(msg)
        .replace()
        .execute()
        .await
        .map_err(|e| NetError::netlink(format!("default route via {gateway}"), e))
}

// ---- FDB and neighbour entries ------------------------------------------------------------

/// A static FDB entry of the VXLAN device (`self`): frames for `mac` go to VTEP `dst`.
/// The all-zero MAC with several `dst` is the head-end replication list for BUM traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct FdbSelf {
    pub(crate) mac: [u8; 6],
    pub(crate) dst: Ipv4Addr,
}

/// What the VXLAN device's forwarding state holds now.
#[derive(Debug, Default)]
pub(crate) struct VxlanState {
    pub(crate) fdb_self: Vec<FdbSelf>,
    /// Static `master` entries on the bridge for the VXLAN port.
    pub(crate) fdb_master: Vec<[u8; 6]>,
    /// Permanent IPv4 neighbours (ARP suppression answers).
    pub(crate) neigh: Vec<(Ipv4Addr, [u8; 6])>,
}

fn mac_of(attrs: &[NeighbourAttribute]) -> Option<[u8; 6]> {
    attrs.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(l) => <[u8; 6]>::try_from(l.as_slice()).ok(),
        _ => None,
    })
}

fn dst_of(attrs: &[NeighbourAttribute]) -> Option<Ipv4Addr> {
    attrs.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
            <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
        }
        _ => None,
    })
}

pub(crate) async fn vxlan_state(h: &Handle, vxlan: u32) -> Result<VxlanState, NetError> {
    let mut st = VxlanState::default();
    let fdb: Vec<NeighbourMessage> = h
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Bridge)
        .execute()
        .try_collect()
        .await
        .map_err(|e| NetError::netlink("dump fdb", e))?;
    for m in fdb.into_iter().filter(|m| m.header.ifindex == vxlan) {
        let Some(mac) = mac_of(&m.attributes) else {
            continue;
        };
        // Bridge entries carry NDA_MASTER (and no NTF_MASTER flag) in dumps.
        let master = m.header.flags.contains(NeighbourFlags::Controller)
            || m.attributes
                .iter()
                .any(|a| matches!(a, NeighbourAttribute::Controller(_)));
        if master {
            // The bridge's own permanent entry for the port's address is not ours.
            if m.header.state == NeighbourState::Noarp {
                st.fdb_master.push(mac);
            }
        } else if let Some(dst) = dst_of(&m.attributes) {
            st.fdb_self.push(FdbSelf { mac, dst });
        }
    }
    let neigh: Vec<NeighbourMessage> = h
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Inet)
        .execute()
        .try_collect()
        .await
        .map_err(|e| NetError::netlink("dump neighbours", e))?;
    for m in neigh.into_iter().filter(|m| m.header.ifindex == vxlan) {
        if let (Some(ip), Some(mac)) = (dst_of(&m.attributes), mac_of(&m.attributes)) {
            st.neigh.push((ip, mac));
        }
    }
    Ok(st)
}

async fn request(
    h: &Handle,
    what: String,
    msg: RouteNetlinkMessage,
    flags: u16,
) -> Result<(), NetError> {
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    let mut resp = h
        .clone()
        .request(req)
        .map_err(|e| NetError::netlink(what.clone(), e))?;
    while let Some(m) = resp.next().await {
        if let NetlinkPayload::Error(e) = m.payload
            && e.code.is_some()
        {
            return Err(NetError::netlink(what, rtnetlink::Error::NetlinkError(e)));
        }
    }
    Ok(())
}

fn fdb_msg(
    index: u32,
    mac: [u8; 6],
    flags: NeighbourFlags,
    dst: Option<Ipv4Addr>,
) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = index;
    // What `bridge fdb … static` sends: NOARP|REACHABLE. The bridge makes it a static (not
    // local) entry; vxlan insists on PERMANENT or REACHABLE.
    m.header.state = NeighbourState::Other(NUD_NOARP | NUD_REACHABLE);
    m.header.flags = flags;
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    if let Some(ip) = dst {
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
    }
    m
}

fn fmt_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `bridge fdb replace|append MAC dev VXLAN dst DST self static`.
pub(crate) async fn add_fdb_self(h: &Handle, vxlan: u32, e: FdbSelf) -> Result<(), NetError> {
    // Unicast MACs have one VTEP (replace moves it); the zero MAC lists many (append).
    let mode = if e.mac == [0; 6] {
        NLM_F_APPEND
    } else {
        NLM_F_REPLACE
    };
    let msg = fdb_msg(vxlan, e.mac, NeighbourFlags::Own, Some(e.dst));
    request(
        h,
        format!("add fdb {} dst {}", fmt_mac(e.mac), e.dst),
        RouteNetlinkMessage::NewNeighbour(msg),
        NLM_F_CREATE | mode,
    )
    .await
}

pub(crate) async fn del_fdb_self(h: &Handle, vxlan: u32, e: FdbSelf) -> Result<(), NetError> {
    let msg = fdb_msg(vxlan, e.mac, NeighbourFlags::Own, Some(e.dst));
    tolerate_missing(
        request(
            h,
            format!("delete fdb {} dst {}", fmt_mac(e.mac), e.dst),
            RouteNetlinkMessage::DelNeighbour(msg),
            0,
        )
        .await,
    )
}

/// `bridge fdb replace MAC dev VXLAN master static`.
pub(crate) async fn add_fdb_master(h: &Handle, vxlan: u32, mac: [u8; 6]) -> Result<(), NetError> {
    let msg = fdb_msg(vxlan, mac, NeighbourFlags::Controller, None);
    request(
        h,
        format!("add bridge fdb {}", fmt_mac(mac)),
        RouteNetlinkMessage::NewNeighbour(msg),
        NLM_F_CREATE | NLM_F_REPLACE,
    )
    .await
}

pub(crate) async fn del_fdb_master(h: &Handle, vxlan: u32, mac: [u8; 6]) -> Result<(), NetError> {
    let msg = fdb_msg(vxlan, mac, NeighbourFlags::Controller, None);
    tolerate_missing(
        request(
            h,
            format!("delete bridge fdb {}", fmt_mac(mac)),
            RouteNetlinkMessage::DelNeighbour(msg),
            0,
        )
        .await,
    )
}

fn neigh_msg(index: u32, ip: Ipv4Addr, mac: Option<[u8; 6]>) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.ifindex = index;
    m.header.state = NeighbourState::Permanent;
    m.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
    if let Some(mac) = mac {
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    }
    m
}

/// `ip neigh replace IP lladdr MAC dev VXLAN nud permanent`.
pub(crate) async fn set_neigh(
    h: &Handle,
    vxlan: u32,
    ip: Ipv4Addr,
    mac: [u8; 6],
) -> Result<(), NetError> {
    request(
        h,
        format!("add neighbour {ip} lladdr {}", fmt_mac(mac)),
        RouteNetlinkMessage::NewNeighbour(neigh_msg(vxlan, ip, Some(mac))),
        NLM_F_CREATE | NLM_F_REPLACE,
    )
    .await
}

pub(crate) async fn del_neigh(h: &Handle, vxlan: u32, ip: Ipv4Addr) -> Result<(), NetError> {
    tolerate_missing(
        request(
            h,
            format!("delete neighbour {ip}"),
            RouteNetlinkMessage::DelNeighbour(neigh_msg(vxlan, ip, None)),
            0,
        )
        .await,
    )
}

fn tolerate_missing(r: Result<(), NetError>) -> Result<(), NetError> {
    match r {
        Err(e) if matches!(e.errno(), Some(ENOENT) | Some(ENODEV)) => Ok(()),
        r => r,
    }
}

/// Whether an error says the object already exists.
pub(crate) fn is_exists(e: &NetError) -> bool {
    e.errno() == Some(EEXIST)
}
