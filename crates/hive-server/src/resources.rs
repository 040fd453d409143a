//! Create, get, list, update, status update, delete and watch, written once for every
//! resource kind. Each kind says which roles may read and write it ([`Served`]); the
//! isolation rule is applied here, in one place, for all of them.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;

use axum::Json;
use axum::body::Body;
use axum::extract::{FromRequest, Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, extract::rejection::QueryRejection};
use bytes::Bytes;
use chrono::Utc;
use futures_util::StreamExt;
use hive_api::{
    ApiErrorBody, ErrorCode, Event, EventType, Instance, List, Network, ObjectRef, Resource, Role,
    Scope, Service, Tenant, WatchEvent, WatchEventType,
};
use hive_store::{
    ConflictKind, EventKind, KeyValue, Op, Revision, Store, StoreError, SyncedWatchStream,
    WatchItem,
};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::keys;
use crate::networks;
use crate::state::AppState;

/// Writes that go with a write of an object, in the same transaction (claims on a VNI or an
/// address, a tenant's default network, the release of an address).
#[derive(Debug, Default)]
pub struct Hooked {
    pub ops: Vec<Op>,
    /// A conflict on this key means what the hook chose (a VNI, an address) was taken at the
    /// same time by another writer: the write is tried again with a new choice.
    pub retry_on: Option<String>,
    /// A conflict on this key means the fixed address asked for is held.
    pub in_use_on: Option<String>,
}

/// How many times a write whose hook's choice clashed is tried.
pub const HOOK_ATTEMPTS: usize = 8;

/// What a failed transaction that carried `hooked` means: `None` to try again.
fn hooked_error(err: StoreError, hooked: &Hooked, attempt: usize) -> Option<ApiError> {
    if let StoreError::Conflict { key, .. } = &err {
        if Some(key) == hooked.retry_on.as_ref() && attempt + 1 < HOOK_ATTEMPTS {
            return None;
        }
        if Some(key) == hooked.in_use_on.as_ref() {
            let ip = key.rsplit('/').next().unwrap_or_default();
            return Some(ApiError::new(
                ErrorCode::AddressInUse,
                format!("address {ip} is held by another instance"),
            ));
        }
    }
    Some(ApiError::new(
        ErrorCode::Conflict,
        format!("{err}: still taken after {HOOK_ATTEMPTS} attempts, retry"),
    ))
}

/// What a kind of object allows, on top of [`Resource`].
pub trait Served: Resource {
    /// Least role to get, list and watch (inside a tenant the caller sees).
    const READ: Role;
    /// Least role to create, update and delete.
    const WRITE: Role;
    /// Least role to write status.
    const STATUS_WRITE: Role;
    /// Users' changes to it are recorded as Events.
    const RECORD_EVENTS: bool = false;

    /// Completes a new object and returns the writes that go with its creation.
    fn on_create(
        _st: &AppState,
        _tenant: Option<&str>,
        _obj: &mut Self,
    ) -> impl Future<Output = ApiResult<Hooked>> + Send {
        async { Ok(Hooked::default()) }
    }

    /// Completes a changed spec (or refuses it) and returns the writes that go with it.
    fn on_update(
        _st: &AppState,
        _tenant: Option<&str>,
        _stored: &Self,
        _obj: &mut Self,
    ) -> impl Future<Output = ApiResult<Hooked>> + Send {
        async { Ok(Hooked::default()) }
    }

    /// Sets the fields the server owns from a user's create (`stored` is `None`) or spec
    /// update by `by`, such as a service's template revision.
    fn stamp(_by: &str, _stored: Option<&Self>, _obj: &mut Self) {}

    /// Keeps the status fields the server owns when a controller writes the status.
    fn keep_server_status(_stored: &Self, _obj: &mut Self) {}

    /// The writes that go with a deletion.
    fn on_delete(
        _st: &AppState,
        _tenant: Option<&str>,
        _stored: &Self,
    ) -> impl Future<Output = ApiResult<Hooked>> + Send {
        async { Ok(Hooked::default()) }
    }
}

