//! `stacyvm-node`: the StacyVM control plane and the `stacyvm` binary.
//!
//! - [`serve`]: `stacyvm serve`, one control-plane replica (store + Raft
//!   replica + HTTP API);
//! - [`api`]: the HTTP API every replica serves, errors mapped once;
//! - [`control`]: leader decisions about sandboxes and workers (admission,
//!   placement, leases, liveness, reaper, reconciliation) and data-path routing;
//! - [`sandbox_api`]: the sandbox, exec, file, template, quota, worker, event
//!   and metric routes; [`events`]: the event stream built from the Raft log;
//! - [`agent`]: `stacyvm worker`, the worker agent and its RPC server;
//!   [`worker_rpc`]: the control plane's client for it;
//! - [`identity`]: the data directory's cluster and node identity;
//! - [`cli`]: command-line parsing, client commands, and the mapping of
//!   errors to exit codes ([`cli::ExitCode`]).
//!
//! It does not know SQL (that is `stacyvm-store`) or openraft and QUIC (that
//! is `stacyvm-raft`).

pub mod agent;
pub mod api;
pub mod cli;
pub mod client_cmd;
pub mod config;
pub mod control;
pub mod dev;
pub mod events;
pub mod identity;
pub mod lint;
pub mod rpc_tls;
pub mod sandbox_api;
pub mod serve;
pub mod token_cmd;
pub mod worker_rpc;
