//! One control-plane replica's Raft side: the openraft instance over our log
//! store and state machine, the QUIC RPC server that feeds it, and the
//! leader-aware entry points the node uses (write, read barrier, membership).
//!
//! Any replica accepts a write: the leader proposes it; a follower forwards it
//! to the leader over the same QUIC channel and returns the leader's answer.
//! With no leader known, a request waits a bounded time and then fails with
//! [`WriteError::NoLeader`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, Config, ServerState, SnapshotPolicy};
use std::sync::Mutex;

use stacyvm_store::{Lease, Mutation, MutationOutput, Store, StoreError, Ts};

use crate::certs::NodeTls;
use crate::codec::{Command, decode_value, encode_value};
use crate::leases::{HeldLease, LeaseTable, RenewOutcome};
use crate::log::SledLog;
use crate::log_store::RaftLogStore;
use crate::network::{QuicNetwork, call};
use crate::rpc::{LeaseError, Members, RpcReply, RpcRequest, WriteError};
use crate::state_machine::StoreStateMachine;
use crate::transport::{RpcClient, RpcHandler, RpcServer, serve};
use crate::types::{LogId, NodeId, NodeInfo, Raft, Response};

/// Raft timing. The defaults suit a LAN: heartbeats every 50 ms and an
/// election timeout of 250–500 ms, so a dead leader is replaced in about half
/// a second while a loaded loopback or LAN never misses five heartbeats in a
/// row by accident.
#[derive(Clone, Debug)]
pub struct RaftTiming {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// Build a snapshot (and purge the log before it) every this many entries.
    pub snapshot_every: u64,
    /// Entries kept in the log behind the last snapshot, for slow followers.
    pub keep_logs: u64,
    /// How long a request waits for a leader before `NoLeader`.
    pub leader_wait: Duration,
}

impl RaftTiming {
    /// Longest a single forwarded request may take before its fate is
    /// reported as unknown (a few election timeouts, at least one second; a
    /// leader transfer needs a lease plus an election).
    pub fn attempt_timeout(&self) -> Duration {
        Duration::from_millis((self.election_max_ms * 6 + 500).max(1_000))
    }
}

impl Default for RaftTiming {
    fn default() -> Self {
        RaftTiming {
            heartbeat_ms: 50,
            election_min_ms: 250,
            election_max_ms: 500,
            snapshot_every: 10_000,
            keep_logs: 1_000,
            leader_wait: Duration::from_secs(5),
        }
    }
}

/// Everything a replica needs to start.
#[derive(Debug)]
pub struct ReplicaConfig {
    pub id: NodeId,
    /// Where the QUIC server binds.
    pub bind: SocketAddr,
    /// How other replicas and clients reach this one.
    pub advertise: NodeInfo,
    pub tls: NodeTls,
    /// The sled log directory (`<data_dir>/raft`).
    pub log_dir: PathBuf,
    /// This replica's store (its state machine).
    pub store: Arc<dyn Store>,
    /// The store is one Postgres database shared by several replicas: it may
    /// be ahead of this replica's own log, which is then not a sign of damage.
    pub shared_store: bool,
    pub timing: RaftTiming,
}

/// How long a join may take (learner catch-up, snapshot included).
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a replica could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid raft settings: {0}")]
    Config(String),
    #[error("cannot open the raft log: {0}")]
    Log(#[from] crate::log::LogError),
    #[error("cannot start the raft transport: {0}")]
    Transport(#[from] crate::transport::TransportError),
    #[error("raft failed to start: {0}")]
    Raft(String),
}

/// A running replica.
pub struct Replica {
    id: NodeId,
    raft: Raft,
    handler: Handler,
    client: Arc<RpcClient>,
    server: Option<RpcServer>,
    store: Arc<dyn Store>,
    timing: RaftTiming,
    sm: StoreStateMachine,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("id", &self.id)
            .field("raft_addr", &self.raft_addr())
            .finish()
    }
}

