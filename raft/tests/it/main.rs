//! Integration tests for `stacyvm-raft` (one binary; see the modules).

mod cluster;
mod codec_fixtures;
mod crash;
mod harness;
mod large_snapshot;
mod postgres_modes;
mod sim;
mod storage_suite;
mod transport;