impl Served for Service {
    const READ: Role = Role::Viewer;
    const WRITE: Role = Role::Member;
    const STATUS_WRITE: Role = Role::PlatformAdmin;
    const RECORD_EVENTS: bool = true;

    fn stamp(by: &str, stored: Option<&Self>, obj: &mut Self) {
        crate::services::stamp(by, stored, obj);
    }

    fn keep_server_status(stored: &Self, obj: &mut Self) {
        crate::services::keep_server_status(stored, obj);
    }

    async fn on_create(st: &AppState, tenant: Option<&str>, obj: &mut Self) -> ApiResult<Hooked> {
        crate::secgroups::service_written(st, tenant, obj).await?;
        crate::vips::service_created(st, tenant, obj).await
    }

    async fn on_update(
        st: &AppState,
        tenant: Option<&str>,
        stored: &Self,
        obj: &mut Self,
    ) -> ApiResult<Hooked> {
        crate::secgroups::service_written(st, tenant, obj).await?;
        crate::vips::service_updated(st, tenant, stored, obj).await
    }

    fn on_delete(
        st: &AppState,
        tenant: Option<&str>,
        stored: &Self,
    ) -> impl Future<Output = ApiResult<Hooked>> + Send {
        crate::vips::service_deleted(st, tenant, stored)
    }
}

impl Served for Instance {
    const READ: Role = Role::Viewer;
    const WRITE: Role = Role::PlatformAdmin;
    const STATUS_WRITE: Role = Role::PlatformAdmin;

    async fn on_create(st: &AppState, tenant: Option<&str>, obj: &mut Self) -> ApiResult<Hooked> {
        crate::tenancy::instance_bound(st, tenant, None, obj).await?;
        networks::instance_created(st, tenant, obj).await
    }

    async fn on_update(
        st: &AppState,
        tenant: Option<&str>,
        stored: &Self,
        obj: &mut Self,
    ) -> ApiResult<Hooked> {
        crate::tenancy::instance_bound(st, tenant, stored.spec.node.as_deref(), obj).await?;
        networks::instance_updated(st, tenant, stored, obj).await
    }

    fn on_delete(
        st: &AppState,
        tenant: Option<&str>,
        stored: &Self,
    ) -> impl Future<Output = ApiResult<Hooked>> + Send {
        networks::instance_deleted(st, tenant, stored)
    }
}

impl Served for Network {
    const READ: Role = Role::Viewer;
    const WRITE: Role = Role::TenantAdmin;
    const STATUS_WRITE: Role = Role::PlatformAdmin;
    const RECORD_EVENTS: bool = true;

    fn on_create(
        st: &AppState,
        tenant: Option<&str>,
        obj: &mut Self,
    ) -> impl Future<Output = ApiResult<Hooked>> + Send {
        networks::network_created(st, tenant, obj)
    }

    fn on_update(
        _st: &AppState,
        _tenant: Option<&str>,
        stored: &Self,
        obj: &mut Self,
    ) -> impl Future<Output = ApiResult<Hooked>> + Send {
        let r = networks::network_updated(stored, obj);
        async { r }
    }
}

impl Served for hive_api::SecurityGroup {
    const READ: Role = Role::Viewer;
    const WRITE: Role = Role::TenantAdmin;
    const STATUS_WRITE: Role = Role::PlatformAdmin;
    const RECORD_EVENTS: bool = true;

    fn on_create(
        st: &AppState,
        tenant: Option<&str>,
        obj: &mut Self,
    ) -> impl Future<Output = ApiResult<Hooked>> + Send {
        crate::secgroups::group_written(st, tenant, obj)
    }

    fn on_update(
        st: &AppState,
        tenant: Option<&str>,
        _stored: &Self,
        obj: &mut Self,
    ) -> impl Future<Output = ApiResult<Hooked>> + Send {
        crate::secgroups::group_written(st, tenant, obj)
    }

    fn on_delete(
        st: &AppState,
        tenant: Option<&str>,
        stored: &Self,
    ) -> impl Future<Output = ApiResult<Hooked>> + Send {
        crate::secgroups::group_deleted(st, tenant, stored)
    }
}

