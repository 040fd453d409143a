//! The route table: every route is mounted together with its OpenAPI operation.

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, put};
use hive_api::{
    API_PREFIX, ApiToken, CreatedToken, Event, ImageList, ImageRepository, ImageUpdate, Instance,
    Network, Node, ProxyKey, RegistryGcReport, RolloutAction, Scope, Service, Tenant, TokenCreate,
    WhoAmI,
};
use utoipa::openapi::path::HttpMethod;
use utoipa::openapi::schema::Type;
use utoipa::openapi::{OpenApi, Ref};

use crate::middleware;
use crate::openapi::{ApiDoc, Op, title_case};
use crate::resources::{self, Served};
use crate::state::AppState;
use crate::{auth, images, nodeproxy, services, tenants, tokens};

const LIST_QUERY: &[(&str, &str, Type)] = &[
    (
        "limit",
        "page size, 1 to 1000 (default 1000)",
        Type::Integer,
    ),
    (
        "continue",
        "the `continue` of the previous page",
        Type::String,
    ),
    (
        "watch",
        "stream newline-delimited watch events instead of listing",
        Type::Boolean,
    ),
    (
        "revision",
        "with watch: events after this revision (default: from now)",
        Type::Integer,
    ),
];

struct Table {
    authed: Router<AppState>,
    doc: ApiDoc,
}

impl Table {
    fn route(&mut self, path: &str, handler: MethodRouter<AppState>) {
        let authed = std::mem::take(&mut self.authed);
        self.authed = authed.route(path, handler);
    }

    /// Mounts the routes of kind `R` (list/create on the collection; get/update/delete on an
    /// item; update of its status) and documents them. `custom` replaces some handlers.
    fn resource<R: Served>(&mut self, custom: Custom) {
        let coll = match R::SCOPE {
            Scope::Cluster => format!("{API_PREFIX}/{}", R::PLURAL),
            Scope::Tenant => format!("{API_PREFIX}/tenants/{{tenant}}/{}", R::PLURAL),
        };
        let item = match R::SCOPE {
            Scope::Cluster if R::PLURAL == "tenants" => format!("{coll}/{{tenant}}"),
            _ => format!("{coll}/{{name}}"),
        };
        let status = format!("{item}/status");
        let list = custom.list.unwrap_or_else(|| get(resources::list::<R>));
        self.route(&coll, list.post(resources::create::<R>));
        let item_get = custom.get.unwrap_or_else(|| get(resources::get::<R>));
        let item_delete = custom
            .delete
            .unwrap_or_else(|| axum::routing::delete(resources::delete::<R>));
        self.route(
            &item,
            item_get.put(resources::update::<R>).merge(item_delete),
        );
        if custom.status {
            self.route(&status, put(resources::update_status::<R>));
        }

        let kind = title_case(R::KIND);
        let plural = title_case(R::PLURAL);
        let obj = self.doc.schema::<R>();
        let page = self.doc.list_schema::<R>();
        let tag = R::PLURAL;
        let not_found: &[&str] = &["403", "404"];
        self.doc.add(Op {
            method: HttpMethod::Get,
            path: &coll,
            id: format!("list{plural}"),
            tag,
            summary: format!("List {} (or watch them with watch=true)", R::PLURAL),
            body: None,
            ok_status: "200",
            ok: Some(page),
            query: LIST_QUERY,
            errors: &["403", "404", "410", "422"],
            auth: true,
        });
        self.doc.add(Op {
            method: HttpMethod::Post,
            path: &coll,
            id: format!("create{kind}"),
            tag,
            summary: format!("Create a {}", R::KIND),
            body: Some(obj.clone()),
            ok_status: "201",
            ok: Some(obj.clone()),
            query: &[],
            errors: &["400", "403", "404", "409", "413", "415", "422"],
            auth: true,
        });
        self.doc.add(Op {
            method: HttpMethod::Get,
            path: &item,
            id: format!("get{kind}"),
            tag,
            summary: format!("Read a {}", R::KIND),
            body: None,
            ok_status: "200",
            ok: Some(obj.clone()),
            query: &[],
            errors: not_found,
            auth: true,
        });
        self.doc.add(Op {
            method: HttpMethod::Put,
            path: &item,
            id: format!("update{kind}"),
            tag,
            summary: format!(
                "Replace a {}'s spec; `revision` in the body is the precondition (0: none)",
                R::KIND
            ),
            body: Some(obj.clone()),
            ok_status: "200",
            ok: Some(obj.clone()),
            query: &[],
            errors: &["400", "403", "404", "409", "413", "415", "422"],
            auth: true,
        });
        self.doc.add(Op {
            method: HttpMethod::Delete,
            path: &item,
            id: format!("delete{kind}"),
            tag,
            summary: format!(
                "Delete a {} (and, for a tenant, everything it owns)",
                R::KIND
            ),
            body: None,
            ok_status: "200",
            ok: Some(obj.clone()),
            query: &[(
                "revision",
                "only if the object is at this revision",
                Type::Integer,
            )],
            errors: &["403", "404", "409"],
            auth: true,
        });
        if custom.status {
            self.doc.add(Op {
                method: HttpMethod::Put,
                path: &status,
                id: format!("update{kind}Status"),
                tag,
                summary: format!("Replace a {}'s status (controllers and agents)", R::KIND),
                body: Some(obj.clone()),
                ok_status: "200",
                ok: Some(obj),
                query: &[],
                errors: &["400", "403", "404", "409", "413", "415", "422"],
                auth: true,
            });
        }
    }

