//! `stacyvm-raft`: replication of the system of record.
//!
//! - [`codec`]: how commands and other durable values are encoded, with a
//!   version tag and fixtures that keep old encodings decoding;
//! - [`log`]: the durable Raft log behind a small [`log::LogStore`] trait, on
//!   sled, acknowledging appends and votes only after they are flushed;
//! - [`types`]: the openraft type configuration;
//! - [`log_store`]: openraft's log storage over the log store;
//! - [`state_machine`]: openraft's state machine over the store (apply through
//!   the store's exactly-once batch apply; logical snapshots);
//! - [`leases`]: leader-side lease arbitration (grants through the log,
//!   batched renewal in leader memory);
//! - [`certs`]: the cluster CA and node certificates (rcgen);
//! - [`transport`]: request/response RPC between replicas over QUIC with
//!   mutual TLS, the peer's node ID checked against its certificate.
//!
//! This crate does not know SQL (the store does) or HTTP (the node does).

// openraft's `StorageError` is large by design and every storage method
// returns it; boxing it here would only add conversions at each boundary.
#![allow(clippy::result_large_err)]

pub mod certs;
pub mod codec;
pub mod leases;
pub mod log;
pub mod log_store;
pub mod network;
pub mod replica;
pub mod rpc;
pub mod state_machine;
pub mod transport;
pub mod types;
