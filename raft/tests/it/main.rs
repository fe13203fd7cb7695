//! Integration tests for `stacyvm-raft` (one binary; see the modules).

mod cluster;
mod codec_fixtures;
mod crash;
mod storage_suite;
mod transport;