    fn tokens(&mut self, coll: &str, scope: &str) {
        let item = format!("{coll}/{{name}}");
        self.route(coll, get(tokens::list).post(tokens::create));
        self.route(&item, axum::routing::delete(tokens::delete));
        let create = self.doc.schema::<TokenCreate>();
        let created = self.doc.schema::<CreatedToken>();
        let info = self.doc.schema::<ApiToken>();
        let page = self.doc.list_schema::<ApiToken>();
        self.doc.add(Op {
            method: HttpMethod::Get,
            path: coll,
            id: format!("list{scope}Tokens"),
            tag: "tokens",
            summary: format!("List {} tokens (never their secrets)", scope.to_lowercase()),
            body: None,
            ok_status: "200",
            ok: Some(page),
            query: &[],
            errors: &["403", "404"],
            auth: true,
        });
        self.doc.add(Op {
            method: HttpMethod::Post,
            path: coll,
            id: format!("create{scope}Token"),
            tag: "tokens",
            summary: "Create a token; the response's `token` is the only time the secret is shown"
                .into(),
            body: Some(create),
            ok_status: "201",
            ok: Some(created),
            query: &[],
            errors: &["400", "403", "404", "413", "415", "422"],
            auth: true,
        });
        self.doc.add(Op {
            method: HttpMethod::Delete,
            path: &item,
            id: format!("revoke{scope}Token"),
            tag: "tokens",
            summary: "Revoke a token by its id".into(),
            body: None,
            ok_status: "200",
            ok: Some(info),
            query: &[],
            errors: &["403", "404"],
            auth: true,
        });
    }
}

impl Table {
    /// Routes passed on to the node agents, and the key they check them with.
    fn node_proxy(&mut self) {
        let logs = format!("{API_PREFIX}/tenants/{{tenant}}/instances/{{name}}/logs");
        self.route(&logs, get(nodeproxy::logs));
        self.doc.add(Op {
            method: HttpMethod::Get,
            path: &logs,
            id: "readInstanceLogs".into(),
            tag: "instances",
            summary: "The container's stdout and stderr as text, in order, streamed from its node \
                      (viewer and up)"
                .into(),
            body: None,
            ok_status: "200",
            ok: None,
            query: &[
                (
                    "follow",
                    "keep streaming new output until the container exits",
                    Type::Boolean,
                ),
                (
                    "tail",
                    "only the last N lines (at most 100000)",
                    Type::Integer,
                ),
                (
                    "timestamps",
                    "prefix every line with its RFC 3339 time",
                    Type::Boolean,
                ),
            ],
            errors: &["403", "404", "409", "422", "502"],
            auth: true,
        });
        let exec = format!("{API_PREFIX}/tenants/{{tenant}}/instances/{{name}}/exec");
        self.route(&exec, axum::routing::post(nodeproxy::exec));
        self.doc.add(Op {
            method: HttpMethod::Post,
            path: &exec,
            id: "execInInstance".into(),
            tag: "instances",
            summary: "Run a process in the instance's container (member and up). Send \
                      `Connection: upgrade` and `Upgrade: hive-exec.v1`; after `101` the \
                      connection carries frames: type byte, 4-byte big-endian length, payload \
                      (0 stdin, 1 end of stdin, 2 resize cols/rows u16, 3 stdout, 4 stderr, 5 \
                      exit code i32, 6 error text)"
                .into(),
            body: None,
            ok_status: "101",
            ok: None,
            query: &[
                (
                    "command",
                    "the command, a JSON array of strings (at most 256, 64 KiB in all)",
                    Type::String,
                ),
                ("tty", "give the process a terminal", Type::Boolean),
            ],
            errors: &["403", "404", "409", "422", "502"],
            auth: true,
        });
        let key = format!("{API_PREFIX}/proxy-key");
        self.route(&key, get(nodeproxy::proxy_key));
        let schema = self.doc.schema::<ProxyKey>();
        self.doc.add(Op {
            method: HttpMethod::Get,
            path: &key,
            id: "readProxyKey".into(),
            tag: "nodes",
            summary: "The public key agents verify node proxy tokens with".into(),
            body: None,
            ok_status: "200",
            ok: Some(schema),
            query: &[],
            errors: &[],
            auth: true,
        });
    }
}

