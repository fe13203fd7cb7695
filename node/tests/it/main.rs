//! Integration tests for the `stacyvm` binary (one test binary; see modules).

mod cluster_process;
mod db;
mod dev_process;
mod identity;
mod liveness;
mod plane;
mod reconcile;
mod sandboxes;