impl Served for Event {
    const READ: Role = Role::Viewer;
    const WRITE: Role = Role::PlatformAdmin;
    const STATUS_WRITE: Role = Role::PlatformAdmin;
}

impl Served for hive_api::Node {
    const READ: Role = Role::PlatformAdmin;
    const WRITE: Role = Role::PlatformAdmin;
    const STATUS_WRITE: Role = Role::PlatformAdmin;

    fn on_update(
        _st: &AppState,
        _tenant: Option<&str>,
        stored: &Self,
        obj: &mut Self,
    ) -> impl Future<Output = ApiResult<Hooked>> + Send {
        let r = crate::tenancy::node_updated(stored, obj).map(|()| Hooked::default());
        async { r }
    }
}

impl Served for Tenant {
    const READ: Role = Role::Viewer;
    const WRITE: Role = Role::PlatformAdmin;
    const STATUS_WRITE: Role = Role::PlatformAdmin;

    fn on_create(
        st: &AppState,
        _tenant: Option<&str>,
        obj: &mut Self,
    ) -> impl Future<Output = ApiResult<Hooked>> + Send {
        networks::tenant_created(st, obj)
    }
}

/// A JSON body whose rejections become [`ApiError`]s with stable codes.
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// Query string parameters of list and watch.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Page size (1 to 1000, default 1000).
    pub limit: Option<usize>,
    /// The `continue` of the previous page.
    #[serde(rename = "continue")]
    pub continue_: Option<String>,
    /// Stream changes instead of listing.
    #[serde(default)]
    pub watch: bool,
    /// With `watch`: changes after this revision (default: from now).
    pub revision: Option<Revision>,
}

pub const MAX_PAGE: usize = 1000;

/// Query of delete: an optional revision precondition.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteQuery {
    pub revision: Option<Revision>,
}

pub(crate) fn query<T: Default>(q: Result<Query<T>, QueryRejection>) -> ApiResult<T> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::invalid(format!("query string: {}", e.body_text())))
}

/// The tenant and name from a route's path parameters.
#[derive(Debug)]
pub struct Target {
    pub tenant: Option<String>,
    pub name: Option<String>,
}

impl Target {
    /// Tenant routes name themselves `{tenant}` (the path segment other routes nest under).
    pub fn of<R: Resource>(mut params: HashMap<String, String>) -> Self {
        match R::SCOPE {
            Scope::Tenant => Self {
                tenant: params.remove("tenant"),
                name: params.remove("name"),
            },
            Scope::Cluster => {
                let name = params.remove("name").or_else(|| params.remove("tenant"));
                Self { tenant: None, name }
            }
        }
    }

    pub fn from_path(mut params: HashMap<String, String>) -> Self {
        Self {
            tenant: params.remove("tenant"),
            name: params.remove("name"),
        }
    }

    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or_default()
    }
}

/// A tenant as checked for a request: its key's revision (to guard writes against its
/// deletion), its uid, the object itself and the store revision it was read at.
#[derive(Debug)]
pub struct TenantGuard {
    pub name: String,
    pub uid: String,
    pub revision: Revision,
    pub tenant: std::sync::Arc<Tenant>,
    pub read_at: Revision,
}

impl TenantGuard {
    /// A transaction op that fails if the tenant was deleted (or changed) since it was read.
    pub fn require(&self) -> Op {
        Op::Require {
            key: keys::object::<Tenant>(None, &self.name),
            mod_revision: self.revision,
        }
    }
}

fn tenant_not_found(tenant: &str) -> ApiError {
    ApiError::not_found("tenant", tenant, None)
}

/// Reads tenant `name` for a caller that may see it, or answers "not found". For a tenant's
/// own token the uid must be the one the token was issued in.
pub async fn load_tenant(st: &AppState, p: &Principal, name: &str) -> ApiResult<TenantGuard> {
    if !p.sees_tenant(name) {
        return Err(tenant_not_found(name));
    }
    let got = st.store.get(&keys::object::<Tenant>(None, name)).await?;
    let kv = got.kv.ok_or_else(|| tenant_not_found(name))?;
    let tenant = st.tenants.get(&kv)?;
    if !p.is_platform_admin() && p.tenant_uid.as_deref() != Some(tenant.uid.as_str()) {
        return Err(tenant_not_found(name));
    }
    Ok(TenantGuard {
        name: name.to_owned(),
        uid: tenant.uid.clone(),
        revision: kv.mod_revision,
        tenant,
        read_at: got.revision,
    })
}

