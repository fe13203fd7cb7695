//! Integration tests for `stacyvm-raft` (one binary; see the modules).

mod codec_fixtures;
mod crash;
mod storage_suite;
