//! The error body every API error carries, and its stable machine-readable codes.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A stable, machine-readable error code. Clients match on it; messages may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// No token, or a token that is unknown or revoked.
    Unauthenticated,
    /// The token's expiry has passed.
    TokenExpired,
    /// The token's role does not allow the action.
    Forbidden,
    /// No such object (also the answer for another tenant's objects).
    NotFound,
    /// An object of that name exists.
    AlreadyExists,
    /// The revision precondition did not hold: re-read and retry.
    Conflict,
    /// The object failed validation.
    Invalid,
    /// The body is not the JSON the route expects (syntax, types, unknown fields).
    MalformedBody,
    /// The body is not `application/json`.
    UnsupportedMediaType,
    /// The body exceeds the size limit.
    PayloadTooLarge,
    /// Too many requests for this token: retry after `Retry-After` seconds.
    RateLimited,
    /// The requested watch revision was compacted: list again and watch from its revision.
    RevisionCompacted,
    /// No such route or method.
    RouteNotFound,
    /// The state store cannot be reached.
    Unavailable,
    /// The instance has no container yet (not placed, or its node has not started it).
    NotStarted,
    /// The node agent that holds the instance's container cannot be reached.
    NodeUnreachable,
    /// No address is free on the network (instances wait, pending, until one is).
    AddressExhausted,
    /// The fixed address asked for is held by another instance.
    AddressInUse,
    /// The node is another tenant's: an instance bound to a node bound to another tenant,
    /// or a node bound to a tenant while it still runs another tenant's containers.
    NodeTaken,
    /// An internal error; details are in the server log under the request id.
    Internal,
}

impl ErrorCode {
    /// The HTTP status that goes with the code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::Unauthenticated | ErrorCode::TokenExpired => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound | ErrorCode::RouteNotFound => 404,
            ErrorCode::AlreadyExists | ErrorCode::Conflict => 409,
            ErrorCode::RevisionCompacted => 410,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::UnsupportedMediaType => 415,
            ErrorCode::Invalid => 422,
            ErrorCode::MalformedBody => 400,
            ErrorCode::RateLimited => 429,
            ErrorCode::Internal => 500,
            ErrorCode::Unavailable => 503,
            ErrorCode::NotStarted => 409,
            ErrorCode::NodeUnreachable => 502,
            ErrorCode::AddressExhausted | ErrorCode::AddressInUse | ErrorCode::NodeTaken => 409,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Invalid => "invalid",
            ErrorCode::MalformedBody => "malformed_body",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::RevisionCompacted => "revision_compacted",
            ErrorCode::RouteNotFound => "route_not_found",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::NotStarted => "not_started",
            ErrorCode::NodeUnreachable => "node_unreachable",
            ErrorCode::AddressExhausted => "address_exhausted",
            ErrorCode::AddressInUse => "address_in_use",
            ErrorCode::NodeTaken => "node_taken",
            ErrorCode::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The body of every error response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApiErrorBody {
    pub code: ErrorCode,
    pub message: String,
    /// The request's id, also in the `x-request-id` header and the server log.
    #[serde(default)]
    pub request_id: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_serializes_as_its_str() {
        for code in [
            ErrorCode::Unauthenticated,
            ErrorCode::TokenExpired,
            ErrorCode::RevisionCompacted,
            ErrorCode::MalformedBody,
            ErrorCode::NotStarted,
            ErrorCode::NodeUnreachable,
            ErrorCode::AddressExhausted,
            ErrorCode::AddressInUse,
            ErrorCode::NodeTaken,
        ] {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }
}
