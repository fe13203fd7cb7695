//! The openraft type configuration: what a log entry carries ([`Command`]),
//! what applying it returns ([`Response`]), and how a replica is addressed
//! ([`NodeInfo`]).
//!
//! Index convention: openraft numbers log entries from 0 (the initial
//! membership entry), while the store counts "applied index 0" as "nothing
//! applied". The state machine therefore records raft index `i` in the store as
//! `i + 1` ([`store_index`]).

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};
use stacyvm_store::{MutationOutput, StoreError};

use crate::codec::Command;

/// A replica's ID. Assigned once, never reused after removal.
pub type NodeId = u64;

/// How to reach a replica.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// QUIC address for Raft RPCs between replicas.
    pub raft_addr: String,
    /// HTTP API address, handed to clients and workers as the leader hint.
    pub api_addr: String,
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft={} api={}", self.raft_addr, self.api_addr)
    }
}

/// What applying one committed entry produced on this replica.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// A blank or membership entry: nothing to report.
    #[default]
    None,
    /// One outcome per mutation, in order.
    Applied(Vec<Result<MutationOutput, StoreError>>),
    /// Another replica sharing this database applied the entry first.
    AlreadyApplied,
}

openraft::declare_raft_types!(
    /// StacyVM's Raft types.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = NodeId,
        Node = NodeInfo,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A log entry of this cluster.
pub type Entry = openraft::Entry<TypeConfig>;
/// A log ID of this cluster.
pub type LogId = openraft::LogId<NodeId>;
/// openraft's storage error for this cluster.
pub type StorageError = openraft::StorageError<NodeId>;
/// The Raft handle of this cluster.
pub type Raft = openraft::Raft<TypeConfig>;

/// The store's applied index for raft log index `i`.
pub fn store_index(raft_index: u64) -> u64 {
    raft_index + 1
}
