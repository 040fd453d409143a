//! nf_tables over netlink, encoded by hand: the per-port hot path.
//!
//! `nft` (binary or libnftables) loads every chain, rule and set element of the table
//! before it applies a batch that adds anything, so with 1000 ports each change cost
//! ~10 ms of cache load on top of ~2.5 ms of process start. Here a batch of
//! `NFT_MSG_NEWCHAIN`/`NEWRULE`/`NEWSETELEM`/… messages is encoded directly and sent on one
//! long-lived `NETLINK_NETFILTER` socket bound to the node's namespace: one kernel
//! transaction, no ruleset read, cost independent of the number of ports.
//!
//! This module knows the wire format (a small subset of `linux/netfilter/nf_tables.h`) and
//! nothing of Hive's layout: `nft.rs` says which chains and rules exist. Objects are
//! addressed by name, so everything `nft` created (the table, its maps) is usable here.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use rtnetlink::sys::Socket;
use rtnetlink::sys::protocols::NETLINK_NETFILTER;

use crate::NetError;

const NLMSG_HDR: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;

const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_DELSETELEM: u16 = 14;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DATA_TYPE: u16 = 6;
const NFTA_SET_DATA_LEN: u16 = 7;
const NFTA_SET_ID: u16 = 10;
const NFT_SET_MAP: u32 = 0x8;
const NFTA_LOOKUP_SET: u16 = 1;
const NFTA_LOOKUP_SREG: u16 = 2;
const NFTA_LOOKUP_DREG: u16 = 3;
const NFTA_REJECT_TYPE: u16 = 1;
const NFTA_REJECT_ICMP_CODE: u16 = 2;
const NFT_REJECT_ICMP_UNREACH: u32 = 0;
const NFT_REJECT_TCP_RST: u32 = 1;
/// ICMP "port unreachable", what `reject` sends by default.
const ICMP_PORT_UNREACH: u8 = 3;
const NFTA_NG_DREG: u16 = 1;
const NFTA_NG_MODULUS: u16 = 2;
const NFTA_NG_TYPE: u16 = 3;
const NFT_NG_RANDOM: u32 = 1;
const NFTA_NAT_TYPE: u16 = 1;
const NFTA_NAT_FAMILY: u16 = 2;
const NFTA_NAT_REG_ADDR_MIN: u16 = 3;
const NFTA_NAT_REG_PROTO_MIN: u16 = 5;
const NFTA_NAT_FLAGS: u16 = 7;
const NFT_NAT_DNAT: u32 = 1;
/// `NF_NAT_RANGE_MAP_IPS | NF_NAT_RANGE_PROTO_SPECIFIED`: an address and a port.
const NF_NAT_RANGE_ADDR_PORT: u32 = 1 | 2;
const NFPROTO_IPV4: u32 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFTA_META_SREG: u16 = 3;
const NFTA_BYTEORDER_SREG: u16 = 1;
const NFTA_BYTEORDER_DREG: u16 = 2;
const NFTA_BYTEORDER_OP: u16 = 3;
const NFTA_BYTEORDER_LEN: u16 = 4;
const NFTA_BYTEORDER_SIZE: u16 = 5;
const NFT_BYTEORDER_HTON: u32 = 1;
const NFTA_LIMIT_RATE: u16 = 1;
const NFTA_LIMIT_UNIT: u16 = 2;
const NFTA_LIMIT_BURST: u16 = 3;
const NFTA_LIMIT_TYPE: u16 = 4;
const NFTA_LIMIT_FLAGS: u16 = 5;
const NFT_LIMIT_PKTS: u32 = 0;
const NFT_LIMIT_F_INV: u32 = 1;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_COUNTER_PACKETS: u16 = 2;
const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFT_CT_STATE: u32 = 0;
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;
/// libnftnl's user-data TLV type for a rule comment (what `nft` shows as `comment "…"`).
const NFTNL_UDATA_RULE_COMMENT: u8 = 0;

const NFT_REG_VERDICT: u32 = 0;
pub(crate) const NFT_REG_1: u32 = 1;
const NFT_REG_2: u32 = 2;
/// `nft`'s type ids, so that `nft list` shows the sets as it would have made them.
pub(crate) const TYPE_IPADDR: u32 = 7;
pub(crate) const TYPE_INET_PROTOCOL: u32 = 12;
pub(crate) const TYPE_INET_SERVICE: u32 = 13;
pub(crate) const TYPE_MARK: u32 = 19;
/// `inet_proto . inet_service`: a concatenation's type id is its parts' ids, 6 bits each.
pub(crate) const TYPE_PROTO_PORT: u32 = (TYPE_INET_PROTOCOL << 6) | TYPE_INET_SERVICE;

/// The first 4-byte register (`NFT_REG32_00`, overlapping register 1): concatenations load
/// each field into the next one of these.
pub(crate) const NFT_REG32_00: u32 = 8;
const IFNAMSIZ: usize = 16;
/// Batches larger than this get a send buffer of their size first.
const DEFAULT_SNDBUF: usize = 128 * 1024;

/// The address family of a table (`nfgenmsg.nfgen_family`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    /// IPv4 and IPv6 (`inet`).
    Inet = 1,
    Ip = 2,
    Bridge = 7,
}

/// Netfilter hooks (`enum nf_inet_hooks`) a base chain may attach to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hook {
    Prerouting = 0,
    Input = 1,
    Forward = 2,
    Output = 3,
    Postrouting = 4,
}

/// A base chain's attachment: hook, priority and type (`filter`, `nat`), and what it does
/// with a packet no rule decided (accept, or drop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BaseChain {
    pub(crate) hook: Hook,
    pub(crate) priority: i32,
    pub(crate) kind: &'static str,
    pub(crate) drop_by_default: bool,
}

impl BaseChain {
    /// A base chain that accepts what no rule decided.
    pub(crate) fn accepting(hook: Hook, priority: i32, kind: &'static str) -> Self {
        Self {
            hook,
            priority,
            kind,
            drop_by_default: false,
        }
    }
}