/// Applies the isolation and role rules for an action on kind `R`. Returns the tenant when
/// the kind is tenant-scoped.
async fn authorize<R: Served>(
    st: &AppState,
    p: &Principal,
    target: &Target,
    need: Role,
    action: &str,
) -> ApiResult<Option<TenantGuard>> {
    let guard = match R::SCOPE {
        Scope::Tenant => {
            let tenant = target.tenant.as_deref().unwrap_or_default();
            Some(load_tenant(st, p, tenant).await?)
        }
        Scope::Cluster => None,
    };
    p.require(need, &format!("{action} {}", R::PLURAL))?;
    Ok(guard)
}

pub fn decode<R: Resource>(kv: &KeyValue) -> ApiResult<R> {
    let mut obj: R = serde_json::from_slice(&kv.value).map_err(|e| {
        ApiError::internal("internal error").log_cause(format!("decode {}: {e}", kv.key))
    })?;
    obj.set_revision(kv.mod_revision);
    Ok(obj)
}

pub(crate) fn encode<R: Resource>(obj: &R) -> ApiResult<Bytes> {
    serde_json::to_vec(obj).map(Bytes::from).map_err(|e| {
        ApiError::internal("internal error").log_cause(format!("encode {}: {e}", R::KIND))
    })
}

fn new_uid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// An op that records an Event in `tenant` about `kind` `name`, in the same transaction as
/// the change it describes.
pub fn event_op(
    tenant: &str,
    reason: &str,
    kind: &str,
    name: &str,
    message: String,
) -> ApiResult<Op> {
    let now = Utc::now();
    let ev_name = event_name(now.timestamp_millis().max(0) as u64);
    let mut ev = Event {
        name: ev_name.clone(),
        type_: EventType::Normal,
        reason: reason.to_owned(),
        object: ObjectRef {
            kind: kind.to_owned(),
            name: name.to_owned(),
        },
        message,
        source: "api-server".to_owned(),
        ..Default::default()
    };
    ev.init_system_fields(Some(tenant), new_uid(), now);
    Ok(Op::Create {
        key: keys::object::<Event>(Some(tenant), &ev_name),
        value: encode(&ev)?,
    })
}

/// A name that sorts by creation: a per-process monotonic tick (milliseconds shifted left 16
/// bits, bumped when two events share a millisecond) in fixed-width hex, then randomness so
/// that several API servers never pick the same name.
fn event_name(millis: u64) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let want = millis << 16;
    let tick = match LAST.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
        Some(want.max(last + 1))
    }) {
        Ok(last) | Err(last) => want.max(last + 1),
    };
    let rand: u16 = rand::random();
    format!("{tick:016x}-{rand:04x}")
}

/// Maps a failed transaction that also carried a tenant guard.
pub(crate) fn txn_error<R: Resource>(
    err: StoreError,
    name: &str,
    guard: Option<&TenantGuard>,
) -> ApiError {
    if let (Some(g), StoreError::Conflict { key, .. }) = (guard, &err)
        && *key == keys::object::<Tenant>(None, &g.name)
    {
        return tenant_not_found(&g.name);
    }
    if let StoreError::Conflict { key, .. } = &err
        && key == crate::leader::LEADER_KEY
    {
        return ApiError::new(
            hive_api::ErrorCode::Conflict,
            "leadership moved on: this controller's term is over, nothing was written",
        );
    }
    ApiError::from_store(err, R::KIND, name, guard.map(|g| g.name.as_str()))
}