impl Table {
    /// Actions on a service's rollout.
    fn rollout(&mut self) {
        let path = format!("{API_PREFIX}/tenants/{{tenant}}/services/{{name}}/rollout");
        self.route(&path, axum::routing::post(services::action));
        let action = self.doc.schema::<RolloutAction>();
        let svc = self.doc.schema::<Service>();
        self.doc.add(Op {
            method: HttpMethod::Post,
            path: &path,
            id: "rolloutService".into(),
            tag: "services",
            summary: "Act on the service's rollout (member and up): `promote` a holding canary \
                      (it rolls on to every instance), `rollback` an unfinished rollout to the \
                      template before it, `undo` to a kept revision (`to_revision`, default \
                      the previous one). Rollback and undo make a new revision that rolls \
                      without holding. 409 when the rollout's state does not allow the action"
                .into(),
            body: Some(action),
            ok_status: "200",
            ok: Some(svc),
            query: &[],
            errors: &["400", "403", "404", "409", "415", "422"],
            auth: true,
        });
    }
}

impl Table {
    /// The tenant's image repositories (the content itself is under `/v2/`), and the
    /// registry's garbage collection.
    fn images(&mut self) {
        let coll = format!("{API_PREFIX}/tenants/{{tenant}}/images");
        let item = format!("{coll}/{{*name}}");
        let doc_item = format!("{coll}/{{name}}");
        self.route(&coll, get(images::list));
        self.route(
            &item,
            get(images::get)
                .patch(images::update)
                .delete(images::delete),
        );
        let list = self.doc.schema::<ImageList>();
        let repo = self.doc.schema::<ImageRepository>();
        let update = self.doc.schema::<ImageUpdate>();
        self.doc.add(Op {
            method: HttpMethod::Get,
            path: &coll,
            id: "listImages".into(),
            tag: "images",
            summary: "The tenant's image repositories, their tags and sizes, and its registry \
                      usage against its quota (viewer and up)"
                .into(),
            body: None,
            ok_status: "200",
            ok: Some(list),
            query: &[],
            errors: &["403", "404"],
            auth: true,
        });
        self.doc.add(Op {
            method: HttpMethod::Get,
            path: &doc_item,
            id: "getImage".into(),
            tag: "images",
            summary: "One repository; `name` is without the tenant and may contain `/`".into(),
            body: None,
            ok_status: "200",
            ok: Some(repo.clone()),
            query: &[],
            errors: &["403", "404", "422"],
            auth: true,
        });
        self.doc.add(Op {
            method: HttpMethod::Patch,
            path: &doc_item,
            id: "updateImage".into(),
            tag: "images",
            summary: "Make a repository public (anyone may pull it) or private (member and up)"
                .into(),
            body: Some(update),
            ok_status: "200",
            ok: Some(repo.clone()),
            query: &[],
            errors: &["400", "403", "404", "415", "422"],
            auth: true,
        });
        self.doc.add(Op {
            method: HttpMethod::Delete,
            path: &doc_item,
            id: "deleteImage".into(),
            tag: "images",
            summary: "Delete a repository with its tags and manifests (member and up); its \
                      content goes with the next garbage collection"
                .into(),
            body: None,
            ok_status: "200",
            ok: Some(repo),
            query: &[],
            errors: &["403", "404", "422"],
            auth: true,
        });
        let gc = format!("{API_PREFIX}/registry/gc");
        self.route(&gc, axum::routing::post(images::gc));
        let report = self.doc.schema::<RegistryGcReport>();
        self.doc.add(Op {
            method: HttpMethod::Post,
            path: &gc,
            id: "collectRegistryGarbage".into(),
            tag: "images",
            summary: "Collect the registry's garbage now: unlink layers no manifest uses, \
                      delete blobs nothing links (platform admin)"
                .into(),
            body: None,
            ok_status: "200",
            ok: Some(report),
            query: &[(
                "grace_seconds",
                "links younger than this are pushes in flight and kept (default 3600)",
                Type::Integer,
            )],
            errors: &["403", "422"],
            auth: true,
        });
    }
}

