//! Integration tests for `stacyvm-store` (one binary; see the modules).

mod contract;
mod enrollment_race;
mod lease_race;
mod migrations;