pub async fn create<R: Served>(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(params): Path<HashMap<String, String>>,
    ApiJson(mut obj): ApiJson<R>,
) -> ApiResult<(StatusCode, Json<R>)> {
    let target = Target::of::<R>(params);
    let guard = authorize::<R>(&st, &p, &target, R::WRITE, "create").await?;
    obj.validate()?;
    let tenant = guard.as_ref().map(|g| g.name.as_str());
    obj.init_system_fields(tenant, new_uid(), Utc::now());
    R::stamp(&p.name, None, &mut obj);
    let name = obj.name().to_owned();
    let mut attempt = 0;
    loop {
        let mut obj = obj.clone();
        let hooked = R::on_create(&st, tenant, &mut obj).await?;
        let mut ops = Vec::with_capacity(3 + hooked.ops.len());
        if let Some(g) = &guard {
            ops.push(g.require());
        }
        ops.push(Op::Create {
            key: keys::object::<R>(tenant, &name),
            value: encode(&obj)?,
        });
        ops.extend(hooked.ops.iter().cloned());
        ops.extend(p.fence_op());
        if R::RECORD_EVENTS
            && let Some(t) = tenant
        {
            ops.push(event_op(
                t,
                "Created",
                R::KIND,
                &name,
                format!("{} {name} created by {}", R::KIND, p.name),
            )?);
        }
        match st.store.txn(ops).await {
            Ok(resp) => {
                obj.set_revision(resp.revision);
                return Ok((StatusCode::CREATED, Json(obj)));
            }
            Err(e) if is_hook_conflict(&e, &hooked) => {
                if let Some(err) = hooked_error(e, &hooked, attempt) {
                    return Err(err);
                }
                attempt += 1;
            }
            Err(e) => return Err(txn_error::<R>(e, &name, guard.as_ref())),
        }
    }
}

/// Whether a failed transaction failed on a key a hook added a condition on.
fn is_hook_conflict(err: &StoreError, hooked: &Hooked) -> bool {
    matches!(err, StoreError::Conflict { key, .. }
        if Some(key) == hooked.retry_on.as_ref() || Some(key) == hooked.in_use_on.as_ref())
}

pub async fn get<R: Served>(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(params): Path<HashMap<String, String>>,
) -> ApiResult<Response> {
    let target = Target::of::<R>(params);
    let guard = authorize::<R>(&st, &p, &target, R::READ, "read").await?;
    let tenant = guard.as_ref().map(|g| g.name.as_str());
    let name = target.name();
    let kv = st
        .store
        .get(&keys::object::<R>(tenant, name))
        .await?
        .kv
        .ok_or_else(|| ApiError::not_found(R::KIND, name, tenant))?;
    Ok(json_response(st.rendered.json::<R>(&kv)?))
}

/// A `200` with a JSON body already rendered.
fn json_response(body: Bytes) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// Reads one object, or "not found".
pub(crate) async fn read<R: Resource>(
    st: &AppState,
    guard: Option<&TenantGuard>,
    name: &str,
) -> ApiResult<(R, Revision)> {
    let tenant = guard.map(|g| g.name.as_str());
    let got = st.store.get(&keys::object::<R>(tenant, name)).await?;
    let kv = got
        .kv
        .ok_or_else(|| ApiError::not_found(R::KIND, name, tenant))?;
    Ok((decode(&kv)?, kv.mod_revision))
}

pub async fn list<R: Served>(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(params): Path<HashMap<String, String>>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let q = query(q)?;
    let target = Target::of::<R>(params);
    let guard = authorize::<R>(&st, &p, &target, R::READ, "list").await?;
    let prefix = keys::collection::<R>(guard.as_ref().map(|g| g.name.as_str()));
    if q.watch {
        return watch::<R>(&st, &prefix, q.revision).await;
    }
    let page = read_page(&st, &prefix, &q).await?;
    let continue_ = continue_after(&page, &prefix);
    Ok(json_response(st.rendered.list::<R>(
        &page.kvs,
        page.revision,
        continue_,
    )?))
}

/// Where the page after `page` starts: the name of its last object, if more follow.
fn continue_after<'a>(page: &'a hive_store::ListResponse, prefix: &str) -> Option<&'a str> {
    page.more
        .then(|| page.kvs.last())
        .flatten()
        .and_then(|kv| kv.key.strip_prefix(prefix))
}

