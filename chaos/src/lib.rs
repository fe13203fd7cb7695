//! StacyVM's process-level fault harness, in the style of Jepsen.
//!
//! Owns: a cluster fixture that drives the built `stacyvm` binary (never
//! linked) on loopback ([`cluster`]), per-link UDP and TCP proxies that can
//! cut, drop and delay traffic between processes ([`proxy`]), the fault
//! schedule and its nemeses ([`nemesis`]), the client workload that records
//! every operation as ok, failed or unknown ([`workload`]), the pure history
//! checker ([`checker`]), and the JSON and Markdown reports ([`report`]).
//!
//! Does not own: any server logic. Everything it learns about the cluster
//! comes from the HTTP API, the processes' logs and the mock runtime's
//! evidence log (`STACYVM_MOCK_EVENT_LOG`).
//!
//! Addresses: replica `i` lives on 127.0.0.(10+i), worker `w` on
//! 127.0.0.(100+w); the harness's own clients use 127.0.0.1. Every proxy
//! tells a sender apart by its source IP, which is why `stacyvm serve`
//! sends Raft traffic from its bind IP and `stacyvm worker --source-ip`
//! exists. Nothing leaves 127.0.0.0/8.

pub mod checker;
pub mod cluster;
pub mod nemesis;
pub mod proxy;
pub mod report;
pub mod rng;
pub mod workload;