/// A named set or map: its key's type id (as `nft` names types, for listings) and length,
/// and what its elements map to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SetSpec {
    pub(crate) key_type: u32,
    pub(crate) key_len: u32,
    pub(crate) values: SetValues,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SetValues {
    /// A plain set.
    None,
    /// A map to values of this type id and length.
    Data { data_type: u32, len: u32 },
}

/// A set element's value in a map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ElemData {
    Value(Vec<u8>),
    Verdict(Verdict),
}

/// Where a payload expression reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Base {
    /// The Ethernet header (`ether …`).
    Link = 0,
    /// The header after it (`ip …`, `arp …`).
    Network = 1,
    /// The transport header (`th …`, `tcp …`).
    Transport = 2,
}

/// `meta` keys used here (`enum nft_meta_keys`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MetaKey {
    /// `skb->len` (`meta length`), host order.
    Len = 0,
    /// `skb->protocol` (`meta protocol`), big-endian.
    Protocol = 1,
    /// `skb->priority` (`meta priority`): a tc class id, major:minor, host order.
    Priority = 2,
    /// The input interface's index (`meta iif`), host order.
    Iif = 4,
    /// The input interface's name (`iifname`), 16 bytes, NUL-padded.
    IifName = 6,
    /// The output interface's name (`oifname`), 16 bytes, NUL-padded.
    OifName = 7,
    /// The packet's family in an `inet` table (`meta nfproto`): 2 IPv4, 10 IPv6; one byte.
    NfProto = 15,
    /// The transport protocol (`meta l4proto`), one byte.
    L4Proto = 16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CmpOp {
    Eq = 0,
    Neq = 1,
    /// Compares as big-endian bytes (what a `byteorder` to network order prepares), as do
    /// the other orderings.
    Lt = 2,
    Lte = 3,
    Gte = 5,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    Accept,
    Drop,
    Jump(String),
}

impl Verdict {
    fn code(&self) -> u32 {
        match self {
            Verdict::Drop => 0,
            Verdict::Accept => 1,
            // NFT_JUMP = -3
            Verdict::Jump(_) => (-3i32) as u32,
        }
    }

    fn chain(&self) -> Option<&str> {
        match self {
            Verdict::Jump(c) => Some(c),
            Verdict::Accept | Verdict::Drop => None,
        }
    }
}

/// One nf_tables expression. Loads go to register 1, comparisons read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Expr {
    Payload {
        base: Base,
        offset: u32,
        len: u32,
    },
    Meta(MetaKey),
    /// Sets a meta key from register 1.
    MetaSet(MetaKey),
    /// Register 1 (4 bytes) from host to network order.
    Hton32,
    /// Loads a value into register 1.
    Immediate(Vec<u8>),
    Cmp {
        op: CmpOp,
        data: Vec<u8>,
    },
    /// `limit rate over <rate>/second burst <burst> packets`: matches the packets beyond.
    LimitOver {
        rate: u64,
        burst: u32,
    },
    Counter,
    Verdict(Verdict),
    /// A payload field into register `reg` (a concatenation's parts go to consecutive
    /// 4-byte registers from [`NFT_REG32_00`]).
    PayloadTo {
        base: Base,
        offset: u32,
        len: u32,
        reg: u32,
    },
    /// A meta key into register `reg`.
    MetaTo {
        key: MetaKey,
        reg: u32,
    },
    /// Looks the key in `reg` up in a named set (no match: the rule ends); with `dreg`, the
    /// map's value goes there (register 0: the verdict).
    Lookup {
        set: String,
        reg: u32,
        dreg: Option<u32>,
    },
    /// `numgen random mod <modulus>` into register `reg`.
    NumgenRandom {
        modulus: u32,
        reg: u32,
    },
    /// DNAT to the IPv4 address in register 1.
    Dnat,
    /// DNAT to the IPv4 address in register 1 and the port in register 2 (loaded with
    /// [`Expr::ImmediateTo`]).
    DnatPort,
    /// `masquerade`: SNAT to the outgoing interface's address.
    Masq,
    /// Loads a value into register `reg` (1 or 2: the 16-byte registers).
    ImmediateTo {
        reg: u32,
        data: Vec<u8>,
    },
    /// `reject with tcp reset`.
    RejectTcpReset,
    /// `reject` (ICMP port unreachable).
    RejectPortUnreachable,
    /// The connection's state bits (`ct state`, host order: invalid 1, established 2,
    /// related 4, new 8) into register 1.
    CtState,
    /// Register 1 = (register 1 & `mask`) ^ `xor`, over `mask.len()` bytes.
    Bitwise {
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
}

/// A rule: its expressions, and a comment `nft list` shows (and counters are named by).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rule {
    pub(crate) comment: Option<&'static str>,
    pub(crate) exprs: Vec<Expr>,
}

/// A growable buffer of netlink attributes.
#[derive(Debug, Default)]
struct Buf(Vec<u8>);

impl Buf {
    fn pad(&mut self) {
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }

    fn attr(&mut self, ty: u16, data: &[u8]) {
        self.0
            .extend_from_slice(&u16::try_from(4 + data.len()).unwrap_or(0).to_ne_bytes());
        self.0.extend_from_slice(&ty.to_ne_bytes());
        self.0.extend_from_slice(data);
        self.pad();
    }

    fn str(&mut self, ty: u16, s: &str) {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.attr(ty, &v);
    }

    fn be32(&mut self, ty: u16, v: u32) {
        self.attr(ty, &v.to_be_bytes());
    }

    fn be64(&mut self, ty: u16, v: u64) {
        self.attr(ty, &v.to_be_bytes());
    }

