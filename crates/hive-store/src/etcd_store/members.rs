//! The etcd members and moving between them.
//!
//! etcd-client balances over its endpoints but does not move off a dead one, so Hive keeps
//! one lazily connected channel per member and sends everything to one member at a time.
//! When a request fails because the member is gone, partitioned or leaderless, the first
//! caller to notice health-checks the other members (a linearizable read, which needs a
//! leader) in order, with backoff, and switches to the first healthy one; concurrent callers
//! wait for it instead of probing too.
//!
//! Every request asks etcd to require a leader, so that a member without one refuses at once
//! (before proposing anything) rather than blocking until a timeout.
//!
//! This module decides what may be retried; it does not know the [`crate::Store`] contract.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{
    Certificate, Channel, Client, ConnectOptions, GetOptions, Identity, KvClient, TlsOptions,
    WatchClient,
};
use tokio::time::Instant;

use super::{EtcdStoreOptions, EtcdTls, PROBE_KEY};
use crate::StoreError;

/// Largest response accepted (tonic's default is 4 MiB; a page of large values can exceed it).
const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;
/// First pause between two rounds of health checks; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Bound on one health check, so that a hung member does not hold up the search for long.
const MAX_PROBE_TIME: Duration = Duration::from_secs(2);

/// Why an operation failed, once retrying is over.
#[derive(Debug)]
pub(super) enum Failure {
    /// etcd: "required revision has been compacted".
    Compacted,
    /// etcd: "required revision is a future revision".
    FutureRevision,
    /// etcd refused the request itself (too large, too many operations, …).
    Invalid(String),
    /// etcd refused for a reason that retrying does not fix (permissions, space quota).
    Refused(String),
    /// No healthy member within the failover timeout; nothing was applied.
    Unavailable(String),
    /// A write was lost in flight: it may or may not have been applied.
    OutcomeUnknown(String),
}

impl Failure {
    pub(super) fn into_store_error(self, what: &str) -> StoreError {
        match self {
            Failure::Compacted => {
                StoreError::Backend(format!("{what}: etcd history unexpectedly compacted"))
            }
            Failure::FutureRevision => {
                StoreError::Backend(format!("{what}: etcd refused a future revision"))
            }
            Failure::Invalid(message) => StoreError::Invalid(format!("{what}: etcd: {message}")),
            Failure::Refused(message) => StoreError::Backend(format!("{what}: etcd: {message}")),
            Failure::Unavailable(message) => StoreError::Unavailable(format!("{what}: {message}")),
            Failure::OutcomeUnknown(message) => StoreError::Unavailable(format!(
                "{what}: outcome unknown, it may or may not have been applied \
                 (re-read before retrying): {message}"
            )),
        }
    }
}

/// How one attempt on one member failed.
enum Attempt {
    /// A verdict of etcd on the request itself: retrying elsewhere gives the same answer.
    Final(Failure),
    /// The request provably never reached etcd's log (no connection, or etcd refused before
    /// proposing): any request, a write too, may be sent again elsewhere.
    NotSent(String),
    /// The request may have been applied (connection lost or timeout after sending).
    Lost(String),
}

/// One member: its URL and clients on its own channel (cheap to clone).
#[derive(Clone)]
pub(super) struct Member {
    pub(super) url: String,
    pub(super) kv: KvClient,
    pub(super) watch: WatchClient,
}

pub(super) struct Members {
    members: Vec<Member>,
    current: AtomicUsize,
    /// Held while looking for a healthy member.
    moving: tokio::sync::Mutex<()>,
    request_timeout: Duration,
    failover_timeout: Duration,
}

impl Members {
    /// Builds a channel per member, then waits (with backoff, up to `connect_timeout`) until
    /// one of them is healthy.
    pub(super) async fn connect(options: EtcdStoreOptions) -> Result<Self, StoreError> {
        if options.endpoints.is_empty() {
            return Err(StoreError::Invalid("no etcd endpoint given".into()));
        }
        let mut members = Vec::with_capacity(options.endpoints.len());
        for url in &options.endpoints {
            members.push(member(url, &options).await?);
        }
        let members = Self {
            members,
            current: AtomicUsize::new(0),
            moving: tokio::sync::Mutex::new(()),
            request_timeout: options.request_timeout,
            failover_timeout: options.failover_timeout,
        };
        let deadline = Instant::now() + options.connect_timeout;
        let last = members.members.len() - 1;
        members
            .find_healthy(last, deadline)
            .await
            .map_err(|(rounds, errors)| {
                StoreError::Unavailable(format!(
                    "no etcd member answered within {:?} ({rounds} rounds of health checks): \
                     {errors}",
                    options.connect_timeout
                ))
            })?;
        Ok(members)
    }

    pub(super) fn urls(&self) -> Vec<&str> {
        self.members.iter().map(|m| m.url.as_str()).collect()
    }

    pub(super) fn current_url(&self) -> String {
        self.members[self.current.load(Ordering::Acquire)]
            .url
            .clone()
    }

