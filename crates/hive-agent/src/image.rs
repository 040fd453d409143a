//! Image store: pull, verify, unpack, compose root filesystems.
//!
//! - [`reference`]: parsing of image references.
//! - [`registry`]: the pull side of the OCI distribution protocol (auth, verified blobs).
//! - [`unpack`]: safe unpacking of one layer tarball (whiteouts as overlayfs whiteouts).
//! - [`overlay`]: overlayfs mounts of instance root filesystems.
//! - [`store`]: the content-addressed store tying them together, with GC.
//!
//! The layout on disk and the safety rules are described in `docs/images.md`.

pub mod overlay;
pub mod reference;
pub mod registry;
pub mod store;
pub mod unpack;

pub use reference::Reference;
pub use registry::Credentials;
pub use store::{
    GcReport, Image, ImageConfig, ImageError, ImageStore, LayerRef, NoCommand, Platform, Rootfs,
    StoreConfig,
};
pub use unpack::{Compression, Limits};
