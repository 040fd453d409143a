//! Requests the API server passes on to a node's agent: an instance's logs, and exec sessions
//! (an upgraded connection joined to one the agent upgraded, bytes copied both ways).
//!
//! The caller is checked here like on every tenant route (isolation first, then role); the
//! agent is then asked with a node proxy token ([`hive_api::proxy`]) that names the node, the
//! container and the operation, signed with the server's Ed25519 key. The key lives in the
//! store, created by the first server that needs it, so every API server signs with it.

use std::collections::HashMap;

use axum::Extension;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State, rejection::QueryRejection};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use hive_api::{ErrorCode, Instance, Node, ProxyClaims, ProxyKey, ProxyOp, ProxySigner, Role};
use hive_store::{ConflictKind, Op, StoreError};
use serde::Deserialize;

use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::keys;
use crate::resources::{self, Target, load_tenant};
use crate::state::AppState;

/// Largest `tail` accepted.
pub const MAX_TAIL: u64 = 100_000;

/// The signing key, read from the store or created there on first use.
pub async fn signer(st: &AppState) -> ApiResult<&ProxySigner> {
    st.proxy_signer
        .get_or_try_init(|| async {
            for _ in 0..3 {
                if let Some(kv) = st.store.get(keys::PROXY_KEY).await?.kv {
                    return ProxySigner::from_pkcs8(&kv.value).map_err(|e| {
                        ApiError::internal("internal error").log_cause(format!("proxy key: {e}"))
                    });
                }
                let der = ProxySigner::generate().map_err(|e| {
                    ApiError::internal("internal error").log_cause(format!("proxy key: {e}"))
                })?;
                match st
                    .store
                    .txn(vec![Op::Create {
                        key: keys::PROXY_KEY.to_owned(),
                        value: Bytes::from(der),
                    }])
                    .await
                {
                    // Read back what was stored, whoever won.
                    Ok(_)
                    | Err(StoreError::Conflict {
                        kind: ConflictKind::Exists { .. },
                        ..
                    }) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            Err(ApiError::internal("internal error").log_cause("proxy key: no stable key".into()))
        })
        .await
}

/// `GET /api/v1/proxy-key`: the public half, for agents (any authenticated caller).
pub async fn proxy_key(State(st): State<AppState>) -> ApiResult<Json<ProxyKey>> {
    Ok(Json(signer(&st).await?.public_key()))
}

/// Query of the logs route.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    #[serde(default)]
    pub follow: bool,
    pub tail: Option<u64>,
    #[serde(default)]
    pub timestamps: bool,
}

/// Where an instance's container is: its node's agent and the container id.
struct Located {
    node: String,
    agent_url: String,
    container: String,
}

async fn locate(
    st: &AppState,
    p: &Principal,
    target: &Target,
    need: Role,
    action: &str,
) -> ApiResult<Located> {
    let tenant = target.tenant.as_deref().unwrap_or_default();
    let guard = load_tenant(st, p, tenant).await?;
    p.require(need, action)?;
    let name = target.name();
    let (inst, _) = resources::read::<Instance>(st, Some(&guard), name).await?;
    let not_started = |why: &str| {
        ApiError::new(
            ErrorCode::NotStarted,
            format!("instance {name:?} has no container yet: {why}"),
        )
    };
    let Some(node) = inst.spec.node.clone() else {
        return Err(not_started("not placed on a node"));
    };
    if inst.status.container_id.is_empty() {
        return Err(not_started(&format!("node {node} has not started it")));
    }
    let got = st.store.get(&keys::object::<Node>(None, &node)).await?;
    let n: Node = match got.kv {
        Some(kv) => resources::decode(&kv)?,
        None => return Err(not_started(&format!("its node {node} is gone"))),
    };
    if n.status.agent_url.is_empty() {
        return Err(ApiError::new(
            ErrorCode::NodeUnreachable,
            format!("node {node} has no agent address"),
        ));
    }
    Ok(Located {
        node,
        agent_url: n.status.agent_url,
        container: inst.uid,
    })
}

impl Located {
    fn unreachable(&self, e: impl std::fmt::Display) -> ApiError {
        ApiError::new(
            ErrorCode::NodeUnreachable,
            format!("node {}'s agent: {e}", self.node),
        )
    }

    /// Sends `req` (built on `http` for `url` under the agent) with a proxy token for `op`;
    /// answers with the agent's response when its status is `want`, else with the error that
    /// explains it (404/409: no running container; anything else: unreachable).
    async fn ask(
        &self,
        st: &AppState,
        instance: &str,
        op: ProxyOp,
        build: impl FnOnce(&reqwest::Client, String) -> reqwest::RequestBuilder,
        path_and_query: &str,
        want: u16,
    ) -> ApiResult<reqwest::Response> {
        let token = signer(st).await?.sign(&ProxyClaims {
            node: self.node.clone(),
            container: self.container.clone(),
            op,
            exp: chrono::Utc::now().timestamp() + hive_api::proxy::TOKEN_TTL_SECS,
        });
        let http = st
            .proxy_http
            .get_or_try_init(|| async { hive_client::http() })
            .await
            .map_err(|e| self.unreachable(e))?;
        let url = format!(
            "{}/v1/containers/{}/{path_and_query}",
            self.agent_url, self.container
        );
        let resp = build(http, url)
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        match resp.status().as_u16() {
            s if s == want => Ok(resp),
            404 | 409 => Err(ApiError::new(
                ErrorCode::NotStarted,
                format!(
                    "instance {instance:?} has no running container on node {} (yet, or any \
                     more)",
                    self.node
                ),
            )),
            s => {
                let body = resp.text().await.unwrap_or_default();
                Err(self.unreachable(format!(
                    "answered {s}: {}",
                    body.trim().chars().take(200).collect::<String>()
                )))
            }
        }
    }
}

/// `GET /api/v1/tenants/{tenant}/instances/{name}/logs`: the container's output, streamed
/// from its node (viewer and up).
pub async fn logs(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(params): Path<HashMap<String, String>>,
    q: Result<Query<LogsQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let q = resources::query(q)?;
    if q.tail.is_some_and(|t| t > MAX_TAIL) {
        return Err(ApiError::invalid(format!("tail: at most {MAX_TAIL} lines")));
    }
    let target = Target::from_path(params);
    let at = locate(&st, &p, &target, Role::Viewer, "read instance logs").await?;
    let mut query = format!("logs?follow={}&timestamps={}", q.follow, q.timestamps);
    if let Some(t) = q.tail {
        query.push_str(&format!("&tail={t}"));
    }
    let resp = at
        .ask(
            &st,
            target.name(),
            ProxyOp::Logs,
            |h, u| h.get(u),
            &query,
            200,
        )
        .await?;
    // A follow stream ends when the server shuts down, like a watch.
    let body = resp
        .bytes_stream()
        .take_until(async move { st.closed().await });
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )],
        Body::from_stream(body),
    )
        .into_response())
}