/// Feeds incoming RPCs to the local Raft instance.
#[derive(Clone)]
struct Handler {
    raft: Raft,
    store: Arc<dyn Store>,
    leases: Arc<Mutex<Option<LeaseTable>>>,
    client: Arc<RpcClient>,
    timing: RaftTiming,
}

#[async_trait]
impl RpcHandler for Handler {
    async fn handle(&self, _from: u64, request: Vec<u8>) -> Vec<u8> {
        let reply = match decode_value::<RpcRequest>(&request) {
            Err(e) => RpcReply::BadRequest(e.to_string()),
            Ok(req) => self.dispatch(req).await,
        };
        encode_value(&reply).unwrap_or_default()
    }
}

fn fatal(e: impl std::fmt::Display) -> WriteError {
    WriteError::Fatal(e.to_string())
}

impl Handler {
    async fn dispatch(&self, req: RpcRequest) -> RpcReply {
        let raft = &self.raft;
        match req {
            RpcRequest::AppendEntries(r) => RpcReply::AppendEntries(raft.append_entries(r).await),
            RpcRequest::Vote(r) => RpcReply::Vote(raft.vote(r).await),
            RpcRequest::InstallSnapshot(r) => {
                RpcReply::InstallSnapshot(raft.install_snapshot(r).await)
            }
            RpcRequest::Write(cmd) => RpcReply::Write(local_write(raft, cmd).await),
            RpcRequest::ReadIndex => {
                RpcReply::ReadIndex(raft.ensure_linearizable().await.map_err(|e| match e {
                    RaftError::APIError(_) => WriteError::NoLeader,
                    RaftError::Fatal(f) => fatal(f),
                }))
            }
            RpcRequest::Join { id, node } => RpcReply::Membership(self.join(id, node).await),
            RpcRequest::Leave { id } => RpcReply::Membership(self.leave(id).await),
            RpcRequest::TransferLeader { to } => RpcReply::Membership(self.transfer(to).await),
            RpcRequest::Elect => RpcReply::Membership(raft.trigger().elect().await.map_err(fatal)),
            RpcRequest::Members => RpcReply::Members(Ok(members_of(raft))),
            RpcRequest::LeaseAcquire {
                resource_id,
                resource_type,
                holder_id,
                ttl_ms,
            } => RpcReply::Lease(
                self.lease_acquire(resource_id, resource_type, holder_id, ttl_ms)
                    .await,
            ),
            RpcRequest::LeaseRenew { holder_id, leases } => {
                RpcReply::Renew(self.lease_renew(&holder_id, leases).await)
            }
            RpcRequest::LeaseRelease {
                resource_id,
                holder_id,
            } => RpcReply::Lease(self.lease_release(resource_id, holder_id).await),
        }
    }

