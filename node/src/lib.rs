//! `stacyvm-node`: the StacyVM control plane and the `stacyvm` binary.
//!
//! Today it holds the operator commands over the system of record
//! (`stacyvm db migrate|status|backup|restore`). The control plane (API,
//! scheduler, reconciler, Raft membership) arrives with the cluster issues.
//! It owns command-line parsing and the mapping of errors to exit codes
//! ([`cli::ExitCode`]); it does not know SQL (that is `stacyvm-store`).

pub mod cli;