#[derive(Default)]
struct Custom {
    list: Option<MethodRouter<AppState>>,
    get: Option<MethodRouter<AppState>>,
    delete: Option<MethodRouter<AppState>>,
    status: bool,
}

fn with_status() -> Custom {
    Custom {
        status: true,
        ..Default::default()
    }
}

/// Assembles every route and the document that describes them.
fn table() -> Table {
    let mut t = Table {
        authed: Router::new(),
        doc: ApiDoc::default(),
    };
    t.resource::<Tenant>(Custom {
        list: Some(get(tenants::list)),
        get: Some(get(tenants::get)),
        delete: Some(axum::routing::delete(tenants::delete)),
        status: false,
    });
    t.resource::<Service>(with_status());
    t.resource::<Instance>(with_status());
    t.resource::<Event>(Custom::default());
    t.resource::<Network>(Custom {
        delete: Some(axum::routing::delete(crate::networks::delete)),
        ..Custom::default()
    });
    t.resource::<hive_api::SecurityGroup>(Custom::default());
    t.resource::<Node>(with_status());
    t.tokens(&format!("{API_PREFIX}/tenants/{{tenant}}/tokens"), "Tenant");
    t.tokens(&format!("{API_PREFIX}/tokens"), "Platform");
    t.rollout();
    t.node_proxy();
    t.images();
    t.route(&format!("{API_PREFIX}/whoami"), get(tokens::whoami));
    let who = t.doc.schema::<WhoAmI>();
    t.doc.add(Op {
        method: HttpMethod::Get,
        path: &format!("{API_PREFIX}/whoami"),
        id: "whoAmI".into(),
        tag: "tokens",
        summary: "Who the calling token is".into(),
        body: None,
        ok_status: "200",
        ok: Some(who),
        query: &[],
        errors: &[],
        auth: true,
    });
    t.doc.add(Op {
        method: HttpMethod::Get,
        path: &format!("{API_PREFIX}/openapi.json"),
        id: "openApi".into(),
        tag: "meta",
        summary: "This document".into(),
        body: None,
        ok_status: "200",
        ok: None::<Ref>,
        query: &[],
        errors: &[],
        auth: false,
    });
    t.doc.add(Op {
        method: HttpMethod::Get,
        path: "/healthz",
        id: "health".into(),
        tag: "meta",
        summary: "Liveness: 200 when the server answers and its store is readable".into(),
        body: None,
        ok_status: "200",
        ok: None,
        query: &[],
        errors: &[],
        auth: false,
    });
    t
}

/// The OpenAPI document of this server.
pub fn openapi() -> OpenApi {
    table().doc.finish()
}

/// The whole HTTP application.
pub fn router(state: AppState) -> Router {
    let t = table();
    let spec = t.doc.finish().to_pretty_json().unwrap_or_default();
    // Route layers run outside in: authentication first, then the consistent read.
    let authed = t
        .authed
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::consistent,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    Router::new()
        .merge(authed)
        .route(
            &format!("{API_PREFIX}/openapi.json"),
            get(move || async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    )],
                    spec,
                )
            }),
        )
        .route("/healthz", get(health))
        .fallback(middleware::route_not_found)
        .method_not_allowed_fallback(middleware::method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config.body_limit_bytes))
        .layer(axum::middleware::from_fn(middleware::request_context))
        .with_state(state.clone())
        // The registry answers `/v2/` with its own auth (Docker token flow) and the
        // distribution spec's error bodies, outside the API's middleware and body limit.
        .merge(hive_registry::router(state.registry.clone()))
}

async fn health(axum::extract::State(st): axum::extract::State<AppState>) -> Response {
    match st.store.current_revision().await {
        Ok(rev) => format!("ok revision={rev}\n").into_response(),
        Err(e) => crate::error::ApiError::from(e).into_response(),
    }
}
