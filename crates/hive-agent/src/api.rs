//! The agent's own HTTP API, which only the API server calls: a container's logs (exec
//! comes next). Every request carries a node proxy token ([`hive_api::proxy`]) signed by the
//! server for this node, this container and this operation; the server has already checked
//! the caller's tenant and role.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use hive_api::proxy::{self, ProxyTokenError};
use hive_api::{ProxyKey, ProxyOp};
use hive_client::Client;
use serde::Deserialize;
use tokio::sync::{Mutex, mpsc};

use crate::exec::ExecRequest;
use crate::runtime::logs::{self, ReadOptions};
use crate::runtime::{ContainerState, Containers, shim};

/// Largest `tail` accepted (the server enforces the same bound).
const MAX_TAIL: u64 = 100_000;
/// The server's key is fetched again after a failed check at most this often.
const KEY_REFRESH: Duration = Duration::from_secs(5);

/// What the API needs: who this node is, its containers, how to get the server's key.
pub struct AgentApi {
    node: String,
    containers: Containers,
    client: Client,
    key: Mutex<Option<(ProxyKey, Instant)>>,
}

impl std::fmt::Debug for AgentApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentApi")
            .field("node", &self.node)
            .field("containers", &self.containers.root)
            .finish_non_exhaustive()
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, format!("{}\n", message.into())).into_response()
}

impl AgentApi {
    pub fn new(node: String, containers: Containers, client: Client) -> Arc<Self> {
        Arc::new(Self {
            node,
            containers,
            client,
            key: Mutex::new(None),
        })
    }

    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route("/v1/containers/{id}/logs", get(container_logs))
            .route("/v1/containers/{id}/exec", post(container_exec))
            .with_state(self)
    }

    /// Checks the request's token for `op` on `container`, fetching the server's key when
    /// none is cached or, at most every few seconds, when the cached one does not verify
    /// (the server's key changed).
    async fn authorize(
        &self,
        headers: &HeaderMap,
        container: &str,
        op: ProxyOp,
    ) -> Result<(), Response> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| error(StatusCode::UNAUTHORIZED, "missing proxy token"))?;
        let now = chrono::Utc::now().timestamp();
        let mut cached = self.key.lock().await;
        for attempt in 0..2 {
            let stale = cached
                .as_ref()
                .is_none_or(|(_, at)| attempt > 0 && at.elapsed() >= KEY_REFRESH);
            if stale {
                match self.client.proxy_key().await {
                    Ok(k) => *cached = Some((k, Instant::now())),
                    Err(e) if cached.is_none() => {
                        return Err(error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("cannot read the server's proxy key: {e}"),
                        ));
                    }
                    Err(e) => tracing::warn!(error = %e, "refresh the server's proxy key"),
                }
            }
            let Some((key, _)) = cached.as_ref() else {
                continue;
            };
            match proxy::verify(key, token, &self.node, container, op, now) {
                Ok(_) => return Ok(()),
                Err(ProxyTokenError::BadSignature) if attempt == 0 => continue,
                Err(e) => return Err(error(StatusCode::FORBIDDEN, e.to_string())),
            }
        }
        Err(error(
            StatusCode::FORBIDDEN,
            ProxyTokenError::BadSignature.to_string(),
        ))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    #[serde(default)]
    follow: bool,
    tail: Option<u64>,
    #[serde(default)]
    timestamps: bool,
}

/// A container id as the agent names directories: the instance's uid.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

async fn container_logs(
    State(api): State<Arc<AgentApi>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    q: Result<Query<LogsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if !valid_id(&id) {
        return error(StatusCode::NOT_FOUND, "no such container");
    }
    if let Err(resp) = api.authorize(&headers, &id, ProxyOp::Logs).await {
        return resp;
    }
    let Ok(Query(q)) = q else {
        return error(StatusCode::BAD_REQUEST, "query: follow, tail, timestamps");
    };
    if q.tail.is_some_and(|t| t > MAX_TAIL) {
        return error(StatusCode::BAD_REQUEST, format!("tail: at most {MAX_TAIL}"));
    }
    let dir = api.containers.dir(&id);
    if !dir.is_dir() {
        return error(StatusCode::NOT_FOUND, "no such container");
    }
    let opts = ReadOptions {
        follow: q.follow,
        tail: q.tail,
        timestamps: q.timestamps,
    };
    let path = api.containers.log_path(&id);
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    tokio::task::spawn_blocking(move || {
        let exit = dir.join(shim::EXITED);
        // Gone when it exited, was removed, or nobody listens any more.
        let gone = || exit.exists() || !dir.is_dir() || tx.is_closed();
        let sink = |chunk: Vec<u8>| tx.blocking_send(Bytes::from(chunk)).is_ok();
        if let Err(e) = logs::read(&path, &opts, gone, sink) {
            tracing::warn!(container = %dir.display(), error = %e, "read logs");
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )],
        Body::from_stream(body),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecQuery {
    /// The command as a JSON array of strings.
    command: String,
    #[serde(default)]
    tty: bool,
}

/// `POST /v1/containers/{id}/exec` with `Upgrade: hive-exec.v1`: runs a process in the
/// running container; the upgraded connection carries its stdio as frames.
async fn container_exec(
    State(api): State<Arc<AgentApi>>,
    Path(id): Path<String>,
    q: Result<Query<ExecQuery>, axum::extract::rejection::QueryRejection>,
    mut req: axum::extract::Request,
) -> Response {
    use hive_client::exec::{PROTOCOL, check_command};
    if !valid_id(&id) {
        return error(StatusCode::NOT_FOUND, "no such container");
    }
    if let Err(resp) = api.authorize(req.headers(), &id, ProxyOp::Exec).await {
        return resp;
    }
    let Ok(Query(q)) = q else {
        return error(StatusCode::BAD_REQUEST, "query: command, tty");
    };
    let command: Vec<String> = match serde_json::from_str(&q.command) {
        Ok(c) => c,
        Err(_) => {
            return error(StatusCode::BAD_REQUEST, "command: a JSON array of strings");
        }
    };
    if let Err(m) = check_command(&command) {
        return error(StatusCode::BAD_REQUEST, m);
    }
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok());
    if upgrade != Some(PROTOCOL) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("exec needs Connection: upgrade and Upgrade: {PROTOCOL}"),
        );
    }
    match api.containers.state(&id) {
        ContainerState::Running(_) => {}
        ContainerState::Unknown => return error(StatusCode::NOT_FOUND, "no such container"),
        _ => return error(StatusCode::CONFLICT, "the container is not running"),
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    let runtime = api.containers.runtime_of(&id);
    let exec = ExecRequest {
        bundle: api.containers.dir(&id).join("bundle"),
        container: id,
        command,
        tty: q.tty,
    };
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(up) => {
                crate::exec::session(hyper_util::rt::TokioIo::new(up), runtime, exec).await;
            }
            Err(e) => tracing::warn!(error = %e, "exec upgrade"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, PROTOCOL)
        .body(Body::empty())
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "response"))
}

/// Serves the agent API on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, api: Arc<AgentApi>) -> std::io::Result<()> {
    // Log follows and exec sessions are streams of small writes: no Nagle delay on them.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, api.router()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_cannot_leave_the_containers_dir() {
        assert!(valid_id("0b4f3a1e-8c1d-4d7e-9f2a-1b2c3d4e5f60"));
        for bad in ["", "..", ".", "a/b", "A", "a.b", &"a".repeat(65)] {
            assert!(!valid_id(bad), "{bad}");
        }
    }
}