    fn nest(&mut self, ty: u16, f: impl FnOnce(&mut Buf)) {
        let start = self.0.len();
        self.0.extend_from_slice(&[0; 4]);
        f(self);
        let len = u16::try_from(self.0.len() - start).unwrap_or(0);
        self.0[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self.0[start + 2..start + 4].copy_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    }

    /// An nlmsghdr + nfgenmsg (`family` for nf_tables messages) whose length is filled in
    /// after `f`.
    fn msg(
        &mut self,
        family: Family,
        ty: u16,
        flags: u16,
        res_id: u16,
        seq: u32,
        f: impl FnOnce(&mut Buf),
    ) {
        let start = self.0.len();
        self.0.extend_from_slice(&[0; 4]);
        self.0.extend_from_slice(&ty.to_ne_bytes());
        self.0
            .extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        self.0.extend_from_slice(&seq.to_ne_bytes());
        self.0.extend_from_slice(&0u32.to_ne_bytes());
        let family = if ty >> 8 == NFNL_SUBSYS_NFTABLES {
            family as u8
        } else {
            0
        };
        self.0.extend_from_slice(&[family, 0]);
        self.0.extend_from_slice(&res_id.to_be_bytes());
        f(self);
        let len = u32::try_from(self.0.len() - start).unwrap_or(0);
        self.0[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    fn data_value(&mut self, ty: u16, v: &[u8]) {
        self.nest(ty, |b| b.attr(NFTA_DATA_VALUE, v));
    }

    fn data_verdict(&mut self, ty: u16, v: &Verdict) {
        self.nest(ty, |b| {
            b.nest(NFTA_DATA_VERDICT, |b| {
                b.be32(NFTA_VERDICT_CODE, v.code());
                if let Some(chain) = v.chain() {
                    b.str(NFTA_VERDICT_CHAIN, chain);
                }
            })
        });
    }

    fn expr(&mut self, e: &Expr) {
        self.nest(NFTA_LIST_ELEM, |b| match e {
            Expr::Payload { base, offset, len } => {
                b.str(NFTA_EXPR_NAME, "payload");
                b.nest(NFTA_EXPR_DATA, |b| {
                    b.be32(NFTA_PAYLOAD_DREG, NFT_REG_1);
                    b.be32(NFTA_PAYLOAD_BASE, *base as u32);
                    b.be32(NFTA_PAYLOAD_OFFSET, *offset);
                    b.be32(NFTA_PAYLOAD_LEN, *len);
                });
            }
            Expr::Meta(key) => {
                b.str(NFTA_EXPR_NAME, "meta");
                b.nest(NFTA_EXPR_DATA, |b| {
                    b.be32(NFTA_META_DREG, NFT_REG_1);
                    b.be32(NFTA_META_KEY, *key as u32);
                });
            }
            Expr::MetaSet(key) => {
                b.str(NFTA_EXPR_NAME, "meta");
                b.nest(NFTA_EXPR_DATA, |b| {
                    b.be32(NFTA_META_KEY, *key as u32);
                    b.be32(NFTA_META_SREG, NFT_REG_1);
                });
            }
            Expr::Hton32 => {
                b.str(NFTA_EXPR_NAME, "byteorder");
                b.nest(NFTA_EXPR_DATA, |b| {
                    b.be32(NFTA_BYTEORDER_SREG, NFT_REG_1);
                    b.be32(NFTA_BYTEORDER_DREG, NFT_REG_1);
                    b.be32(NFTA_BYTEORDER_OP, NFT_BYTEORDER_HTON);
                    b.be32(NFTA_BYTEORDER_LEN, 4);
                    b.be32(NFTA_BYTEORDER_SIZE, 4);
                });
            }
            Expr::Immediate(data) => {
                b.str(NFTA_EXPR_NAME, "immediate");
                b.nest(NFTA_EXPR_DATA, |b| {
                    b.be32(NFTA_IMMEDIATE_DREG, NFT_REG_1);
                    b.data_value(NFTA_IMMEDIATE_DATA, data);
                });
            }
            Expr::LimitOver { rate, burst } => {
                b.str(NFTA_EXPR_NAME, "limit");
                b.nest(NFTA_EXPR_DATA, |b| {
                    b.be64(NFTA_LIMIT_RATE, *rate);
                    b.be64(NFTA_LIMIT_UNIT, 1);
                    b.be32(NFTA_LIMIT_BURST, *burst);
                    b.be32(NFTA_LIMIT_TYPE, NFT_LIMIT_PKTS);
                    b.be32(NFTA_LIMIT_FLAGS, NFT_LIMIT_F_INV);
                });
            }
            Expr::Cmp { op, data } => {
                b.str(NFTA_EXPR_NAME, "cmp");
                b.nest(NFTA_EXPR_DATA, |b| {
                    b.be32(NFTA_CMP_SREG, NFT_REG_1);
                    b.be32(NFTA_CMP_OP, *op as u32);
                    b.data_value(NFTA_CMP_DATA, data);
                });
            }
            // No attributes: the kernel starts the counter at zero.
            Expr::Counter => b.str(NFTA_EXPR_NAME, "counter"),
            Expr::Verdict(v) => {
                b.str(NFTA_EXPR_NAME, "immediate");
                b.nest(NFTA_EXPR_DATA, |b| {
                    b.be32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
                    b.data_verdict(NFTA_IMMEDIATE_DATA, v);
                });
            }
            Expr::PayloadTo {
                base,
                offset,
                len,
                reg,
            } => {
                b.str(NFTA_EXPR_NAME, "payload");
                b.nest(NFTA_EXPR_DATA, |b| {
                    b.be32(NFTA_PAYLOAD_DREG, *reg);
                    b.be32(NFTA_PAYLOAD_BASE, *base as u32);
                    b.be32(NFTA_PAYLOAD_OFFSET, *offset);
                    b.be32(NFTA_PAYLOAD_LEN, *len);
                });
            }
            Expr::MetaTo { key, reg } => {
                b.str(NFTA_EXPR_NAME, "meta");
                b.nest(NFTA_EXPR_DATA, |b| {
                    b.be32(NFTA_META_DREG, *reg);
                    b.be32(NFTA_META_KEY, *key as u32);
                });
            }
            Expr::Lookup { set, reg, dreg } => {
                b.str(NFTA_EXPR_NAME, "lookup");
                b.nest(NFTA_EXPR_DATA, |b| {
                    b.str(NFTA_LOOKUP_SET, set);
                    b.be32(NFTA_LOOKUP_SREG, *reg);
                    if let Some(d) = dreg {
                        b.be32(NFTA_LOOKUP_DREG, *d);
                    }
                });
            }
            Expr::NumgenRandom { modulus, reg } => {
                b.str(NFTA_EXPR_NAME, "numgen");
                b.nest(NFTA_EXPR_DATA, |b| {
                    b.be32(NFTA_NG_DREG, *reg);
                    b.be32(NFTA_NG_MODULUS, *modulus);
                    b.be32(NFTA_NG_TYPE, NFT_NG_RANDOM);
                });
            }
            Expr::Dnat => {
                b.str(NFTA_EXPR_NAME, "nat");
                b.nest(NFTA_EXPR_DATA, |b| {
                    b.be32(NFTA_NAT_TYPE, NFT_NAT_DNAT);
                    b.be32(NFTA_NAT_FAMILY, NFPROTO_IPV4);
                    b.be32(NFTA_NAT_REG_ADDR_MIN, NFT_REG_1);
                });
            }
            Expr::DnatPort => {
                b.str(NFTA_EXPR_NAME, "nat");
                b.nest(NFTA_EXPR_DATA, |b| {
                    b.be32(NFTA_NAT_TYPE, NFT_NAT_DNAT);
                    b.be32(NFTA_NAT_FAMILY, NFPROTO_IPV4);
                    b.be32(NFTA_NAT_REG_ADDR_MIN, NFT_REG_1);
                    b.be32(NFTA_NAT_REG_PROTO_MIN, NFT_REG_2);
                    b.be32(NFTA_NAT_FLAGS, NF_NAT_RANGE_ADDR_PORT);
                });
            }
            Expr::Masq => {
                b.str(NFTA_EXPR_NAME, "masq");
            }
            Expr::ImmediateTo { reg, data } => {
                b.str(NFTA_EXPR_NAME, "immediate");
                b.nest(NFTA_EXPR_DATA, |b| {
                    b.be32(NFTA_IMMEDIATE_DREG, *reg);
                    b.data_value(NFTA_IMMEDIATE_DATA, data);
                });
            }
            Expr::RejectTcpReset => {
                b.str(NFTA_EXPR_NAME, "reject");
                b.nest(NFTA_EXPR_DATA, |b| {
                    b.be32(NFTA_REJECT_TYPE, NFT_REJECT_TCP_RST)
                });
            }
            Expr::RejectPortUnreachable => {
                b.str(NFTA_EXPR_NAME, "reject");
                b.nest(NFTA_EXPR_DATA, |b| {
                    b.be32(NFTA_REJECT_TYPE, NFT_REJECT_ICMP_UNREACH);
                    b.attr(NFTA_REJECT_ICMP_CODE, &[ICMP_PORT_UNREACH]);
                });
            }
            Expr::CtState => {
                b.str(NFTA_EXPR_NAME, "ct");
                b.nest(NFTA_EXPR_DATA, |b| {
                    b.be32(NFTA_CT_DREG, NFT_REG_1);
                    b.be32(NFTA_CT_KEY, NFT_CT_STATE);
                });
            }
            Expr::Bitwise { mask, xor } => {
                b.str(NFTA_EXPR_NAME, "bitwise");
                b.nest(NFTA_EXPR_DATA, |b| {
                    b.be32(NFTA_BITWISE_SREG, NFT_REG_1);
                    b.be32(NFTA_BITWISE_DREG, NFT_REG_1);
                    b.be32(NFTA_BITWISE_LEN, u32::try_from(mask.len()).unwrap_or(0));
                    b.data_value(NFTA_BITWISE_MASK, mask);
                    b.data_value(NFTA_BITWISE_XOR, xor);
                });
            }
        });
    }
}

/// An interface name as an `ifname` set key: NUL-padded to IFNAMSIZ.
pub(crate) fn ifname_key(name: &str) -> [u8; IFNAMSIZ] {
    let mut k = [0u8; IFNAMSIZ];
    let n = name.len().min(IFNAMSIZ - 1);
    k[..n].copy_from_slice(&name.as_bytes()[..n]);
    k
}

/// One atomic transaction on one table: messages are applied in order, all or none. Each
/// message carries a description for error reports.
#[derive(Debug)]
pub(crate) struct Batch {
    family: Family,
    table: String,
    buf: Buf,
    /// Offset of each message in `buf` (its seq is patched in at send time) and what it does.
    msgs: Vec<(usize, String)>,
}

impl Batch {
    /// A batch on a table of family `bridge`.
    pub(crate) fn new(table: &str) -> Self {
        Self::of(Family::Bridge, table)
    }

    pub(crate) fn of(family: Family, table: &str) -> Self {
        Batch {
            family,
            table: table.to_owned(),
            buf: Buf::default(),
            msgs: Vec::new(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    /// Encoded size so far (a batch must fit the socket's send buffer).
    pub(crate) fn len_bytes(&self) -> usize {
        self.buf.0.len()
    }

    /// What each message does, in order.
    #[cfg(test)]
    pub(crate) fn ops(&self) -> Vec<&str> {
        self.msgs.iter().map(|(_, w)| w.as_str()).collect()
    }

    fn push(&mut self, ty: u16, flags: u16, what: String, f: impl FnOnce(&mut Buf, &str)) {
        self.msgs.push((self.buf.0.len(), what));
        let table = std::mem::take(&mut self.table);
        self.buf.msg(
            self.family,
            (NFNL_SUBSYS_NFTABLES << 8) | ty,
            flags,
            0,
            0,
            |b| f(b, &table),
        );
        self.table = table;
    }

    /// Creates the table; a no-op if it exists.
    pub(crate) fn add_table(&mut self) -> &mut Self {
        self.push(
            NFT_MSG_NEWTABLE,
            NLM_F_CREATE,
            "add table".to_owned(),
            |b, t| b.str(NFTA_TABLE_NAME, t),
        );
        self
    }

    /// Deletes the table and everything in it (after [`Batch::add_table`] in the same batch,
    /// whether or not it existed).
    pub(crate) fn del_table(&mut self) -> &mut Self {
        self.push(NFT_MSG_DELTABLE, 0, "delete table".to_owned(), |b, t| {
            b.str(NFTA_TABLE_NAME, t)
        });
        self
    }

    /// Creates a regular chain; a no-op if it exists.
    pub(crate) fn add_chain(&mut self, chain: &str) -> &mut Self {
        self.push(
            NFT_MSG_NEWCHAIN,
            NLM_F_CREATE,
            format!("add chain {chain}"),
            |b, t| {
                b.str(NFTA_CHAIN_TABLE, t);
                b.str(NFTA_CHAIN_NAME, chain);
            },
        );
        self
    }

    /// Creates a base chain on a hook.
    pub(crate) fn add_base_chain(&mut self, chain: &str, base: BaseChain) -> &mut Self {
        self.push(
            NFT_MSG_NEWCHAIN,
            NLM_F_CREATE,
            format!("add {} chain {chain}", base.kind),
            |b, t| {
                b.str(NFTA_CHAIN_TABLE, t);
                b.str(NFTA_CHAIN_NAME, chain);
                b.nest(NFTA_CHAIN_HOOK, |b| {
                    b.be32(NFTA_HOOK_HOOKNUM, base.hook as u32);
                    b.be32(NFTA_HOOK_PRIORITY, base.priority as u32);
                });
                // NF_DROP, NF_ACCEPT
                b.be32(NFTA_CHAIN_POLICY, u32::from(!base.drop_by_default));
                b.str(NFTA_CHAIN_TYPE, base.kind);
            },
        );
        self
    }

    /// Deletes every rule of a chain.
    pub(crate) fn flush_chain(&mut self, chain: &str) -> &mut Self {
        self.push(
            NFT_MSG_DELRULE,
            0,
            format!("flush chain {chain}"),
            |b, t| {
                b.str(NFTA_RULE_TABLE, t);
                b.str(NFTA_RULE_CHAIN, chain);
            },
        );
        self
    }

    /// Deletes a chain and its rules (nothing may refer to it any more).
    pub(crate) fn del_chain(&mut self, chain: &str) -> &mut Self {
        self.push(
            NFT_MSG_DELCHAIN,
            0,
            format!("delete chain {chain}"),
            |b, t| {
                b.str(NFTA_CHAIN_TABLE, t);
                b.str(NFTA_CHAIN_NAME, chain);
            },
        );
        self
    }

    /// Appends a rule at the end of a chain.
    pub(crate) fn add_rule(&mut self, chain: &str, rule: &Rule) -> &mut Self {
        let what = format!(
            "add rule {} to chain {chain}",
            rule.comment.unwrap_or("(no comment)")
        );
        self.push(
            NFT_MSG_NEWRULE,
            NLM_F_CREATE | NLM_F_APPEND,
            what,
            |b, t| {
                b.str(NFTA_RULE_TABLE, t);
                b.str(NFTA_RULE_CHAIN, chain);
                b.nest(NFTA_RULE_EXPRESSIONS, |b| {
                    for e in &rule.exprs {
                        b.expr(e);
                    }
                });
                if let Some(c) = rule.comment {
                    let mut ud = vec![
                        NFTNL_UDATA_RULE_COMMENT,
                        u8::try_from(c.len() + 1).unwrap_or(0),
                    ];
                    ud.extend_from_slice(c.as_bytes());
                    ud.push(0);
                    b.attr(NFTA_RULE_USERDATA, &ud);
                }
            },
        );
        self
    }

    /// Creates a named set or map; a no-op if it exists.
    pub(crate) fn add_set(&mut self, set: &str, spec: SetSpec) -> &mut Self {
        // Unique within the batch (the kernel requires one; lookups here go by name).
        let id = self.msgs.len() as u32 + 1;
        self.push(
            NFT_MSG_NEWSET,
            NLM_F_CREATE,
            format!("add set {set}"),
            |b, t| {
                b.str(NFTA_SET_TABLE, t);
                b.str(NFTA_SET_NAME, set);
                b.be32(NFTA_SET_KEY_TYPE, spec.key_type);
                b.be32(NFTA_SET_KEY_LEN, spec.key_len);
                b.be32(NFTA_SET_ID, id);
                match spec.values {
                    SetValues::None => {}
                    SetValues::Data { data_type, len } => {
                        b.be32(NFTA_SET_FLAGS, NFT_SET_MAP);
                        b.be32(NFTA_SET_DATA_TYPE, data_type);
                        b.be32(NFTA_SET_DATA_LEN, len);
                    }
                }
            },
        );
        self
    }

    /// Deletes a named set (no rule may look it up any more).
    pub(crate) fn del_set(&mut self, set: &str) -> &mut Self {
        self.push(NFT_MSG_DELSET, 0, format!("delete set {set}"), |b, t| {
            b.str(NFTA_SET_TABLE, t);
            b.str(NFTA_SET_NAME, set);
        });
        self
    }

    /// Adds an element (`key`, and its value in a map); a no-op if the same one exists.
    /// `label` names it in errors.
    pub(crate) fn add_elem(
        &mut self,
        set: &str,
        label: &str,
        key: &[u8],
        data: Option<&ElemData>,
    ) -> &mut Self {
        self.push(
            NFT_MSG_NEWSETELEM,
            NLM_F_CREATE,
            format!("add element {label} to {set}"),
            |b, t| {
                b.str(NFTA_SET_ELEM_LIST_TABLE, t);
                b.str(NFTA_SET_ELEM_LIST_SET, set);
                b.nest(NFTA_SET_ELEM_LIST_ELEMENTS, |b| {
                    b.nest(NFTA_LIST_ELEM, |b| {
                        b.data_value(NFTA_SET_ELEM_KEY, key);
                        match data {
                            Some(ElemData::Value(v)) => b.data_value(NFTA_SET_ELEM_DATA, v),
                            Some(ElemData::Verdict(v)) => b.data_verdict(NFTA_SET_ELEM_DATA, v),
                            None => {}
                        }
                    })
                });
            },
        );
        self
    }

    /// Removes the element keyed `key` (named `label` in errors) from a set or map.
    pub(crate) fn del_elem(&mut self, set: &str, label: &str, key: &[u8]) -> &mut Self {
        self.push(
            NFT_MSG_DELSETELEM,
            0,
            format!("delete element {label} from {set}"),
            |b, t| {
                b.str(NFTA_SET_ELEM_LIST_TABLE, t);
                b.str(NFTA_SET_ELEM_LIST_SET, set);
                b.nest(NFTA_SET_ELEM_LIST_ELEMENTS, |b| {
                    b.nest(NFTA_LIST_ELEM, |b| b.data_value(NFTA_SET_ELEM_KEY, key))
                });
            },
        );
        self
    }

    /// Adds `ifname : verdict` to a verdict map; a no-op if the same element exists.
    pub(crate) fn add_vmap_elem(&mut self, map: &str, ifname: &str, v: &Verdict) -> &mut Self {
        let data = ElemData::Verdict(v.clone());
        self.add_elem(map, ifname, &ifname_key(ifname), Some(&data))
    }

    /// Removes the element keyed `ifname` from a map.
    pub(crate) fn del_ifname_elem(&mut self, map: &str, ifname: &str) -> &mut Self {
        self.del_elem(map, ifname, &ifname_key(ifname))
    }

    /// The wire bytes: BATCH_BEGIN, the messages with seqs `seq0 + 1 ..`, BATCH_END. Only the
    /// last message asks for an ACK, so a success answers with one message however large the
    /// batch (errors are always reported, each naming its message's seq).
    fn encode(&self, seq0: u32) -> Vec<u8> {
        let mut out = Buf::default();
        let res = NFNL_SUBSYS_NFTABLES;
        out.msg(self.family, NFNL_MSG_BATCH_BEGIN, 0, res, seq0, |_| {});
        let mut body = self.buf.0.clone();
        for (i, (off, _)) in self.msgs.iter().enumerate() {
            let seq = seq0.wrapping_add(1 + i as u32);
            body[off + 8..off + 12].copy_from_slice(&seq.to_ne_bytes());
            if i + 1 == self.msgs.len() {
                let flags = u16::from_ne_bytes([body[off + 6], body[off + 7]]) | NLM_F_ACK;
                body[off + 6..off + 8].copy_from_slice(&flags.to_ne_bytes());
            }
        }
        out.0.extend_from_slice(&body);
        let end_seq = seq0.wrapping_add(1 + self.msgs.len() as u32);
        out.msg(self.family, NFNL_MSG_BATCH_END, 0, res, end_seq, |_| {});
        out.0
    }
}

/// A `NETLINK_NETFILTER` socket bound (at creation) to the node's namespace.
#[derive(Debug)]
pub(crate) struct NfSocket {
    /// Held for a whole request/answer exchange, so answers are never read by another.
    sock: Mutex<Socket>,
    seq: AtomicU32,
}

/// The errno of an nf_tables failure, as `nft` would report it.
fn errno_text(errno: i32) -> String {
    std::io::Error::from_raw_os_error(errno).to_string()
}

/// Parsed netlink messages of one `recv`: (type, seq, payload).
fn messages(buf: &[u8]) -> Vec<(u16, u32, &[u8])> {
    let mut out = Vec::new();
    let mut rest = buf;
    while rest.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < NLMSG_HDR || len > rest.len() {
            break;
        }
        let ty = u16::from_ne_bytes([rest[4], rest[5]]);
        let seq = u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]);
        out.push((ty, seq, &rest[NLMSG_HDR..len]));
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    out
}

/// The errno of an NLMSG_ERROR payload (0 for an ACK).
fn error_code(payload: &[u8]) -> i32 {
    payload
        .get(..4)
        .map(|b| -i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(nix::libc::EIO)
}

/// Attributes of a netlink attribute stream: (type without flags, value).
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let ty = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            return None;
        }
        let v = &b[4..len];
        b = &b[len.next_multiple_of(4).min(b.len())..];
        Some((ty, v))
    })
}

/// A set element as read back: its key's bytes and, in a map, its value's.
pub(crate) type SetElement = (Vec<u8>, Option<Vec<u8>>);

/// The elements of one set element dump message.
fn parse_elements(payload: &[u8]) -> Vec<SetElement> {
    let value = |v: &[u8]| {
        attrs(v)
            .find(|(t, _)| *t == NFTA_DATA_VALUE)
            .map(|(_, x)| x.to_vec())
    };
    let mut out = Vec::new();
    for (ty, v) in attrs(payload.get(4..).unwrap_or_default()) {
        if ty != NFTA_SET_ELEM_LIST_ELEMENTS {
            continue;
        }
        for (_, elem) in attrs(v) {
            let (mut key, mut data) = (None, None);
            for (t, x) in attrs(elem) {
                match t {
                    NFTA_SET_ELEM_KEY => key = value(x),
                    NFTA_SET_ELEM_DATA => data = value(x),
                    _ => {}
                }
            }
            if let Some(k) = key {
                out.push((k, data));
            }
        }
    }
    out
}

/// A rule as read back: its comment and the packets of its counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RuleCounters {
    pub(crate) comment: Option<String>,
    pub(crate) packets: u64,
}