pub async fn list_page<R: Resource>(
    st: &AppState,
    prefix: &str,
    q: &ListQuery,
) -> ApiResult<List<R>> {
    let page = read_page(st, prefix, q).await?;
    let items = page
        .kvs
        .iter()
        .map(decode::<R>)
        .collect::<ApiResult<Vec<R>>>()?;
    Ok(List {
        continue_: continue_after(&page, prefix).map(Into::into),
        items,
        revision: page.revision,
    })
}

/// One page of the keys under `prefix`, as the query asks.
async fn read_page(
    st: &AppState,
    prefix: &str,
    q: &ListQuery,
) -> ApiResult<hive_store::ListResponse> {
    let limit = q.limit.unwrap_or(MAX_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(format!(
            "limit {limit} is outside 1..={MAX_PAGE}"
        )));
    }
    if let Some(c) = &q.continue_ {
        hive_api::validate::name("continue", c)?;
    }
    let start_after = q.continue_.as_ref().map(|name| format!("{prefix}{name}"));
    Ok(st.store.list(prefix, start_after.as_deref(), limit).await?)
}

pub async fn update<R: Served>(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(params): Path<HashMap<String, String>>,
    ApiJson(obj): ApiJson<R>,
) -> ApiResult<Json<R>> {
    let target = Target::of::<R>(params);
    let guard = authorize::<R>(&st, &p, &target, R::WRITE, "update").await?;
    obj.validate()?;
    write_back(&st, &p, guard, &target, obj, false).await
}

pub async fn update_status<R: Served>(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(params): Path<HashMap<String, String>>,
    ApiJson(obj): ApiJson<R>,
) -> ApiResult<Json<R>> {
    let target = Target::of::<R>(params);
    let guard = authorize::<R>(&st, &p, &target, R::STATUS_WRITE, "update the status of").await?;
    write_back(&st, &p, guard, &target, obj, true).await
}

/// Replaces the spec (or, for `status`, the status) of a stored object, under the revision
/// precondition the body carries (0: the revision just read).
async fn write_back<R: Served>(
    st: &AppState,
    p: &Principal,
    guard: Option<TenantGuard>,
    target: &Target,
    mut obj: R,
    status: bool,
) -> ApiResult<Json<R>> {
    let name = target.name();
    if obj.name() != name {
        return Err(ApiError::invalid(format!(
            "name: body says {:?} but the path says {name:?}",
            obj.name()
        )));
    }
    let tenant = guard.as_ref().map(|g| g.name.as_str());
    let (mut stored, stored_rev) = read::<R>(st, guard.as_ref(), name).await?;
    // Without a precondition the write applies to whatever is stored: a change that lands
    // between our read and our write (a controller's status, say) is read again, not a 409.
    let unconditional = obj.revision() == 0;
    let mut expected = if unconditional {
        stored_rev
    } else {
        obj.revision()
    };
    obj.keep_system_fields(&stored);
    let key = keys::object::<R>(tenant, name);
    let (mut attempt, mut rereads) = (0, 0);
    loop {
        let mut obj = obj.clone();
        let hooked = if status {
            obj.keep_spec(&stored);
            R::keep_server_status(&stored, &mut obj);
            obj.validate()?;
            Hooked::default()
        } else {
            obj.keep_status(&stored);
            R::stamp(&p.name, Some(&stored), &mut obj);
            R::on_update(st, tenant, &stored, &mut obj).await?
        };
        match write_once(st, p, &guard, name, &stored, obj, status, expected, &hooked).await {
            Err(WriteError::Store(e)) if is_hook_conflict(&e, &hooked) => {
                if let Some(err) = hooked_error(e, &hooked, attempt) {
                    return Err(err);
                }
                attempt += 1;
            }
            Err(WriteError::Store(StoreError::Conflict {
                key: k,
                kind: ConflictKind::RevisionMismatch { .. },
            })) if unconditional && k == key && rereads < UNCONDITIONAL_REREADS => {
                rereads += 1;
                let (again, rev) = read::<R>(st, guard.as_ref(), name).await?;
                stored = again;
                expected = rev;
            }
            Err(WriteError::Store(e)) => return Err(txn_error::<R>(e, name, guard.as_ref())),
            Err(WriteError::Api(e)) => return Err(e),
            Ok(obj) => return Ok(Json(obj)),
        }
    }
}