    /// On the leader: hands leadership to voter `to`. openraft 0.9 has no
    /// transfer call, and followers refuse votes while the leader's lease
    /// holds, so the leader pauses its heartbeats for one lease, asks `to` to
    /// stand for election (its log is current, so it wins), and resumes
    /// heartbeats whatever happened.
    async fn transfer(&self, to: NodeId) -> Result<(), WriteError> {
        let raft = &self.raft;
        let m = raft.metrics().borrow().clone();
        if m.state != ServerState::Leader {
            return Err(WriteError::NoLeader);
        }
        if m.current_leader == Some(to) {
            return Ok(());
        }
        let membership = m.membership_config.membership();
        if !membership.voter_ids().any(|v| v == to) {
            return Err(WriteError::Refused(format!("node {to} is not a voter")));
        }
        let node = membership.get_node(&to).cloned().unwrap_or_default();
        raft.runtime_config().heartbeat(false);
        let result = async {
            tokio::time::sleep(Duration::from_millis(
                self.timing.election_max_ms + self.timing.heartbeat_ms,
            ))
            .await;
            match call(
                &self.client,
                to,
                &node.raft_addr,
                &RpcRequest::Elect,
                self.timing.leader_wait,
            )
            .await
            {
                Ok(RpcReply::Membership(r)) => r?,
                Ok(other) => return Err(WriteError::Fatal(format!("unexpected reply {other:?}"))),
                Err(e) => return Err(WriteError::Refused(format!("node {to} unreachable: {e}"))),
            }
            let deadline =
                Instant::now() + Duration::from_millis(self.timing.election_max_ms * 4 + 500);
            while Instant::now() < deadline {
                if raft.metrics().borrow().current_leader == Some(to) {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(WriteError::Refused(format!(
                "node {to} did not win the election; try again"
            )))
        }
        .await;
        raft.runtime_config().heartbeat(true);
        result
    }

    async fn join(&self, id: NodeId, node: NodeInfo) -> Result<(), WriteError> {
        let raft = &self.raft;
        // The leader's store is current once this returns.
        raft.ensure_linearizable()
            .await
            .map_err(|_| WriteError::NoLeader)?;
        let node_id = i64::try_from(id)
            .map_err(|_| WriteError::Refused(format!("node id {id} is too large")))?;
        if self.store.is_node_removed(node_id).await.map_err(fatal)? {
            return Err(WriteError::Refused(format!(
                "node id {id} was removed from this cluster and is never reused; pick a new id"
            )));
        }
        // A learner first: it catches up (blocking until it has), then becomes a voter.
        raft.add_learner(id, node, true)
            .await
            .map_err(map_write_err)?;
        raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map(|_| ())
            .map_err(map_write_err)
    }

    async fn leave(&self, id: NodeId) -> Result<(), WriteError> {
        let raft = &self.raft;
        let node_id = i64::try_from(id)
            .map_err(|_| WriteError::Refused(format!("node id {id} is too large")))?;
        let m = raft.metrics().borrow().clone();
        if id == m.id {
            // A leader never removes itself: once its removal commits it is
            // no leader, and openraft 0.9 panics on the next membership
            // call it is handed (chaos: remove-replica aimed at the
            // leader). Leadership goes to the most caught-up other voter
            // first; `NoLeader` makes the caller send the leave there.
            let matched = |v: &NodeId| {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(v).copied().flatten())
                    .map(|l| l.index)
            };
            let to = m
                .membership_config
                .membership()
                .voter_ids()
                .filter(|v| *v != id)
                .max_by_key(|v| (matched(v), std::cmp::Reverse(*v)))
                .ok_or_else(|| {
                    WriteError::Refused(format!("node {id} is the only voter; it cannot leave"))
                })?;
            self.transfer(to).await?;
            return Err(WriteError::NoLeader);
        }
        // Not retained: the removed voter also leaves the node list, in the
        // same change (a second `RemoveNodes` step would be a no-op entry).
        raft.change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
            .await
            .map_err(map_write_err)?;
        let record = Mutation::RecordRemovedNode {
            node_id,
            at: Ts::now(),
        };
        local_write(raft, Command::Store(vec![record]))
            .await
            .map(|_| ())
    }

    /// Confirms leadership and that every committed entry is applied here,
    /// and returns the lease table of the current term (fresh after an election).
    ///
    /// `confirm` forces a read-index round even within a known term. Renewals
    /// need it: a deposed leader that has not noticed must not extend a
    /// deadline. Grants do not: their own Raft write fails on a deposed
    /// leader, so one round at the start of each term (to apply what earlier
    /// leaders committed) is enough.
    async fn lease_term(&self, confirm: bool) -> Result<u64, WriteError> {
        let term = self.raft.metrics().borrow().current_term;
        let known = self.with_table(|t| t.term() == term).unwrap_or(false);
        if confirm || !known {
            self.raft.ensure_linearizable().await.map_err(|e| match e {
                RaftError::APIError(_) => WriteError::NoLeader,
                RaftError::Fatal(f) => fatal(f),
            })?;
        }
        let term = self.raft.metrics().borrow().current_term;
        let mut table = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        if table.as_ref().is_none_or(|t| t.term() != term) {
            *table = Some(LeaseTable::new(term, Instant::now()));
        }
        Ok(term)
    }

    fn with_table<T>(&self, f: impl FnOnce(&mut LeaseTable) -> T) -> Option<T> {
        let mut table = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        table.as_mut().map(f)
    }

    async fn current_lease(&self, resource_id: &str) -> Result<Option<Lease>, LeaseError> {
        match self.store.get_lease(resource_id).await {
            Ok(l) => Ok(Some(l)),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(LeaseError::Store(e)),
        }
    }

    async fn lease_acquire(
        &self,
        resource_id: String,
        resource_type: String,
        holder_id: String,
        ttl_ms: i64,
    ) -> Result<Lease, LeaseError> {
        self.lease_acquire_with(resource_id, resource_type, holder_id, ttl_ms, Vec::new())
            .await
            .map(|(l, _)| l)
    }

    /// Grants a lease and applies `extra` in the same Raft entry (after the
    /// grant). The extras' outcomes are returned; they do not undo the grant.
    async fn lease_acquire_with(
        &self,
        resource_id: String,
        resource_type: String,
        holder_id: String,
        ttl_ms: i64,
        extra: Vec<Mutation>,
    ) -> Result<(Lease, Vec<Result<MutationOutput, StoreError>>), LeaseError> {
        self.lease_term(false).await?;
        let current = self.current_lease(&resource_id).await?;
        let mut now = Ts::now();
        if let Some(l) = current.as_ref().filter(|l| l.holder_id != holder_id) {
            let expired = self
                .with_table(|t| t.is_expired(l, Instant::now(), Ts::now()))
                .unwrap_or(false);
            if !expired {
                return Err(LeaseError::Store(StoreError::Conflict {
                    entity: "lease".into(),
                    id: resource_id,
                    reason: format!("held by {:?} (generation {})", l.holder_id, l.generation),
                }));
            }
            // The leader decided it has expired; make the log say so too.
            now = now.max(l.expires_at);
        }
        let (resource_id_copy, holder_copy) = (resource_id.clone(), holder_id.clone());
        let req = stacyvm_store::AcquireLease {
            resource_id,
            resource_type,
            holder_id,
            ttl_ms,
            now,
        };
        let n_extra = extra.len();
        let mut cmd = vec![Mutation::AcquireLease(req)];
        cmd.extend(extra);
        let mut extra_out = Vec::new();
        let granted = match local_write(&self.raft, Command::Store(cmd)).await? {
            Response::Applied(mut r) if r.len() == 1 + n_extra => match r.remove(0) {
                Ok(MutationOutput::Lease(l)) => {
                    extra_out = r;
                    l
                }
                Ok(other) => {
                    return Err(WriteError::Fatal(format!("acquire returned {other:?}")).into());
                }
                Err(e) => return Err(LeaseError::Store(e)),
            },
            // Another replica sharing the database applied the entry first;
            // the store holds its outcome.
            Response::AlreadyApplied => match self.current_lease(&resource_id_copy).await? {
                Some(l) if l.holder_id == holder_copy => l,
                Some(l) => {
                    return Err(LeaseError::Store(StoreError::Conflict {
                        entity: "lease".into(),
                        id: resource_id_copy,
                        reason: format!("held by {:?} (generation {})", l.holder_id, l.generation),
                    }));
                }
                None => return Err(WriteError::Fatal("granted lease vanished".into()).into()),
            },
            other => return Err(WriteError::Fatal(format!("acquire returned {other:?}")).into()),
        };
        self.with_table(|t| t.granted(&granted, Instant::now()));
        Ok((granted, extra_out))
    }

    async fn lease_renew(
        &self,
        holder_id: &str,
        leases: Vec<HeldLease>,
    ) -> Result<RenewOutcome, WriteError> {
        self.lease_term(true).await?;
        // One read for all of the holder's leases, not one per claim: a
        // worker with thousands of sandboxes renews them every heartbeat.
        let mut rows: std::collections::HashMap<String, Lease> = self
            .store
            .list_leases(Some(holder_id))
            .await
            .map_err(fatal)?
            .into_iter()
            .map(|l| (l.resource_id.clone(), l))
            .collect();
        let claims: Vec<(HeldLease, Option<Lease>)> = leases
            .into_iter()
            .map(|claim| {
                let row = rows.remove(&claim.resource_id);
                (claim, row)
            })
            .collect();
        Ok(self
            .with_table(|t| t.renew(holder_id, &claims, Instant::now(), Ts::now()))
            .unwrap_or_default())
    }

    async fn lease_release(
        &self,
        resource_id: String,
        holder_id: String,
    ) -> Result<Lease, LeaseError> {
        self.lease_term(false).await?;
        let current = self.current_lease(&resource_id).await?;
        let m = Mutation::ReleaseLease {
            resource_id: resource_id.clone(),
            holder_id,
        };
        match local_write(&self.raft, Command::Store(vec![m])).await? {
            Response::Applied(mut r) if r.len() == 1 => r.remove(0).map_err(LeaseError::Store)?,
            // Applied by another replica sharing the database: released.
            Response::AlreadyApplied => stacyvm_store::MutationOutput::Done,
            other => return Err(WriteError::Fatal(format!("release returned {other:?}")).into()),
        };
        self.with_table(|t| t.forget(&resource_id));
        current.ok_or_else(|| {
            LeaseError::Store(StoreError::NotFound {
                entity: "lease".into(),
                id: resource_id,
            })
        })
    }
}

fn map_write_err(e: RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>) -> WriteError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => WriteError::NoLeader,
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            WriteError::Refused(c.to_string())
        }
        RaftError::Fatal(f) => fatal(f),
    }
}

