//! openraft's network over the QUIC [`transport`](crate::transport): one
//! client per replica (it caches one connection per peer), one stream per RPC,
//! codec-encoded messages, and every call bounded by openraft's own timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use crate::codec::{decode_value, encode_value};
use crate::rpc::{RpcReply, RpcRequest};
use crate::transport::{RpcClient, TransportError};
use crate::types::{NodeId, NodeInfo, TypeConfig};

/// Makes a [`PeerClient`] per target replica.
#[derive(Clone, Debug)]
pub struct QuicNetwork {
    client: Arc<RpcClient>,
}

impl QuicNetwork {
    pub fn new(client: Arc<RpcClient>) -> Self {
        QuicNetwork { client }
    }
}

/// Sends openraft RPCs to one peer.
#[derive(Debug)]
pub struct PeerClient {
    client: Arc<RpcClient>,
    target: NodeId,
    node: NodeInfo,
}

/// Largest append-entries message sent in one RPC when it holds more than
/// one entry: openraft times each append out after one heartbeat interval, so
/// big batches are split (openraft retries with fewer entries).
pub const APPEND_BUDGET: usize = 1024 * 1024;

/// Sends `req` to `target` and decodes the reply (shared with forwarding).
pub async fn call(
    client: &RpcClient,
    target: NodeId,
    addr: &str,
    req: &RpcRequest,
    timeout: Duration,
) -> Result<RpcReply, TransportError> {
    let bytes = encode_value(req).map_err(|e| TransportError::Io(e.to_string()))?;
    call_encoded(client, target, addr, &bytes, timeout).await
}

/// [`call`] with the request already encoded.
pub async fn call_encoded(
    client: &RpcClient,
    target: NodeId,
    addr: &str,
    bytes: &[u8],
    timeout: Duration,
) -> Result<RpcReply, TransportError> {
    let addr: SocketAddr = addr.parse().map_err(|e| {
        TransportError::Connect(format!("bad raft address {addr:?} of node {target}: {e}"))
    })?;
    let reply = client.call(target, addr, bytes, timeout).await?;
    decode_value(&reply)
        .map_err(|e| TransportError::Io(format!("undecodable reply from node {target}: {e}")))
}

impl PeerClient {
    async fn rpc<E: std::error::Error>(
        &self,
        req: RpcRequest,
        option: &RPCOption,
    ) -> Result<RpcReply, RPCError<NodeId, NodeInfo, E>> {
        let bytes = encode_value(&req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        self.rpc_encoded(&bytes, option).await
    }

    async fn rpc_encoded<E: std::error::Error>(
        &self,
        bytes: &[u8],
        option: &RPCOption,
    ) -> Result<RpcReply, RPCError<NodeId, NodeInfo, E>> {
        let addr = &self.node.raft_addr;
        match call_encoded(&self.client, self.target, addr, bytes, option.hard_ttl()).await {
            Ok(RpcReply::BadRequest(why)) => Err(RPCError::Network(NetworkError::new(
                &std::io::Error::other(why),
            ))),
            Ok(reply) => Ok(reply),
            Err(TransportError::Timeout)
            | Err(TransportError::Connect(_))
            | Err(TransportError::Closed) => {
                let e = std::io::Error::other(format!("node {} unreachable", self.target));
                Err(RPCError::Unreachable(Unreachable::new(&e)))
            }
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }

    fn unexpected<E: std::error::Error>(&self, what: &str) -> RPCError<NodeId, NodeInfo, E> {
        let e = std::io::Error::other(format!(
            "node {} answered {what} with the wrong message",
            self.target
        ));
        RPCError::Network(NetworkError::new(&e))
    }
}

impl RaftNetworkFactory<TypeConfig> for QuicNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> PeerClient {
        PeerClient {
            client: self.client.clone(),
            target,
            node: node.clone(),
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        let entries = rpc.entries.len() as u64;
        let bytes = encode_value(&RpcRequest::AppendEntries(rpc))
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        if bytes.len() > APPEND_BUDGET && entries > 1 {
            // Ask openraft to resend fewer entries, in proportion to the overshoot.
            let hint = (entries * APPEND_BUDGET as u64 / bytes.len() as u64).clamp(1, entries - 1);
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(hint),
            ));
        }
        match self.rpc_encoded(&bytes, &option).await? {
            RpcReply::AppendEntries(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(self.unexpected("append-entries")),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, NodeInfo, RaftError<NodeId, InstallSnapshotError>>,
    > {
        match self.rpc(RpcRequest::InstallSnapshot(rpc), &option).await? {
            RpcReply::InstallSnapshot(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(self.unexpected("install-snapshot")),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        match self.rpc(RpcRequest::Vote(rpc), &option).await? {
            RpcReply::Vote(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(self.unexpected("vote")),
        }
    }
}