/// How many times a write without a revision precondition reads the object again after
/// another write came in between.
const UNCONDITIONAL_REREADS: usize = 5;

enum WriteError {
    Store(StoreError),
    Api(ApiError),
}

impl From<ApiError> for WriteError {
    fn from(e: ApiError) -> Self {
        WriteError::Api(e)
    }
}

/// One attempt of [`write_back`]: the update, what its hook adds, and its Event.
#[allow(clippy::too_many_arguments)]
async fn write_once<R: Served>(
    st: &AppState,
    p: &Principal,
    guard: &Option<TenantGuard>,
    name: &str,
    stored: &R,
    mut obj: R,
    status: bool,
    expected: Revision,
    hooked: &Hooked,
) -> Result<R, WriteError> {
    let tenant = guard.as_ref().map(|g| g.name.as_str());
    let mut ops = vec![Op::Update {
        key: keys::object::<R>(tenant, name),
        value: encode(&obj)?,
        mod_revision: expected,
    }];
    ops.extend(hooked.ops.iter().cloned());
    ops.extend(p.fence_op());
    if !status
        && R::RECORD_EVENTS
        && let Some(t) = tenant
    {
        let mut before = serde_json::to_value(stored).unwrap_or_default();
        let mut after = serde_json::to_value(&obj).unwrap_or_default();
        let replicas = |v: &mut serde_json::Value| v["spec"]["replicas"].take();
        let (r0, r1) = (replicas(&mut before), replicas(&mut after));
        // A spec write keeps the status, except what the server fills in (a VIP): no
        // reason for an Event.
        for v in [&mut before, &mut after] {
            v["revision"] = serde_json::Value::Null;
            v["status"] = serde_json::Value::Null;
        }
        if before == after && r0 != r1 {
            ops.push(event_op(
                t,
                "Scaled",
                R::KIND,
                name,
                format!(
                    "{} {name} scaled from {r0} to {r1} replicas by {}",
                    R::KIND,
                    p.name
                ),
            )?);
        } else if before != after || r0 != r1 {
            ops.push(event_op(
                t,
                "Updated",
                R::KIND,
                name,
                format!("{} {name} updated by {}", R::KIND, p.name),
            )?);
        }
    }
    let resp = st.store.txn(ops).await.map_err(WriteError::Store)?;
    obj.set_revision(resp.revision);
    Ok(obj)
}

pub async fn delete<R: Served>(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(params): Path<HashMap<String, String>>,
    q: Result<Query<DeleteQuery>, QueryRejection>,
) -> ApiResult<Json<R>> {
    let q = query(q)?;
    let target = Target::of::<R>(params);
    let guard = authorize::<R>(&st, &p, &target, R::WRITE, "delete").await?;
    let name = target.name();
    let tenant = guard.as_ref().map(|g| g.name.as_str());
    let key = keys::object::<R>(tenant, name);
    let mut attempt = 0;
    loop {
        let (stored, stored_rev) = read::<R>(&st, guard.as_ref(), name).await?;
        let mut ops = vec![Op::Delete {
            key: key.clone(),
            mod_revision: Some(q.revision.unwrap_or(stored_rev)),
        }];
        ops.extend(R::on_delete(&st, tenant, &stored).await?.ops);
        ops.extend(p.fence_op());
        if R::RECORD_EVENTS
            && let Some(t) = tenant
        {
            ops.push(event_op(
                t,
                "Deleted",
                R::KIND,
                name,
                format!("{} {name} deleted by {}", R::KIND, p.name),
            )?);
        }
        match st.store.txn(ops).await {
            Ok(_) => return Ok(Json(stored)),
            // Without a precondition the caller wants it gone whatever changed in between
            // (a controller writing its status): read it again.
            Err(StoreError::Conflict { key: k, .. })
                if q.revision.is_none() && k == key && attempt + 1 < HOOK_ATTEMPTS =>
            {
                attempt += 1;
            }
            Err(e) => return Err(txn_error::<R>(e, name, guard.as_ref())),
        }
    }
}