/// Proposes on this replica, which must be the leader.
async fn local_write(raft: &Raft, cmd: Command) -> Result<Response, WriteError> {
    raft.client_write(cmd)
        .await
        .map(|r| r.data)
        .map_err(map_write_err)
}

fn members_of(raft: &Raft) -> Members {
    let m = raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    Members {
        leader: m.current_leader,
        voters: membership.voter_ids().collect(),
        learners: membership.learner_ids().collect(),
        nodes: membership.nodes().map(|(id, n)| (*id, n.clone())).collect(),
    }
}

impl Replica {
    /// Opens the log, starts openraft and the QUIC server.
    pub async fn start(cfg: ReplicaConfig) -> Result<Replica, StartError> {
        let t = &cfg.timing;
        let config = Config {
            cluster_name: "stacyvm".into(),
            heartbeat_interval: t.heartbeat_ms,
            election_timeout_min: t.election_min_ms,
            election_timeout_max: t.election_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(t.snapshot_every),
            max_in_snapshot_log_to_keep: t.keep_logs,
            // Snapshots are logical dumps and can be tens of MB: send them in
            // 1 MiB chunks, each with a generous timeout.
            snapshot_max_chunk_size: 1024 * 1024,
            install_snapshot_timeout: 10_000,
            // A learner counts as caught up (and may be promoted) only within
            // 100 entries of the leader, not openraft's default 5,000.
            replication_lag_threshold: 100,
            // Together with the byte budget in `network.rs`, keeps each
            // append well inside the heartbeat-long RPC timeout.
            max_payload_entries: 64,
            ..Default::default()
        }
        .validate()
        .map_err(|e| StartError::Config(e.to_string()))?;
        let log_dir = cfg.log_dir.clone();
        let log = tokio::task::spawn_blocking(move || SledLog::open(&log_dir))
            .await
            .map_err(|e| StartError::Raft(e.to_string()))??;
        let client = Arc::new(RpcClient::new(&cfg.tls)?.with_source_ip(cfg.bind.ip()));
        let sm = StoreStateMachine::new(cfg.store.clone());
        let raft = Raft::new(
            cfg.id,
            Arc::new(config),
            QuicNetwork::new(client.clone()),
            RaftLogStore::open_checked(
                log,
                if cfg.shared_store {
                    None
                } else {
                    applied_raft_index(&cfg.store).await?
                },
            )?,
            sm.clone(),
        )
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;
        let handler = Handler {
            raft: raft.clone(),
            store: cfg.store.clone(),
            leases: Arc::new(Mutex::new(None)),
            client: client.clone(),
            timing: cfg.timing.clone(),
        };
        let server = serve(cfg.bind, &cfg.tls, Arc::new(handler.clone())).await?;
        Ok(Replica {
            id: cfg.id,
            raft,
            handler,
            client,
            server: Some(server),
            store: cfg.store,
            timing: cfg.timing,
            sm,
        })
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The openraft handle (metrics, waits).
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// This replica's store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Where the QUIC server listens.
    pub fn raft_addr(&self) -> Option<SocketAddr> {
        self.server.as_ref().map(RpcServer::local_addr)
    }

    /// Creates a new cluster whose initial voters are `members`.
    pub async fn bootstrap(&self, members: BTreeMap<NodeId, NodeInfo>) -> Result<(), WriteError> {
        self.raft
            .initialize(members)
            .await
            .map_err(|e| WriteError::Refused(e.to_string()))
    }

    /// The current leader and how to reach it, as this replica knows it.
    pub fn leader(&self) -> Option<(NodeId, NodeInfo)> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let node = m
            .membership_config
            .membership()
            .get_node(&id)
            .cloned()
            .unwrap_or_default();
        Some((id, node))
    }