    pub(super) fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    pub(super) fn failover_timeout(&self) -> Duration {
        self.failover_timeout
    }

    /// Runs an idempotent request, moving to another member and retrying on any failure of
    /// the member, until the failover timeout.
    pub(super) async fn read<T, F, Fut>(&self, what: &str, request: F) -> Result<T, Failure>
    where
        F: Fn(Member) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.run(what, true, request).await.map(|(_, value)| value)
    }

    /// [`Self::read`], also saying which member answered.
    pub(super) async fn read_at<T, F, Fut>(
        &self,
        what: &str,
        request: F,
    ) -> Result<(usize, T), Failure>
    where
        F: Fn(Member) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.run(what, true, request).await
    }

    /// Runs a write: retried on another member only if it provably never reached etcd;
    /// otherwise it fails with [`Failure::OutcomeUnknown`] (after moving on, so that the next
    /// request goes to a healthy member).
    pub(super) async fn write<T, F, Fut>(&self, what: &str, request: F) -> Result<T, Failure>
    where
        F: Fn(Member) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.run(what, false, request).await.map(|(_, value)| value)
    }

    async fn run<T, F, Fut>(
        &self,
        what: &str,
        retry_lost: bool,
        request: F,
    ) -> Result<(usize, T), Failure>
    where
        F: Fn(Member) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + self.failover_timeout;
        loop {
            let index = self.current.load(Ordering::Acquire);
            let member = self.members[index].clone();
            let url = member.url.clone();
            let why = match tokio::time::timeout(self.request_timeout, request(member)).await {
                Ok(Ok(value)) => return Ok((index, value)),
                Ok(Err(error)) => match classify(error) {
                    Attempt::Final(failure) => return Err(failure),
                    Attempt::NotSent(why) => why,
                    Attempt::Lost(why) if retry_lost => why,
                    Attempt::Lost(why) => {
                        let why = format!("etcd {url}: {why}");
                        // Best effort: the error to return is the unknown outcome.
                        let _ = self.fail_over(index, &why, deadline).await;
                        return Err(Failure::OutcomeUnknown(why));
                    }
                },
                Err(_) if retry_lost => format!("no answer within {:?}", self.request_timeout),
                Err(_) => {
                    let why = format!("etcd {url}: no answer within {:?}", self.request_timeout);
                    let _ = self.fail_over(index, &why, deadline).await;
                    return Err(Failure::OutcomeUnknown(why));
                }
            };
            tracing::debug!(member = %url, %what, error = %why, "etcd request failed, moving on");
            self.fail_over(index, &format!("etcd {url}: {why}"), deadline)
                .await?;
        }
    }

    /// Moves off member `failed` to the next healthy member, unless another caller already
    /// moved. Fails when no member is healthy by `deadline`.
    pub(super) async fn fail_over(
        &self,
        failed: usize,
        why: &str,
        deadline: Instant,
    ) -> Result<(), Failure> {
        let _moving = self.moving.lock().await;
        if self.current.load(Ordering::Acquire) != failed {
            return Ok(());
        }
        self.find_healthy(failed, deadline)
            .await
            .map_err(|(rounds, errors)| {
                Failure::Unavailable(format!(
                    "{why}; no healthy etcd member after {rounds} rounds of health checks: \
                     {errors}"
                ))
            })
    }

    /// Health-checks the members in order starting after `after` (so `after` itself comes
    /// last), in rounds with backoff, and makes the first healthy one current. On failure,
    /// returns the number of rounds and the last error of each member.
    async fn find_healthy(&self, after: usize, deadline: Instant) -> Result<(), (u32, String)> {
        let count = self.members.len();
        let mut errors = vec![String::new(); count];
        let mut backoff = FIRST_BACKOFF;
        let mut rounds = 0;
        loop {
            rounds += 1;
            for step in 1..=count {
                let index = (after + step) % count;
                match self.probe(index).await {
                    Ok(()) => {
                        let before = self.current.swap(index, Ordering::AcqRel);
                        if before != index {
                            tracing::info!(
                                from = %self.members[before].url,
                                to = %self.members[index].url,
                                "etcd: switched member"
                            );
                        }
                        return Ok(());
                    }
                    Err(error) => errors[index] = error,
                }
            }
            let now = Instant::now();
            if now >= deadline {
                let errors: Vec<String> = self
                    .members
                    .iter()
                    .zip(&errors)
                    .map(|(m, e)| format!("{}: {e}", m.url))
                    .collect();
                return Err((rounds, errors.join("; ")));
            }
            tracing::debug!(?backoff, rounds, "no healthy etcd member yet");
            tokio::time::sleep(backoff.min(deadline - now)).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// A member is healthy when it answers a linearizable read (which needs a leader and a
    /// quorum), as `etcdctl endpoint health` checks it.
    async fn probe(&self, index: usize) -> Result<(), String> {
        let mut kv = self.members[index].kv.clone();
        let limit = self.request_timeout.min(MAX_PROBE_TIME);
        let check = kv.get(PROBE_KEY, Some(GetOptions::new().with_count_only()));
        match tokio::time::timeout(limit, check).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(match classify(error) {
                Attempt::Final(failure) => format!("{failure:?}"),
                Attempt::NotSent(why) | Attempt::Lost(why) => why,
            }),
            Err(_) => Err(format!("no answer within {limit:?}")),
        }
    }
}

