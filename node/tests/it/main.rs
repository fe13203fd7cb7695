//! Integration tests for the `stacyvm` binary (one test binary; see modules).

mod db;
