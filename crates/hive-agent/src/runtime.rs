//! Container runtime: OCI bundles, the OCI runtime, per-container supervisors.