    /// True when this replica is the leader.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    /// Waits (bounded) for a known leader other than none.
    async fn wait_leader(&self, deadline: Instant) -> Result<(NodeId, NodeInfo), WriteError> {
        loop {
            if let Some(l) = self.leader() {
                return Ok(l);
            }
            if Instant::now() >= deadline {
                return Err(WriteError::NoLeader);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends `req` to the leader (this replica's handler if it leads).
    async fn to_leader(&self, req: RpcRequest) -> Result<RpcReply, WriteError> {
        // A join waits for the learner to catch up, snapshot included.
        let (total, attempt) = match req {
            RpcRequest::Join { .. } => (JOIN_TIMEOUT, JOIN_TIMEOUT),
            _ => (self.timing.leader_wait, self.timing.attempt_timeout()),
        };
        self.to_leader_within(req, total, attempt).await
    }

    async fn to_leader_within(
        &self,
        req: RpcRequest,
        total: Duration,
        attempt_limit: Duration,
    ) -> Result<RpcReply, WriteError> {
        use crate::transport::TransportError;
        let deadline = Instant::now() + total;
        // Reads, membership queries and renewals may be sent again; a write
        // whose fate is unknown may not (it could apply twice), so it reports
        // `Timeout` and leaves the retry to the caller.
        let idempotent = matches!(
            req,
            RpcRequest::ReadIndex | RpcRequest::Members | RpcRequest::LeaseRenew { .. }
        );
        loop {
            let (leader, node) = self.wait_leader(deadline).await?;
            // One attempt never outlives a leader change by much: a request
            // sent to a leader that just died must not hold the caller for the
            // whole wait.
            let attempt = deadline
                .saturating_duration_since(Instant::now())
                .min(attempt_limit)
                .max(Duration::from_millis(100));
            let outcome = if leader == self.id {
                let local = self.handler.dispatch(req_clone(&req)?);
                tokio::time::timeout(attempt, local)
                    .await
                    .map_err(|_| TransportError::Timeout)
            } else {
                // Abandon the attempt as soon as another leader is known: the
                // old one is gone or deposed and will not answer usefully.
                let sent = call(&self.client, leader, &node.raft_addr, &req, attempt);
                // (A transfer changes the leader on purpose: wait for its answer.)
                let watch = !matches!(req, RpcRequest::TransferLeader { .. });
                let deposed = async {
                    if !watch {
                        std::future::pending::<()>().await;
                    }
                    loop {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        if self.leader().is_some_and(|(l, _)| l != leader) {
                            return;
                        }
                    }
                };
                tokio::select! {
                    r = sent => r,
                    () = deposed => Err(TransportError::Timeout),
                }
            };
            let reply = match outcome {
                Ok(r) => r,
                // Not sent at all: safe to try the next leader.
                Err(TransportError::Connect(_)) => RpcReply::Write(Err(WriteError::NoLeader)),
                Err(_) if idempotent => RpcReply::Write(Err(WriteError::NoLeader)),
                Err(_) => return Err(WriteError::Timeout),
            };
            let lost_leader = matches!(
                &reply,
                RpcReply::Write(Err(WriteError::NoLeader))
                    | RpcReply::ReadIndex(Err(WriteError::NoLeader))
                    | RpcReply::Membership(Err(WriteError::NoLeader))
                    | RpcReply::Lease(Err(LeaseError::Write(WriteError::NoLeader)))
                    | RpcReply::Renew(Err(WriteError::NoLeader))
            );
            if !lost_leader {
                return Ok(reply);
            }
            if Instant::now() >= deadline {
                return Err(WriteError::NoLeader);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Replicates `cmd` through the leader and returns its outcome once it is
    /// committed and applied on the leader.
    pub async fn write(&self, cmd: Command) -> Result<Response, WriteError> {
        match self.to_leader(RpcRequest::Write(cmd)).await? {
            RpcReply::Write(r) => r,
            other => Err(WriteError::Fatal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Linearizable-read barrier: returns once this replica's store reflects
    /// every write the leader had committed when the barrier started.
    pub async fn read_barrier(&self) -> Result<(), WriteError> {
        let read = match self.to_leader(RpcRequest::ReadIndex).await? {
            RpcReply::ReadIndex(r) => r?,
            other => return Err(WriteError::Fatal(format!("unexpected reply {other:?}"))),
        };
        let Some(log_id) = read else { return Ok(()) };
        self.raft
            .wait(Some(self.timing.leader_wait))
            .applied_index_at_least(Some(log_id.index), "read barrier")
            .await
            .map(|_| ())
            .map_err(|_| WriteError::Timeout)
    }

    /// Asks the leader to add `id` as a learner, wait for it to catch up, and
    /// promote it to voter.
    pub async fn join(&self, id: NodeId, node: NodeInfo) -> Result<(), WriteError> {
        match self.to_leader(RpcRequest::Join { id, node }).await? {
            RpcReply::Membership(r) => r,
            other => Err(WriteError::Fatal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Asks the leader to remove voter `id` from the cluster.
    pub async fn leave(&self, id: NodeId) -> Result<(), WriteError> {
        match self.to_leader(RpcRequest::Leave { id }).await? {
            RpcReply::Membership(r) => r,
            other => Err(WriteError::Fatal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Makes voter `to` the leader (see `Handler::transfer`), then waits
    /// (bounded) until this replica sees the change.
    pub async fn transfer_leader(&self, to: NodeId) -> Result<(), WriteError> {
        match self.to_leader(RpcRequest::TransferLeader { to }).await? {
            RpcReply::Membership(r) => r?,
            other => return Err(WriteError::Fatal(format!("unexpected reply {other:?}"))),
        }
        let deadline = Instant::now() + self.timing.leader_wait;
        while Instant::now() < deadline {
            if self.leader().map(|l| l.0) == Some(to) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(WriteError::Timeout)
    }

    /// The membership as the leader sees it.
    pub async fn members(&self) -> Result<Members, WriteError> {
        match self.to_leader(RpcRequest::Members).await? {
            RpcReply::Members(r) => r,
            other => Err(WriteError::Fatal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Grants a lease through the leader (see [`crate::leases`]).
    pub async fn acquire_lease(
        &self,
        resource_id: &str,
        resource_type: &str,
        holder_id: &str,
        ttl_ms: i64,
    ) -> Result<Lease, LeaseError> {
        let req = RpcRequest::LeaseAcquire {
            resource_id: resource_id.into(),
            resource_type: resource_type.into(),
            holder_id: holder_id.into(),
            ttl_ms,
        };
        match self.to_leader(req).await? {
            RpcReply::Lease(r) => r,
            other => Err(WriteError::Fatal(format!("unexpected reply {other:?}")).into()),
        }
    }

    /// Renews every lease `holder_id` claims, in one call to the leader.
    pub async fn renew_leases(
        &self,
        holder_id: &str,
        leases: Vec<HeldLease>,
    ) -> Result<RenewOutcome, WriteError> {
        match self
            .to_leader(RpcRequest::LeaseRenew {
                holder_id: holder_id.into(),
                leases,
            })
            .await?
        {
            RpcReply::Renew(r) => r,
            other => Err(WriteError::Fatal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Releases a lease held by `holder_id`; returns the lease as it was.
    pub async fn release_lease(
        &self,
        resource_id: &str,
        holder_id: &str,
    ) -> Result<Lease, LeaseError> {
        let req = RpcRequest::LeaseRelease {
            resource_id: resource_id.into(),
            holder_id: holder_id.into(),
        };
        match self.to_leader(req).await? {
            RpcReply::Lease(r) => r,
            other => Err(WriteError::Fatal(format!("unexpected reply {other:?}")).into()),
        }
    }

    /// On the leader: grants a lease and applies `extra` in the same Raft
    /// entry, so a record and its lease appear together. `NoLeader` elsewhere.
    pub async fn acquire_lease_with(
        &self,
        resource_id: &str,
        resource_type: &str,
        holder_id: &str,
        ttl_ms: i64,
        extra: Vec<Mutation>,
    ) -> Result<(Lease, Vec<Result<MutationOutput, StoreError>>), LeaseError> {
        if !self.is_leader() {
            return Err(WriteError::NoLeader.into());
        }
        self.handler
            .lease_acquire_with(
                resource_id.into(),
                resource_type.into(),
                holder_id.into(),
                ttl_ms,
                extra,
            )
            .await
    }

    /// On the leader: writes `mutations` (typically `RevokeLease`s and the
    /// records they guard) in one entry and forgets the revoked leases'
    /// deadlines. Returns each mutation's outcome.
    pub async fn write_revoking(
        &self,
        revoked: &[String],
        mutations: Vec<Mutation>,
    ) -> Result<Vec<Result<MutationOutput, StoreError>>, WriteError> {
        if !self.is_leader() {
            return Err(WriteError::NoLeader);
        }
        let n = mutations.len();
        let out = match local_write(&self.raft, Command::Store(mutations)).await? {
            Response::Applied(r) if r.len() == n => r,
            Response::AlreadyApplied => Vec::new(),
            other => return Err(WriteError::Fatal(format!("write returned {other:?}"))),
        };
        self.handler.with_table(|t| {
            for id in revoked {
                t.forget(id);
            }
        });
        Ok(out)
    }

    /// What this replica applies, as it applies it (see [`AppliedMutations`]).
    pub fn subscribe_applied(
        &self,
    ) -> tokio::sync::broadcast::Receiver<Arc<crate::state_machine::AppliedMutations>> {
        self.sm.subscribe()
    }

    /// The applied log ID of this replica.
    pub fn applied(&self) -> Option<LogId> {
        self.raft.metrics().borrow().last_applied
    }

    /// Stops Raft and the transport.
    pub async fn shutdown(mut self) {
        let _ = self.raft.shutdown().await;
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
    }
}

/// The raft index the store has applied (its bookkeeping row), if any.
async fn applied_raft_index(store: &Arc<dyn Store>) -> Result<Option<u64>, StartError> {
    let state = store
        .raft_state()
        .await
        .map_err(|e| StartError::Raft(format!("cannot read the store: {e}")))?;
    if state.applied_log.is_empty() {
        return Ok(None);
    }
    let id: LogId = serde_json::from_str(&state.applied_log)
        .map_err(|e| StartError::Raft(format!("the store's applied log id is unreadable: {e}")))?;
    Ok(Some(id.index))
}

/// Requests are not `Clone` (openraft's are not); the local path re-encodes.
fn req_clone(req: &RpcRequest) -> Result<RpcRequest, WriteError> {
    let bytes = encode_value(req).map_err(fatal)?;
    decode_value(&bytes).map_err(fatal)
}
