//! The embedded backend on redb.
