//! A DNS resolver inside every instance's network namespace, on `127.0.0.53:53` (UDP and
//! TCP), answering from a [`DnsZone`] the caller hands in: A and SRV records of names under
//! one domain (the instance's tenant, `<tenant>.hive`), nothing else.
//!
//! The sockets are made by a thread that entered the namespace, so they stay in it, and are
//! served by `hickory-server` (its `Server` with a [`RequestHandler`] of ours; no zone files,
//! no DNSSEC, no TLS, no forwarding: default features off) on the caller's tokio runtime.
//! Swapping the zone is a pointer swap; the server runs until [`Resolvers::remove`] (the
//! instance's port is detached).
//!
//! Answers, for a query name `q` (case-insensitive):
//! - `q` = `<rel>.<domain>` or a single label `<rel>` (a resolver that did not search):
//!   the records of `rel` for the asked type; a name with records of other types only is
//!   NOERROR with no answer (so an AAAA lookup does not fail an A one); an unknown name is
//!   NXDOMAIN;
//! - SRV answers carry their targets' A records as additionals;
//! - `q` under `.hive` but another domain (another tenant): NXDOMAIN, the same as a name
//!   that does not exist; anything else: REFUSED (there is no upstream to forward to).
//!
//! This module knows names and addresses, never services or tenants.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Header, HeaderCounts, Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::{A, SRV};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;

use crate::NetError;

/// Where the resolver listens inside each namespace (systemd-resolved's stub address).
pub const RESOLVER_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 53);
/// The top-level domain of every zone: `<domain>` is `<tenant>.hive`.
pub const TOP: &str = "hive";
/// TTL of answers: short, endpoints move.
const TTL: u32 = 5;

/// One SRV target: a port on a host named relative to the zone's domain.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SrvTarget {
    pub port: u16,
    /// Relative name of the target (with an A record in the zone).
    pub target: String,
}

/// The names one resolver answers: relative to `domain`, lower case.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsZone {
    /// E.g. `acme.hive` (no trailing dot).
    pub domain: String,
    pub a: BTreeMap<String, Vec<Ipv4Addr>>,
    /// E.g. `_80._tcp.web` → the ready endpoints.
    pub srv: BTreeMap<String, Vec<SrvTarget>>,
}

/// What a query gets: the response code, answers and additionals.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Answer {
    pub(crate) code: ResponseCode,
    pub(crate) answers: Vec<Record>,
    pub(crate) additionals: Vec<Record>,
}

impl DnsZone {
    /// The name relative to the domain: `None` if outside it (then `Some(code)` says how
    /// to refuse).
    fn relative<'a>(&self, q: &'a str) -> Result<&'a str, ResponseCode> {
        if let Some(rel) = q
            .strip_suffix(self.domain.as_str())
            .and_then(|r| r.strip_suffix('.'))
            .filter(|r| !r.is_empty())
        {
            return Ok(rel);
        }
        if !q.contains('.') && !q.is_empty() && q != TOP {
            return Ok(q);
        }
        if q == TOP || q.ends_with(&format!(".{TOP}")) {
            return Err(ResponseCode::NXDomain);
        }
        Err(ResponseCode::Refused)
    }

    fn fqdn(&self, rel: &str) -> Option<Name> {
        Name::from_ascii(format!("{rel}.{}.", self.domain)).ok()
    }

    /// The answer to `name` (as asked, with or without the trailing dot) of type `rtype`.
    pub(crate) fn answer(&self, name: &str, rtype: RecordType) -> Answer {
        let q = name.trim_end_matches('.').to_ascii_lowercase();
        let rel = match self.relative(&q) {
            Ok(r) => r,
            Err(code) => {
                return Answer {
                    code,
                    ..Default::default()
                };
            }
        };
        let (a, srv) = (self.a.get(rel), self.srv.get(rel));
        if a.is_none() && srv.is_none() {
            return Answer {
                code: ResponseCode::NXDomain,
                ..Default::default()
            };
        }
        // Answers carry the name as asked (a single label stays one).
        let Ok(owner) = Name::from_ascii(name) else {
            return Answer {
                code: ResponseCode::FormErr,
                ..Default::default()
            };
        };
        let mut out = Answer::default();
        match rtype {
            RecordType::A => {
                for ip in a.into_iter().flatten() {
                    out.answers
                        .push(Record::from_rdata(owner.clone(), TTL, RData::A(A(*ip))));
                }
            }
            RecordType::SRV => {
                for t in srv.into_iter().flatten() {
                    let Some(target) = self.fqdn(&t.target) else {
                        continue;
                    };
                    out.answers.push(Record::from_rdata(
                        owner.clone(),
                        TTL,
                        RData::SRV(SRV::new(0, 10, t.port, target.clone())),
                    ));
                    for ip in self.a.get(&t.target).into_iter().flatten() {
                        out.additionals.push(Record::from_rdata(
                            target.clone(),
                            TTL,
                            RData::A(A(*ip)),
                        ));
                    }
                }
            }
            _ => {}
        }
        out
    }
}