/// Query of the exec route.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecQuery {
    /// The command as a JSON array of strings.
    pub command: String,
    #[serde(default)]
    pub tty: bool,
}

/// `POST /api/v1/tenants/{tenant}/instances/{name}/exec` with `Upgrade: hive-exec.v1`: a
/// process in the instance's container (member and up), its stdio over the upgraded
/// connection ([`hive_client::exec`]).
pub async fn exec(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(params): Path<HashMap<String, String>>,
    q: Result<Query<ExecQuery>, QueryRejection>,
    mut req: axum::extract::Request,
) -> ApiResult<Response> {
    use hive_client::exec::{PROTOCOL, check_command};
    let target = Target::from_path(params);
    // Isolation and role first: another tenant's instance is "not found" whatever it sent.
    let at = locate(&st, &p, &target, Role::Member, "exec in instances").await?;
    let q = q
        .map(|Query(q)| q)
        .map_err(|e| ApiError::invalid(format!("query string: {}", e.body_text())))?;
    let command: Vec<String> = serde_json::from_str(&q.command)
        .map_err(|_| ApiError::invalid("command: a JSON array of strings"))?;
    check_command(&command).map_err(ApiError::invalid)?;
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok());
    if upgrade != Some(PROTOCOL) {
        return Err(ApiError::invalid(format!(
            "exec needs the headers Connection: upgrade and Upgrade: {PROTOCOL}"
        )));
    }
    let query = format!(
        "exec?command={}&tty={}",
        hive_client::segment(&q.command),
        q.tty
    );
    let upgrade = |h: &reqwest::Client, u: String| {
        h.post(u)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, PROTOCOL)
    };
    let resp = at
        .ask(&st, target.name(), ProxyOp::Exec, upgrade, &query, 101)
        .await?;
    let mut agent = resp.upgrade().await.map_err(|e| at.unreachable(e))?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(client) => {
                let mut client = hyper_util::rt::TokioIo::new(client);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut agent).await;
            }
            Err(e) => tracing::debug!(error = %e, "exec: client upgrade"),
        }
    });
    Response::builder()
        .status(axum::http::StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, PROTOCOL)
        .body(Body::empty())
        .map_err(|e| ApiError::internal("internal error").log_cause(e.to_string()))
}
