//! The outermost layer: gives each request an id, turns [`ApiError`]s into JSON bodies that
//! carry that id, and logs each failed request once.

use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hive_api::{ApiErrorBody, ErrorCode};

use crate::error::ApiError;
use crate::state::AppState;

pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// A request's lowest acceptable revision: the server answers from a state at least that new
/// (what the client has seen, from any server).
pub const MIN_REVISION_HEADER: &str = "hive-min-revision";
/// A response's revision: a committed revision at least as new as what the answer reflects.
pub const REVISION_HEADER: &str = "hive-revision";

/// The id of the request being served (also in the `x-request-id` response header).
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

fn new_request_id() -> String {
    let bytes: [u8; 8] = rand::random();
    hex::encode(bytes)
}

pub async fn request_context(mut req: Request, next: Next) -> Response {
    let id = new_request_id();
    req.extensions_mut().insert(RequestId(id.clone()));
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let start = Instant::now();
    let mut response = next.run(req).await;
    let status = response.status();
    if let Some(err) = response.extensions_mut().remove::<ApiError>() {
        if err.code == ErrorCode::Internal || err.code == ErrorCode::Unavailable {
            tracing::error!(request_id = %id, %method, %path, %status, code = %err.code, message = %err.message, "request failed");
        } else {
            tracing::debug!(request_id = %id, %method, %path, %status, code = %err.code, message = %err.message, "request refused");
        }
        let body = ApiErrorBody {
            code: err.code,
            message: err.message,
            request_id: id.clone(),
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        *response.body_mut() = Body::from(bytes);
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response.headers_mut().remove(header::CONTENT_LENGTH);
    } else {
        tracing::trace!(request_id = %id, %method, %path, %status, elapsed_us = start.elapsed().as_micros() as u64, "request");
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    response
}

/// Consistent reads through the watch cache: waits until it has applied the revision the
/// request names (`Hive-Min-Revision`), and tells the client the revision its answer is at
/// least as new as (`Hive-Revision`), for it to name next time, to whichever server.
pub async fn consistent(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let Some(cache) = st.cache.clone() else {
        return next.run(req).await;
    };
    if let Some(v) = req.headers().get(MIN_REVISION_HEADER) {
        let Some(revision) = v.to_str().ok().and_then(|s| s.parse::<u64>().ok()) else {
            return ApiError::invalid(format!(
                "header {MIN_REVISION_HEADER} must be a revision (an unsigned integer)"
            ))
            .into_response();
        };
        if let Err(e) = cache.wait_for(revision).await {
            return ApiError::from(e).into_response();
        }
    }
    let mut response = next.run(req).await;
    response
        .headers_mut()
        .insert(REVISION_HEADER, HeaderValue::from(cache.known_revision()));
    response
}

pub async fn route_not_found(req: Request) -> Response {
    ApiError::new(
        ErrorCode::RouteNotFound,
        format!("no route for {} {}", req.method(), req.uri().path()),
    )
    .into_response()
}

pub async fn method_not_allowed(req: Request) -> Response {
    let mut r = ApiError::new(
        ErrorCode::RouteNotFound,
        format!(
            "method {} is not allowed on {}",
            req.method(),
            req.uri().path()
        ),
    )
    .into_response();
    *r.status_mut() = axum::http::StatusCode::METHOD_NOT_ALLOWED;
    r
}