/// A lazily connected channel to one member, with keepalives so that a member that vanished
/// without closing its connections is noticed.
async fn member(url: &str, options: &EtcdStoreOptions) -> Result<Member, StoreError> {
    let invalid = |what: &str, e: &dyn std::fmt::Display| {
        StoreError::Invalid(format!("etcd endpoint {url}: {what}: {e}"))
    };
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())
        .map_err(|e| invalid("not a URL", &e))?
        .connect_timeout(options.request_timeout.min(MAX_PROBE_TIME))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    match (url.starts_with("https://"), &options.tls) {
        (true, Some(tls)) => {
            endpoint = endpoint
                .tls_config(tls_config(tls, url)?)
                .map_err(|e| invalid("TLS settings", &e))?;
        }
        (true, None) => {
            return Err(StoreError::Invalid(format!(
                "etcd endpoint {url}: https needs TLS settings (a CA)"
            )));
        }
        (false, Some(_)) => {
            return Err(StoreError::Invalid(format!(
                "etcd endpoint {url}: TLS settings given for a plain http endpoint"
            )));
        }
        (false, None) => {}
    }
    let channel = endpoint.connect_lazy();
    let connect = ConnectOptions::new().with_require_leader(true);
    let client = Client::from_channel(Channel::Tonic(channel), Some(connect))
        .await
        .map_err(|e| invalid("client", &e))?;
    Ok(Member {
        url: url.to_owned(),
        kv: client
            .kv_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES),
        watch: client
            .watch_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES),
    })
}

fn tls_config(tls: &EtcdTls, url: &str) -> Result<TlsOptions, StoreError> {
    let Some(ca) = &tls.ca_pem else {
        return Err(StoreError::Invalid(format!(
            "etcd endpoint {url}: TLS needs the CA of the etcd members (--etcd-ca)"
        )));
    };
    let mut config = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
    if let Some((cert, key)) = &tls.identity {
        config = config.identity(Identity::from_pem(cert, key));
    }
    Ok(config)
}

fn classify(error: etcd_client::Error) -> Attempt {
    match error {
        etcd_client::Error::GRpcStatus(status) => classify_status(&status),
        // Raised before a request is sent (building or connecting the channel).
        etcd_client::Error::TransportError(e) => Attempt::NotSent(chain(&e)),
        other => Attempt::Final(Failure::Refused(other.to_string())),
    }
}

/// etcd's error strings are part of its API (`rpctypes`); the gRPC code alone does not tell
/// "compacted" from "future revision", nor "no leader" from "leader changed".
fn classify_status(status: &tonic::Status) -> Attempt {
    use tonic::Code;
    let message = status.message();
    match status.code() {
        Code::OutOfRange if message.contains("compacted") => Attempt::Final(Failure::Compacted),
        Code::OutOfRange if message.contains("future revision") => {
            Attempt::Final(Failure::FutureRevision)
        }
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            Attempt::Final(Failure::Invalid(message.to_owned()))
        }
        // Refused by the require-leader check, before the request was proposed.
        Code::Unavailable if message.contains("no leader") => Attempt::NotSent(message.into()),
        // Refused before proposing, to shed load.
        Code::ResourceExhausted if message.contains("too many requests") => {
            Attempt::NotSent(message.into())
        }
        Code::PermissionDenied | Code::Unauthenticated | Code::ResourceExhausted => {
            Attempt::Final(Failure::Refused(message.to_owned()))
        }
        _ if is_connect_error(status) => Attempt::NotSent(describe(status)),
        _ => Attempt::Lost(describe(status)),
    }
}

/// Whether the channel failed to connect (so the request never left this process).
fn is_connect_error(status: &tonic::Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(error) = source {
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::AddrNotAvailable
                    | std::io::ErrorKind::HostUnreachable
                    | std::io::ErrorKind::NetworkUnreachable
            )
        {
            return true;
        }
        // hyper-util's connector error ("tcp connect error") and tonic's ConnectError are
        // private types; their messages are what identifies them.
        let text = error.to_string();
        if text.contains("tcp connect error") || text.contains("error trying to connect") {
            return true;
        }
        source = error.source();
    }
    false
}

/// A gRPC failure as one line: its message, then its causes.
fn describe(status: &tonic::Status) -> String {
    let mut text = status.message().to_owned();
    append_sources(&mut text, std::error::Error::source(status));
    text
}

/// An error with its causes, as one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    append_sources(&mut text, error.source());
    text
}

fn append_sources(text: &mut String, mut source: Option<&(dyn std::error::Error + 'static)>) {
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
}