/// Answers one namespace's queries from its zone.
#[derive(Debug)]
struct Handler {
    zone: Arc<RwLock<Arc<DnsZone>>>,
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let zone = self.zone.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.authoritative = true;
        meta.recursion_available = false;
        let answer = match request.queries.queries() {
            [q] => zone.answer(&q.name().to_string(), q.query_type()),
            _ => Answer {
                code: ResponseCode::FormErr,
                ..Default::default()
            },
        };
        meta.response_code = answer.code;
        let response = MessageResponseBuilder::new(&request.queries, None).build(
            meta,
            answer.answers.iter(),
            std::iter::empty(),
            std::iter::empty(),
            answer.additionals.iter(),
        );
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, "dns: send response");
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}

/// A running resolver: its zone, and the server whose tasks end when it is dropped.
struct Running {
    zone: Arc<RwLock<Arc<DnsZone>>>,
    _server: Server<Handler>,
}

/// A resolver's UDP and TCP sockets, bound to [`RESOLVER_ADDR`] port 53 of a namespace.
pub(crate) type Sockets = (std::net::UdpSocket, std::net::TcpListener);

/// Binds a resolver's sockets in the calling thread's namespace (its `lo` up).
pub(crate) fn bind() -> Result<Sockets, NetError> {
    let addr = SocketAddr::from((RESOLVER_ADDR, 53));
    let bind = |e| NetError::io(format!("bind {addr} for dns"), e);
    let udp = std::net::UdpSocket::bind(addr).map_err(bind)?;
    let tcp = std::net::TcpListener::bind(addr).map_err(bind)?;
    Ok((udp, tcp))
}

/// The resolvers of one node, by instance key.
#[derive(Default)]
pub(crate) struct Resolvers {
    by_key: Mutex<HashMap<String, Running>>,
    /// Sockets bound ahead in the namespace of an instance that has no resolver yet (made
    /// with a spare namespace): `set` serves on them instead of binding.
    prebound: Mutex<HashMap<String, Sockets>>,
    /// Held by `set` from its look-up to its insert: two calls for one key (an instance's
    /// start and the loop's pass over running instances) must not both bind.
    starting: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Resolvers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.by_key.lock().map(|m| m.len()).unwrap_or_default();
        f.debug_struct("Resolvers").field("running", &n).finish()
    }
}

impl Resolvers {
    /// Serves `zone` for `key`: swaps the zone of a running resolver (a network's instances
    /// share one zone: nothing is copied), or starts one on the current tokio runtime, on the
    /// sockets kept for it or else ones bound inside the namespace at `netns`.
    pub(crate) async fn set(
        &self,
        key: &str,
        netns: &std::path::Path,
        zone: Arc<DnsZone>,
    ) -> Result<(), NetError> {
        let _starting = self.starting.lock().await;
        if let Some(r) = self.lock().get(key) {
            let mut z = r.zone.write().unwrap_or_else(|e| e.into_inner());
            if !Arc::ptr_eq(&z, &zone) {
                *z = zone;
            }
            return Ok(());
        }
        let (udp, tcp) = match self.take_prebound(key) {
            Some(sockets) => sockets,
            None => {
                let ns = crate::netns::open(netns)?;
                crate::netns::run_in(&ns, "dns sockets", bind).await?
            }
        };
        self.start(key, udp, tcp, zone)
    }

