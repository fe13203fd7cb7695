//! The messages replicas exchange over the [`transport`](crate::transport):
//! openraft's own RPCs, plus what a follower forwards to the leader (client
//! writes, linearizable-read barriers, membership changes). Encoded with the
//! [`codec`](crate::codec), so a replica from another release fails to decode
//! cleanly instead of misreading.

use std::collections::{BTreeMap, BTreeSet};

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use stacyvm_store::{Lease, StoreError};

use crate::codec::Command;
use crate::leases::{HeldLease, RenewOutcome};
use crate::types::{LogId, NodeId, NodeInfo, Response, TypeConfig};

/// A request from one replica to another.
#[derive(Debug, Serialize, Deserialize)]
pub enum RpcRequest {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A client write a follower forwards to the leader.
    Write(Command),
    /// A follower asks the leader for a read index (linearizable reads).
    ReadIndex,
    /// A joining replica asks to be added as a learner and then promoted.
    Join {
        id: NodeId,
        node: NodeInfo,
    },
    /// Remove a voter (operator command forwarded to the leader).
    Leave {
        id: NodeId,
    },
    /// Hand leadership to another voter (sent to the leader).
    TransferLeader {
        to: NodeId,
    },
    /// Start an election now (sent by the leader to the transfer target).
    Elect,
    /// Who is in the cluster, as the leader sees it.
    Members,
    /// Grant a lease (decided by the leader's lease table, granted through the log).
    LeaseAcquire {
        resource_id: String,
        resource_type: String,
        holder_id: String,
        ttl_ms: i64,
    },
    /// Renew every lease a holder claims, in one call (leader memory only).
    LeaseRenew {
        holder_id: String,
        leases: Vec<HeldLease>,
    },
    /// Give a lease up (through the log).
    LeaseRelease {
        resource_id: String,
        holder_id: String,
    },
}

/// The answer to an [`RpcRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum RpcReply {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    Write(Result<Response, WriteError>),
    ReadIndex(Result<Option<LogId>, WriteError>),
    Membership(Result<(), WriteError>),
    Members(Result<Members, WriteError>),
    Lease(Result<Lease, LeaseError>),
    Renew(Result<RenewOutcome, WriteError>),
    /// The request could not be decoded or handled at all.
    BadRequest(String),
}

/// The cluster's membership as the leader sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Members {
    pub leader: Option<NodeId>,
    pub voters: BTreeSet<NodeId>,
    pub learners: BTreeSet<NodeId>,
    pub nodes: BTreeMap<NodeId, NodeInfo>,
}

/// Why a write (or read barrier, or membership change) did not happen.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum WriteError {
    /// No leader is known right now (election in progress or no quorum).
    #[error("no leader is known; retry shortly")]
    NoLeader,
    /// The leader did not answer in time; the write may or may not have happened.
    #[error("the leader did not answer in time; the outcome is unknown")]
    Timeout,
    /// The request was refused (bad membership change, unknown node...).
    #[error("refused: {0}")]
    Refused(String),
    /// This replica can no longer serve (storage failure, shutting down).
    #[error("replica failure: {0}")]
    Fatal(String),
}

/// Why a lease operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum LeaseError {
    /// The store's answer (`Conflict` naming the holder, `Invalid`, `NotFound`).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No leader, timeout or replica failure.
    #[error(transparent)]
    Write(#[from] WriteError),
}
