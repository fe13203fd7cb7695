//! Integration tests for `stacyvm-store` (one binary; see the modules).

mod contract;