    /// Serves already bound sockets (tests use loopback sockets of the host).
    pub(crate) fn start(
        &self,
        key: &str,
        udp: std::net::UdpSocket,
        tcp: std::net::TcpListener,
        zone: Arc<DnsZone>,
    ) -> Result<(), NetError> {
        let nonblocking = |e| NetError::io("dns socket nonblocking", e);
        udp.set_nonblocking(true).map_err(nonblocking)?;
        tcp.set_nonblocking(true).map_err(nonblocking)?;
        let tokio_err = |e| NetError::io("dns socket to tokio", e);
        let udp = tokio::net::UdpSocket::from_std(udp).map_err(tokio_err)?;
        let tcp = tokio::net::TcpListener::from_std(tcp).map_err(tokio_err)?;
        let zone = Arc::new(RwLock::new(zone));
        let mut server = Server::new(Handler { zone: zone.clone() });
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 64);
        self.lock().insert(
            key.to_owned(),
            Running {
                zone,
                _server: server,
            },
        );
        Ok(())
    }

    /// Stops `key`'s resolver (its sockets close); none is not an error.
    pub(crate) fn remove(&self, key: &str) {
        self.lock().remove(key);
        self.take_prebound(key);
    }

    pub(crate) fn clear(&self) {
        self.lock().clear();
        self.prebound_lock().clear();
    }

    /// Keeps `sockets`, bound in `key`'s namespace, for its resolver.
    pub(crate) fn keep_prebound(&self, key: &str, sockets: Sockets) {
        self.prebound_lock().insert(key.to_owned(), sockets);
    }

    fn take_prebound(&self, key: &str) -> Option<Sockets> {
        self.prebound_lock().remove(key)
    }

    fn prebound_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Sockets>> {
        self.prebound.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.by_key.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl crate::NodeNet {
    /// Serves `zone` inside instance `key`'s namespace on [`RESOLVER_ADDR`] port 53 (UDP and
    /// TCP), starting the resolver if it has none yet, else swapping its zone. It stops when
    /// the port is detached. Fails if the instance has no namespace here.
    pub async fn serve_dns(&self, key: &str, zone: Arc<DnsZone>) -> Result<(), NetError> {
        crate::names::validate_key(key)?;
        let path = self.cfg.netns_dir.join(self.names.netns(key));
        self.dns.set(key, &path, zone).await
    }

    /// Whether instance `key` has a resolver running.
    pub fn serves_dns(&self, key: &str) -> bool {
        self.dns.lock().contains_key(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone() -> DnsZone {
        let mut z = DnsZone {
            domain: "acme.hive".into(),
            ..Default::default()
        };
        z.a.insert("web".into(), vec![Ipv4Addr::new(10, 88, 0, 2)]);
        z.a.insert("web-a.web".into(), vec![Ipv4Addr::new(10, 88, 0, 5)]);
        z.a.insert("web-b.web".into(), vec![Ipv4Addr::new(10, 88, 0, 6)]);
        z.srv.insert(
            "_80._tcp.web".into(),
            vec![
                SrvTarget {
                    port: 80,
                    target: "web-a.web".into(),
                },
                SrvTarget {
                    port: 80,
                    target: "web-b.web".into(),
                },
            ],
        );
        z
    }

    fn a_of(r: &Record) -> Option<Ipv4Addr> {
        match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        }
    }

    #[test]
    fn a_records_for_the_short_and_the_full_name() {
        let z = zone();
        for q in ["web", "web.", "web.acme.hive.", "WEB.Acme.Hive"] {
            let a = z.answer(q, RecordType::A);
            assert_eq!(a.code, ResponseCode::NoError, "{q}");
            let ips: Vec<_> = a.answers.iter().filter_map(a_of).collect();
            assert_eq!(ips, [Ipv4Addr::new(10, 88, 0, 2)], "{q}");
        }
        let a = z.answer("web-b.web.acme.hive.", RecordType::A);
        assert_eq!(
            a.answers.iter().filter_map(a_of).collect::<Vec<_>>(),
            [Ipv4Addr::new(10, 88, 0, 6)]
        );
    }

    #[test]
    fn srv_lists_the_endpoints_with_their_addresses() {
        let a = zone().answer("_80._tcp.web.acme.hive.", RecordType::SRV);
        assert_eq!(a.code, ResponseCode::NoError);
        let srv: Vec<(u16, String)> = a
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(s) => Some((s.port, s.target.to_string())),
                _ => None,
            })
            .collect();
        assert_eq!(
            srv,
            [
                (80, "web-a.web.acme.hive.".to_owned()),
                (80, "web-b.web.acme.hive.".to_owned())
            ]
        );
        assert_eq!(a.additionals.len(), 2);
        assert_eq!(a_of(&a.additionals[1]), Some(Ipv4Addr::new(10, 88, 0, 6)));
    }

    #[test]
    fn unknown_names_other_tenants_and_other_domains() {
        let z = zone();
        for (q, code) in [
            ("db.acme.hive.", ResponseCode::NXDomain),
            ("db", ResponseCode::NXDomain),
            ("web.blue.hive.", ResponseCode::NXDomain),
            ("hive.", ResponseCode::NXDomain),
            ("example.com.", ResponseCode::Refused),
            ("web.acme.hive.example.com.", ResponseCode::Refused),
        ] {
            let a = z.answer(q, RecordType::A);
            assert_eq!(a.code, code, "{q}");
            assert!(a.answers.is_empty(), "{q}");
        }
        // A name that exists, asked for a type it has none of: NOERROR, no answer.
        let a = z.answer("web.acme.hive.", RecordType::AAAA);
        assert_eq!((a.code, a.answers.len()), (ResponseCode::NoError, 0));
    }

    #[tokio::test]
    async fn serves_udp_and_tcp_queries() {
        use hickory_server::proto::op::{Message, Query};
        use std::io::{Read, Write};
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (uaddr, taddr) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
        let r = Resolvers::default();
        r.start("k", udp, tcp, Arc::new(zone())).unwrap();
        let query = |name: &str, t: RecordType| {
            let mut m = Message::query();
            m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
            m.to_vec().unwrap()
        };
        let q = query("web.acme.hive.", RecordType::A);
        let reply = tokio::task::spawn_blocking(move || {
            let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            c.send_to(&q, uaddr).unwrap();
            let mut buf = [0u8; 1500];
            let n = c.recv(&mut buf).unwrap();
            buf[..n].to_vec()
        })
        .await
        .unwrap();
        let m = Message::from_vec(&reply).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(
            m.answers.iter().filter_map(a_of).collect::<Vec<_>>(),
            [Ipv4Addr::new(10, 88, 0, 2)]
        );
        // The zone is swapped in place; TCP answers too.
        let mut z = zone();
        z.a.clear();
        z.srv.clear();
        // (A running resolver's namespace is not opened again.)
        r.set("k", std::path::Path::new("/nonexistent"), Arc::new(z))
            .await
            .unwrap();
        let q = query("web.acme.hive.", RecordType::A);
        let reply = tokio::task::spawn_blocking(move || {
            let mut c = std::net::TcpStream::connect(taddr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            c.write_all(&(q.len() as u16).to_be_bytes()).unwrap();
            c.write_all(&q).unwrap();
            let mut len = [0u8; 2];
            c.read_exact(&mut len).unwrap();
            let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
            c.read_exact(&mut buf).unwrap();
            buf
        })
        .await
        .unwrap();
        let m = Message::from_vec(&reply).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        // Removing aborts its tasks (they drop the sockets when next polled).
        r.remove("k");
        let mut freed = false;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if std::net::UdpSocket::bind(uaddr).is_ok() {
                freed = true;
                break;
            }
        }
        assert!(freed, "the socket closed");
    }
}