fn parse_rule(payload: &[u8]) -> RuleCounters {
    // After the 4-byte nfgenmsg.
    let mut r = RuleCounters {
        comment: None,
        packets: 0,
    };
    for (ty, v) in attrs(payload.get(4..).unwrap_or_default()) {
        match ty {
            NFTA_RULE_USERDATA => {
                let mut ud = v;
                while ud.len() >= 2 {
                    let (t, l) = (ud[0], ud[1] as usize);
                    let Some(val) = ud.get(2..2 + l) else { break };
                    if t == NFTNL_UDATA_RULE_COMMENT {
                        let s = val.strip_suffix(&[0]).unwrap_or(val);
                        r.comment = Some(String::from_utf8_lossy(s).into_owned());
                    }
                    ud = &ud[2 + l..];
                }
            }
            NFTA_RULE_EXPRESSIONS => {
                for (_, elem) in attrs(v) {
                    let mut is_counter = false;
                    let mut data: &[u8] = &[];
                    for (t, x) in attrs(elem) {
                        match t {
                            NFTA_EXPR_NAME => is_counter = x == b"counter\0",
                            NFTA_EXPR_DATA => data = x,
                            _ => {}
                        }
                    }
                    if is_counter {
                        for (t, x) in attrs(data) {
                            if t == NFTA_COUNTER_PACKETS
                                && let Ok(b) = <[u8; 8]>::try_from(x)
                            {
                                r.packets += u64::from_be_bytes(b);
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    r
}

impl NfSocket {
    /// A socket in the calling thread's namespace (call it on a thread inside the node's).
    pub(crate) fn new() -> Result<NfSocket, NetError> {
        let mut sock = Socket::new(NETLINK_NETFILTER)
            .map_err(|e| NetError::io("nf_tables netlink socket", e))?;
        sock.bind_auto()
            .map_err(|e| NetError::io("bind nf_tables netlink socket", e))?;
        // Error answers then carry only the failed message's header, not all of it.
        let _ = sock.set_cap_ack(true);
        Ok(NfSocket {
            sock: Mutex::new(sock),
            seq: AtomicU32::new(1),
        })
    }

    fn next_seqs(&self, n: usize) -> u32 {
        self.seq.fetch_add(n as u32 + 2, Ordering::Relaxed)
    }

    /// Reads every queued answer without waiting (`recv` with MSG_DONTWAIT).
    fn drain(sock: &Socket, mut each: impl FnMut(u16, u32, &[u8])) -> std::io::Result<()> {
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
        loop {
            buf.clear();
            match sock.recv(&mut buf, nix::libc::MSG_DONTWAIT) {
                Ok(_) => {
                    for (ty, seq, p) in messages(&buf) {
                        each(ty, seq, p);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Applies a batch as one transaction. The kernel processes a batch synchronously in
    /// `send`, so all answers are queued when it returns.
    pub(crate) fn apply(&self, op: &str, batch: &Batch) -> Result<(), NetError> {
        if batch.is_empty() {
            return Ok(());
        }
        let seq0 = self.next_seqs(batch.msgs.len());
        let wire = batch.encode(seq0);
        let last = seq0.wrapping_add(batch.msgs.len() as u32);
        let sock = self.sock.lock().unwrap_or_else(|p| p.into_inner());
        // Answers left over from an earlier, interrupted exchange are not ours.
        let _ = Self::drain(&sock, |_, _, _| {});
        // A batch must fit the send buffer whole (~208 KiB by default); `nft` grows it too.
        if wire.len() > DEFAULT_SNDBUF {
            use nix::sys::socket::{setsockopt, sockopt::SndBufForce};
            setsockopt(&*sock, SndBufForce, &(wire.len() + 4096)).map_err(|e| {
                NetError::io(
                    format!("nf_tables {op}: grow send buffer"),
                    std::io::Error::from(e),
                )
            })?;
        }
        sock.send(&wire, 0)
            .map_err(|e| NetError::io(format!("nf_tables {op}: send batch"), e))?;
        let mut acked = false;
        let mut errors = Vec::new();
        Self::drain(&sock, |ty, seq, p| {
            if ty != NLMSG_ERROR {
                return;
            }
            match error_code(p) {
                0 if seq == last => acked = true,
                0 => {}
                errno => {
                    let what = seq
                        .checked_sub(seq0 + 1)
                        .and_then(|i| batch.msgs.get(i as usize))
                        .map_or("batch", |(_, w)| w.as_str());
                    errors.push(format!("{what}: {}", errno_text(errno)));
                }
            }
        })
        .map_err(|e| NetError::io(format!("nf_tables {op}: read answer"), e))?;
        drop(sock);
        if !errors.is_empty() {
            return Err(NetError::Nft {
                op: op.to_owned(),
                detail: errors.join("; "),
            });
        }
        if !acked {
            return Err(NetError::Nft {
                op: op.to_owned(),
                detail: "the kernel did not acknowledge the batch".to_owned(),
            });
        }
        Ok(())
    }

    /// Sends one request (not a batch) and collects its answers until DONE or the ACK.
    /// `Ok(None)` when the kernel answers ENOENT (no such table or chain).
    fn request(
        &self,
        op: &str,
        ty: u16,
        flags: u16,
        f: impl FnOnce(&mut Buf),
    ) -> Result<Option<Vec<Vec<u8>>>, NetError> {
        self.request_in(Family::Bridge, op, ty, flags, f)
    }

    /// A request about objects of `family`: its answer's messages (payloads), `None` if the
    /// object is absent.
    fn request_in(
        &self,
        family: Family,
        op: &str,
        ty: u16,
        flags: u16,
        f: impl FnOnce(&mut Buf),
    ) -> Result<Option<Vec<Vec<u8>>>, NetError> {
        let seq = self.next_seqs(0);
        let mut b = Buf::default();
        b.msg(
            family,
            (NFNL_SUBSYS_NFTABLES << 8) | ty,
            flags | NLM_F_ACK,
            0,
            seq,
            f,
        );
        let sock = self.sock.lock().unwrap_or_else(|p| p.into_inner());
        let _ = Self::drain(&sock, |_, _, _| {});
        sock.send(&b.0, 0)
            .map_err(|e| NetError::io(format!("nf_tables {op}: send"), e))?;
        let mut out = Vec::new();
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
        loop {
            buf.clear();
            sock.recv(&mut buf, 0)
                .map_err(|e| NetError::io(format!("nf_tables {op}: read answer"), e))?;
            for (mty, mseq, p) in messages(&buf) {
                if mseq != seq {
                    continue;
                }
                match mty {
                    NLMSG_DONE => return Ok(Some(out)),
                    NLMSG_ERROR => {
                        return match error_code(p) {
                            0 => Ok(Some(out)),
                            nix::libc::ENOENT => Ok(None),
                            errno => Err(NetError::Nft {
                                op: op.to_owned(),
                                detail: errno_text(errno),
                            }),
                        };
                    }
                    _ => out.push(p.to_vec()),
                }
            }
        }
    }

    /// The elements of set or map `set` of table `table` of `family`: each key, and its
    /// value in a map (a verdict map's values are not read). `None` if the set or its table
    /// is absent.
    pub(crate) fn set_elements(
        &self,
        family: Family,
        table: &str,
        set: &str,
    ) -> Result<Option<Vec<SetElement>>, NetError> {
        let msgs = self.request_in(
            family,
            &format!("list set {set}"),
            NFT_MSG_GETSETELEM,
            NLM_F_DUMP,
            |b| {
                b.str(NFTA_SET_ELEM_LIST_TABLE, table);
                b.str(NFTA_SET_ELEM_LIST_SET, set);
            },
        )?;
        Ok(msgs.map(|msgs| msgs.iter().flat_map(|m| parse_elements(m)).collect()))
    }

    pub(crate) fn table_exists(&self, table: &str) -> Result<bool, NetError> {
        let r = self.request(&format!("get table {table}"), NFT_MSG_GETTABLE, 0, |b| {
            b.str(NFTA_TABLE_NAME, table)
        })?;
        Ok(r.is_some())
    }

    /// The rules of one chain with their counters; `None` if the chain (or table) is absent.
    pub(crate) fn chain_counters(
        &self,
        table: &str,
        chain: &str,
    ) -> Result<Option<Vec<RuleCounters>>, NetError> {
        // A rule dump of a missing chain is merely empty: ask for the chain first.
        let exists = self.request(&format!("get chain {chain}"), NFT_MSG_GETCHAIN, 0, |b| {
            b.str(NFTA_CHAIN_TABLE, table);
            b.str(NFTA_CHAIN_NAME, chain);
        })?;
        if exists.is_none() {
            return Ok(None);
        }
        // A dump filtered by table and chain: the kernel walks that chain only.
        let r = self.request(
            &format!("list chain {chain}"),
            NFT_MSG_GETRULE,
            NLM_F_DUMP,
            |b| {
                b.str(NFTA_RULE_TABLE, table);
                b.str(NFTA_RULE_CHAIN, chain);
            },
        )?;
        Ok(r.map(|msgs| msgs.iter().map(|m| parse_rule(m)).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> Rule {
        Rule {
            comment: Some("l2-spoof"),
            exprs: vec![
                Expr::Payload {
                    base: Base::Link,
                    offset: 6,
                    len: 6,
                },
                Expr::Cmp {
                    op: CmpOp::Neq,
                    data: vec![2, 0, 0, 0, 0, 1],
                },
                Expr::Counter,
                Expr::Verdict(Verdict::Drop),
            ],
        }
    }

    #[test]
    fn batch_is_framed_and_only_the_last_message_asks_for_an_ack() {
        let mut b = Batch::new("hive");
        b.add_chain("p_in")
            .flush_chain("p_in")
            .add_rule("p_in", &rule())
            .add_vmap_elem("in_ports", "p", &Verdict::Jump("p_in".into()));
        let wire = b.encode(100);
        let msgs = messages(&wire);
        let types: Vec<u16> = msgs.iter().map(|m| m.0).collect();
        let nft = |t: u16| (NFNL_SUBSYS_NFTABLES << 8) | t;
        assert_eq!(
            types,
            [
                NFNL_MSG_BATCH_BEGIN,
                nft(NFT_MSG_NEWCHAIN),
                nft(NFT_MSG_DELRULE),
                nft(NFT_MSG_NEWRULE),
                nft(NFT_MSG_NEWSETELEM),
                NFNL_MSG_BATCH_END
            ]
        );
        let seqs: Vec<u32> = msgs.iter().map(|m| m.1).collect();
        assert_eq!(seqs, [100, 101, 102, 103, 104, 105]);
        let mut off = 0;
        for (i, _) in msgs.iter().enumerate() {
            let len = u32::from_ne_bytes(wire[off..off + 4].try_into().unwrap()) as usize;
            let flags = u16::from_ne_bytes([wire[off + 6], wire[off + 7]]);
            assert_eq!(flags & NLM_F_ACK != 0, i == 4, "message {i}");
            off += len;
        }
        assert_eq!(off, wire.len());
    }

    #[test]
    fn rule_encoding_round_trips_comment_and_values() {
        let mut b = Batch::new("hive");
        b.add_rule("p_in", &rule());
        let wire = b.encode(1);
        let (_, _, payload) = messages(&wire)[1];
        let parsed = parse_rule(payload);
        assert_eq!(parsed.comment.as_deref(), Some("l2-spoof"));
        let text = format!("{:?}", payload);
        assert!(text.contains("2, 0, 0, 0, 0, 1"), "{text}");
        // Table and chain names are NUL-terminated attributes.
        let names: Vec<&[u8]> = attrs(&payload[4..])
            .filter(|(t, _)| *t == NFTA_RULE_TABLE || *t == NFTA_RULE_CHAIN)
            .map(|(_, v)| v)
            .collect();
        assert_eq!(names, [&b"hive\0"[..], &b"p_in\0"[..]]);
    }

    #[test]
    fn ifname_keys_are_padded_to_ifnamsiz() {
        assert_eq!(&ifname_key("eth0")[..5], b"eth0\0");
        assert_eq!(ifname_key("eth0").len(), 16);
    }
}