/// Streams changes under `prefix` after `after` (default: now) as newline-delimited JSON:
/// a `BOOKMARK` at the revision the server was at when the watch opened as soon as every
/// event up to it has been sent (the end of the replay, which a resuming client waits for),
/// and another every bookmark interval while idle.
pub async fn watch<R: Resource>(
    st: &AppState,
    prefix: &str,
    after: Option<Revision>,
) -> ApiResult<Response> {
    let after = match after {
        Some(r) => r,
        None => st.store.current_revision().await?,
    };
    let stream = st.store.watch_synced(prefix, after).await?;
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    tokio::spawn(pump::<R>(st.clone(), stream, tx, after));
    let mut response = Response::new(Body::from_stream(ReceiverStream::new(rx)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

fn line<R: Resource>(ev: &WatchEvent<R>) -> Bytes {
    let mut v = serde_json::to_vec(ev).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// Turns a store event into the API's watch event.
fn to_watch_event<R: Resource>(ev: &hive_store::Event) -> ApiResult<WatchEvent<R>> {
    let revision = ev.revision();
    let (type_, kv) = match (ev.kind, &ev.prev) {
        (EventKind::Put, None) => (WatchEventType::Added, &ev.kv),
        (EventKind::Put, Some(_)) => (WatchEventType::Modified, &ev.kv),
        (EventKind::Delete, Some(prev)) => (WatchEventType::Deleted, prev),
        (EventKind::Delete, None) => {
            return Err(ApiError::internal("internal error").log_cause(format!(
                "delete event without previous value for {}",
                ev.kv.key
            )));
        }
    };
    let mut object: R = decode(kv)?;
    if type_ == WatchEventType::Deleted {
        object.set_revision(revision);
    }
    Ok(WatchEvent {
        type_,
        revision,
        object: Some(object),
        error: None,
    })
}

async fn pump<R: Resource>(
    st: AppState,
    mut stream: SyncedWatchStream,
    tx: mpsc::Sender<Result<Bytes, Infallible>>,
    mut last: Revision,
) {
    let mut tick = tokio::time::interval(st.config.bookmark_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let bookmark = |revision| {
        line::<R>(&WatchEvent {
            type_: WatchEventType::Bookmark,
            revision,
            object: None,
            error: None,
        })
    };
    loop {
        let out = tokio::select! {
            _ = tx.closed() => return,
            _ = st.closed() => return,
            item = stream.next() => match item {
                Some(Ok(WatchItem::Event(ev))) => {
                    last = ev.revision();
                    match to_watch_event::<R>(&ev) {
                        Ok(we) => line(&we),
                        Err(_) => continue,
                    }
                }
                // The replay is over: said at once, not at the next idle tick.
                Some(Ok(WatchItem::Synced(revision))) => {
                    last = last.max(revision);
                    bookmark(last)
                }
                Some(Err(e)) => {
                    let err = ApiError::from(e);
                    let body = ApiErrorBody { code: err.code, message: err.message, request_id: String::new() };
                    let _ = tx.send(Ok(line::<R>(&WatchEvent { type_: WatchEventType::Error, revision: last, object: None, error: Some(body) }))).await;
                    return;
                }
                None => return,
            },
            _ = tick.tick() => bookmark(last),
        };
        if tx.send(Ok(out)).await.is_err() {
            return;
        }
    }
}

/// Every page of a prefix, for small internal listings (a tenant's tokens).
pub async fn list_all(st: &AppState, prefix: &str) -> ApiResult<Vec<KeyValue>> {
    list_all_in(st.store.as_ref(), prefix).await
}

/// [`list_all`] on a store.
pub async fn list_all_in(store: &dyn Store, prefix: &str) -> ApiResult<Vec<KeyValue>> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.list(prefix, after.as_deref(), MAX_PAGE).await?;
        after = page.kvs.last().map(|kv| kv.key.clone());
        out.extend(page.kvs);
        if !page.more {
            return Ok(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_sort_by_creation_and_are_valid() {
        let names: Vec<String> = (0..1000).map(|_| event_name(1_700_000_000_000)).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        for n in &names {
            hive_api::validate::name("name", n).unwrap();
        }
    }
}
