//! `stacyvm-node`: the StacyVM control plane and the `stacyvm` binary.
//!
//! - [`serve`]: `stacyvm serve`, one control-plane replica (store + Raft
//!   replica + HTTP API);
//! - [`api`]: the HTTP API every replica serves, errors mapped once;
//! - [`identity`]: the data directory's cluster and node identity;
//! - [`cli`]: command-line parsing, client commands, and the mapping of
//!   errors to exit codes ([`cli::ExitCode`]).
//!
//! It does not know SQL (that is `stacyvm-store`) or openraft and QUIC (that
//! is `stacyvm-raft`).

pub mod api;
pub mod cli;
pub mod identity;
pub mod serve;
