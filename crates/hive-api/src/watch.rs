//! Watch streams: newline-delimited JSON, one [`WatchEvent`] per line.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ApiErrorBody;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WatchEventType {
    Added,
    Modified,
    Deleted,
    /// No change: every event up to `revision` has been sent. Once as soon as the replay of
    /// history is over (at the server's revision when the watch opened), then every bookmark
    /// interval while the stream is idle.
    Bookmark,
    /// The stream ends; `error` says why (`revision_compacted`: list again).
    Error,
}

/// One line of a watch stream. Resume a broken stream with `revision=<last revision seen>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WatchEvent<T> {
    #[serde(rename = "type")]
    pub type_: WatchEventType,
    pub revision: u64,
    /// The object after the change (before it, for `DELETED`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object: Option<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiErrorBody>,
}
