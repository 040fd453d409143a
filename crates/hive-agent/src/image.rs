//! Image store: pull, verify, unpack, compose root filesystems.
