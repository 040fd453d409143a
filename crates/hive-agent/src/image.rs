//! Image store: pull, verify, unpack, compose root filesystems.
//!
//! - [`reference`]: parsing of image references.
//! - [`registry`]: an OCI distribution client (auth, verified pulls, streamed pushes).
//! - [`layout`]: OCI image layouts, read from a directory or an archive and written.
//! - [`transfer`]: whole images between a layout and a registry (`hive push`, `hive pull`).
//! - [`unpack`]: safe unpacking of one layer tarball (whiteouts as overlayfs whiteouts).
//! - [`overlay`]: overlayfs mounts of instance root filesystems.
//! - [`mountpoints`]: the runtime's mount points, made in a root filesystem as it is composed.
//! - [`store`]: the content-addressed store tying them together, with GC.
//!
//! The layout on disk and the safety rules are described in `docs/images.md`.

pub mod layout;
pub mod mountpoints;
pub mod overlay;
pub mod reference;
pub mod registry;
pub mod store;
pub mod transfer;
pub mod unpack;

pub use reference::Reference;
pub use registry::Credentials;
pub use store::{
    GcReport, Image, ImageConfig, ImageError, ImageStore, LayerRef, NoCommand, Platform, Rootfs,
    StoreConfig,
};
pub use unpack::{Compression, Limits};
