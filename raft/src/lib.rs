//! `stacyvm-raft`: replication of the system of record.
//!
//! Built so far: the [`codec`] for Raft commands (what a log entry carries,
//! with a version tag and fixtures that keep old encodings decoding) and the
//! durable Raft log ([`log`]: a small [`log::LogStore`] trait and its sled
//! implementation, which acknowledges appends and votes only after they are
//! flushed to disk). The openraft type config, the state machine over the
//! store, snapshots and the QUIC transport build on these.
//!
//! This crate does not know SQL (the store does) or HTTP (the node does).

pub mod codec;
pub mod log;
