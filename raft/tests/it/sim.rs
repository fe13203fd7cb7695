//! Deterministic fault injection for Raft: three or five real openraft
//! replicas in one process (the sled [`RaftLogStore`] and the SQLite-backed
//! [`StoreStateMachine`], each on a scratch directory), wired by an in-memory
//! network ([`SimNet`]) that drops, delays (and so reorders) and partitions
//! messages as a seed dictates, while a client writes through whichever
//! replica leads. After the fault schedule everything is healed; the cluster
//! must take a write, converge, and pass the invariants in [`Sim::check`]:
//! one leader per term where openraft promises it ([`one_leader_per_term`]),
//! saved votes and applied indexes never go back (restarts included), every
//! acknowledged write is on every replica, nothing unproposed appears, the
//! log order respects the client's order, applied indexes agree, and all
//! stores are identical.
//!
//! What the seed fixes: the cluster size and snapshot settings, the schedule
//! of partitions (isolate the leader, cut off a minority, a bridge node,
//! one-way cuts, heal) with each phase's drop and delay rates and length,
//! which phases restart a node (its Raft stopped and reopened on the same
//! sled handle and database, through the log check `Replica::start` uses), the
//! client's pacing, and the fate of every message as a function of its link and
//! its ordinal on that link (dropped going out, dropped coming back, delayed
//! each way, black-holed or refused). Time is tokio's paused clock, so a seed
//! costs CPU, not wall time; the state machine's SQLite calls run while a
//! blocking task pins the clock (see [`hold`]), so they take no virtual time.
//!
//! What it does not fix: openraft draws election timeouts from its own
//! unseeded RNG, and sled and SQLite work on other threads, so the order in
//! which tasks interleave (and therefore which message gets which ordinal, and
//! who leads when "isolate the leader" strikes) can differ between runs of
//! one seed. A replay repeats the schedule and the per-message decisions, not
//! necessarily every interleaving: a failing seed may take several replays
//! to fail again, and the failure report (plan and event log) is the record
//! to keep.
//!
//! Running: `cargo nextest run -p stacyvm-raft --test it sim` runs
//! [`TESTS`] tests of [`DEFAULT_SEEDS`] seeds each (seed `s` belongs to test
//! `s % TESTS`). `STACYVM_SIM_SEEDS=<count>` changes the seeds per test;
//! `STACYVM_SIM_SEED=<n>` replays seed `n` only. A failure names its seed,
//! the replay command, the seed's plan and the tail of its event log.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use openraft::error::{
    ClientWriteError, Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{Config, RaftMetrics, RaftSnapshotBuilder, ServerState, SnapshotPolicy};
use openraft::{LeaderId, StoredMembership, Vote};
use stacyvm_raft::codec::{Command, decode_value, encode_value};
use stacyvm_raft::log::SledLog;
use stacyvm_raft::log_store::RaftLogStore;
use stacyvm_raft::replica::RaftTiming;
use stacyvm_raft::rpc::{RpcReply, RpcRequest};
use stacyvm_raft::state_machine::StoreStateMachine;
use stacyvm_raft::types::{
    Entry, LogId, NodeId, NodeInfo, Raft, Response, StorageError, TypeConfig, store_index,
};
use stacyvm_store::testing::cases::{T0, sandbox};
use stacyvm_store::{Mutation, Store, StoreConfig, StoreSnapshot};
use tokio::time::Instant;

use crate::harness::tables;

/// Replays one seed.
const SEED_ENV: &str = "STACYVM_SIM_SEED";
/// Seeds per test.
const SEEDS_ENV: &str = "STACYVM_SIM_SEEDS";
/// Test functions sharing the seeds (nextest runs them in parallel).
const TESTS: u64 = 4;
const DEFAULT_SEEDS: u64 = 50;
/// Client writes per seed while faults run (plus the final one after healing).
const WRITES: u64 = 30;
/// The sandbox every write also touches, so the log order is visible in the store.
const ANCHOR: &str = "sim-anchor";
/// Write `i` sets the anchor's expiry to `T0 + EXPIRY_BASE_MS + i` ms.
const EXPIRY_BASE_MS: i64 = 1_000_000;

/// Virtual-time limits.
const SEED_LIMIT: Duration = Duration::from_secs(300);
const ATTEMPT: Duration = Duration::from_millis(1_500);
const WRITE_PATIENCE: Duration = Duration::from_secs(4);
const SETTLE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- randomness

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// SplitMix64: tiny, seedable, and good enough to pick faults.
#[derive(Clone, Debug)]
struct Rng(u64);

/// Independent streams per purpose, so adding a draw to one does not shift
/// the others.
const PLAN: u64 = 1;
const LINK: u64 = 2;
const CLIENT: u64 = 3;

impl Rng {
    /// The stream for `seed` and the path `parts` (a purpose, then its keys).
    fn stream(seed: u64, parts: &[u64]) -> Rng {
        let mut s = mix(seed.wrapping_add(GOLDEN));
        for p in parts {
            s = mix(s ^ p.wrapping_add(GOLDEN));
        }
        Rng(s)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN);
        mix(self.0)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }

    /// True with probability `p`/1000.
    fn permille(&mut self, p: u64) -> bool {
        self.below(1000) < p
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len() as u64) as usize]
    }
}

// ---------------------------------------------------------------- the plan

/// Message faults while a phase lasts (per mille, per direction).
#[derive(Clone, Copy, Debug, Default)]
struct Faults {
    drop: u64,
    delay: u64,
    max_delay_ms: u64,
}

/// Which links a phase cuts.
#[derive(Clone, Debug)]
enum Cut {
    Heal,
    /// Every link to and from whoever leads when the phase starts.
    IsolateLeader,
    /// These nodes (a minority) from the rest.
    Minority(BTreeSet<NodeId>),
    /// `left` and the rest cannot talk, but both talk to `bridge`.
    Bridge {
        bridge: NodeId,
        left: BTreeSet<NodeId>,
    },
    /// The node hears nothing (its incoming links are cut).
    Deaf(NodeId),
    /// Nothing the node sends arrives (its outgoing links are cut).
    Mute(NodeId),
}

/// Which node a phase restarts.
#[derive(Clone, Copy, Debug)]
enum Whom {
    Leader,
    Node(NodeId),
}

#[derive(Clone, Debug)]
struct Phase {
    cut: Cut,
    /// Restarted as the phase starts (stopped, then its Raft reopened on the
    /// same log and store).
    restart: Option<Whom>,
    ms: u64,
    faults: Faults,
}

/// Everything a seed decides up front.
#[derive(Clone, Debug)]
struct Plan {
    seed: u64,
    nodes: u64,
    snapshot_every: u64,
    keep_logs: u64,
    chunk: u64,
    phases: Vec<Phase>,
    /// Longest pause between two client writes.
    write_gap_ms: u64,
}

impl Plan {
    fn new(seed: u64) -> Plan {
        let mut r = Rng::stream(seed, &[PLAN]);
        let nodes = if r.below(4) == 0 { 5 } else { 3 };
        let ids: Vec<NodeId> = (1..=nodes).collect();
        // Small snapshot intervals and chunks make lagging followers catch up
        // through (chunked, lossy) snapshot installs.
        let snapshot_every = r.pick(&[8, 20, 10_000]);
        let keep_logs = r.range(0, 5);
        let chunk = r.pick(&[256, 4096, 1 << 20]);
        let count = r.range(3, 7);
        let mut phases = Vec::new();
        for _ in 0..count {
            let cut = match r.below(7) {
                0 => Cut::Heal,
                1 | 2 => Cut::IsolateLeader,
                3 => {
                    let size = r.range(1, (nodes - 1) / 2);
                    Cut::Minority(pick_set(&mut r, &ids, size))
                }
                4 => {
                    let bridge = r.pick(&ids);
                    let others: Vec<NodeId> =
                        ids.iter().copied().filter(|&i| i != bridge).collect();
                    let size = r.range(1, others.len() as u64 - 1);
                    Cut::Bridge {
                        bridge,
                        left: pick_set(&mut r, &others, size),
                    }
                }
                5 => Cut::Deaf(r.pick(&ids)),
                _ => Cut::Mute(r.pick(&ids)),
            };
            let restart = match r.below(8) {
                0 => Some(Whom::Leader),
                1 => Some(Whom::Node(r.pick(&ids))),
                _ => None,
            };
            let faults = Faults {
                drop: r.pick(&[0, 0, 20, 100, 250]),
                delay: r.pick(&[0, 100, 500]),
                max_delay_ms: r.range(5, 300),
            };
            phases.push(Phase {
                cut,
                restart,
                ms: r.range(200, 1_500),
                faults,
            });
        }
        let total: u64 = phases.iter().map(|p| p.ms).sum();
        Plan {
            seed,
            nodes,
            snapshot_every,
            keep_logs,
            chunk,
            phases,
            write_gap_ms: (2 * total / WRITES).max(1),
        }
    }

    /// One line per phase, for failure reports.
    fn describe(&self) -> String {
        let mut out = format!(
            "seed {}: {} nodes, snapshot every {} entries keeping {}, {} B chunks, \
             writes at most {} ms apart",
            self.seed,
            self.nodes,
            self.snapshot_every,
            self.keep_logs,
            self.chunk,
            self.write_gap_ms
        );
        for (k, p) in self.phases.iter().enumerate() {
            let f = p.faults;
            out.push_str(&format!(
                "\n  phase {k}: {} ms, {:?}, restart {:?}, drop {}‰, delay {}‰ up to {} ms",
                p.ms, p.cut, p.restart, f.drop, f.delay, f.max_delay_ms
            ));
        }
        out
    }
}

fn pick_set(r: &mut Rng, from: &[NodeId], size: u64) -> BTreeSet<NodeId> {
    let mut pool = from.to_vec();
    let mut out = BTreeSet::new();
    for _ in 0..size.min(pool.len() as u64) {
        out.insert(pool.remove(r.below(pool.len() as u64) as usize));
    }
    out
}

/// The directed links `cut` blocks in a cluster of `ids`.
fn links(cut: &Cut, ids: &[NodeId], leader: NodeId) -> BTreeSet<(NodeId, NodeId)> {
    let between = |a: &BTreeSet<NodeId>, b: &BTreeSet<NodeId>| {
        let mut out = BTreeSet::new();
        for &x in a {
            for &y in b {
                out.insert((x, y));
                out.insert((y, x));
            }
        }
        out
    };
    let all: BTreeSet<NodeId> = ids.iter().copied().collect();
    let one = |n: NodeId| BTreeSet::from([n]);
    let rest = |s: &BTreeSet<NodeId>| all.difference(s).copied().collect::<BTreeSet<_>>();
    match cut {
        Cut::Heal => BTreeSet::new(),
        Cut::IsolateLeader => between(&one(leader), &rest(&one(leader))),
        Cut::Minority(m) => between(m, &rest(m)),
        Cut::Bridge { bridge, left } => {
            let mut right = rest(left);
            right.remove(bridge);
            between(left, &right)
        }
        Cut::Deaf(n) => ids.iter().filter(|&&i| i != *n).map(|&i| (i, *n)).collect(),
        Cut::Mute(n) => ids.iter().filter(|&&i| i != *n).map(|&i| (*n, i)).collect(),
    }
}

// ---------------------------------------------------------------- the network

/// What the network did, for the summary line.
#[derive(Debug, Default)]
struct Counters {
    sent: AtomicU64,
    /// Snapshot chunks among them.
    snapshot_chunks: AtomicU64,
    dropped: AtomicU64,
    replies_lost: AtomicU64,
    delayed: AtomicU64,
    cut: AtomicU64,
    partitions: AtomicU64,
}

#[derive(Debug, Default)]
struct NetState {
    cut: BTreeSet<(NodeId, NodeId)>,
    faults: Faults,
    /// Messages sent so far on each directed link: the next one's ordinal.
    sent: BTreeMap<(NodeId, NodeId), u64>,
}

/// The fate of one message, drawn from its link's stream at its ordinal.
#[derive(Debug)]
struct Fate {
    drop_request: bool,
    drop_reply: bool,
    delay_request: Duration,
    delay_reply: Duration,
    /// A lost message times out (true) rather than failing at once.
    black_hole: bool,
}

fn fate(seed: u64, from: NodeId, to: NodeId, ordinal: u64, f: Faults) -> Fate {
    let mut r = Rng::stream(seed, &[LINK, from, to, ordinal]);
    // Always the same number of draws, whatever the rates.
    let drop_request = r.permille(f.drop);
    let drop_reply = r.permille(f.drop);
    let delay_request = r.permille(f.delay);
    let request_ms = r.range(1, f.max_delay_ms.max(1));
    let delay_reply = r.permille(f.delay);
    let reply_ms = r.range(1, f.max_delay_ms.max(1));
    let black_hole = r.below(2) == 0;
    let ms = |on: bool, ms: u64| Duration::from_millis(if on { ms } else { 0 });
    Fate {
        drop_request,
        drop_reply,
        delay_request: ms(delay_request, request_ms),
        delay_reply: ms(delay_reply, reply_ms),
        black_hole,
    }
}

/// Why a message got no answer.
enum Lost {
    /// Refused or timed out (openraft backs off before retrying).
    Unreachable(String),
    /// Failed mid-way (openraft retries at once).
    Network(String),
}

impl Lost {
    fn into_rpc<E: std::error::Error>(self) -> RPCError<NodeId, NodeInfo, E> {
        match self {
            Lost::Unreachable(why) => {
                RPCError::Unreachable(Unreachable::new(&std::io::Error::other(why)))
            }
            Lost::Network(why) => RPCError::Network(NetworkError::new(&std::io::Error::other(why))),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The in-memory network every replica of one seed sends through.
struct SimNet {
    seed: u64,
    started: Instant,
    rafts: Mutex<BTreeMap<NodeId, Raft>>,
    state: Mutex<NetState>,
    counters: Counters,
    /// Things that must never happen (a message that does not survive the
    /// codec, ...): each fails the seed.
    trouble: Mutex<Vec<String>>,
    /// What happened, with virtual timestamps, for a failure report.
    events: Mutex<Vec<String>>,
}

impl std::fmt::Debug for SimNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimNet")
            .field("seed", &self.seed)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl SimNet {
    fn new(seed: u64) -> SimNet {
        SimNet {
            seed,
            started: Instant::now(),
            rafts: Mutex::new(BTreeMap::new()),
            state: Mutex::new(NetState::default()),
            counters: Counters::default(),
            trouble: Mutex::new(Vec::new()),
            events: Mutex::new(Vec::new()),
        }
    }

    fn event(&self, what: String) {
        let ms = self.started.elapsed().as_millis();
        lock(&self.events).push(format!("{ms:>6} ms  {what}"));
    }

    fn trouble(&self, what: String) {
        self.event(format!("TROUBLE {what}"));
        lock(&self.trouble).push(what);
    }

    fn set(&self, cut: BTreeSet<(NodeId, NodeId)>, faults: Faults) {
        let mut st = lock(&self.state);
        if st.cut != cut {
            self.counters.partitions.fetch_add(1, Ordering::Relaxed);
        }
        st.cut = cut;
        st.faults = faults;
    }

    fn is_cut(&self, from: NodeId, to: NodeId) -> bool {
        lock(&self.state).cut.contains(&(from, to))
    }

    fn count(&self, c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// A lost message: after the RPC's timeout (black hole) or at once.
    async fn lose(&self, black_hole: bool, ttl: Duration, why: &str) -> Lost {
        if black_hole {
            tokio::time::sleep(ttl).await;
            Lost::Unreachable(format!("{why}: timed out"))
        } else {
            Lost::Unreachable(format!("{why}: refused"))
        }
    }

    /// Passes `value` through the wire codec, as the QUIC network would.
    fn wire<T: serde::Serialize + serde::de::DeserializeOwned>(
        &self,
        value: &T,
        what: &str,
    ) -> Result<T, Lost> {
        let decoded = encode_value(value).and_then(|bytes| decode_value(&bytes));
        decoded.map_err(|e| {
            self.trouble(format!("{what} does not survive the codec: {e}"));
            Lost::Network(format!("codec: {e}"))
        })
    }

    /// Sends `req` from `from` to `to` through the faults of the moment.
    async fn deliver(
        &self,
        from: NodeId,
        to: NodeId,
        req: RpcRequest,
        ttl: Duration,
    ) -> Result<RpcReply, Lost> {
        let (fate, cut) = {
            let mut st = lock(&self.state);
            let faults = st.faults;
            let next = st.sent.entry((from, to)).or_default();
            let ordinal = *next;
            *next += 1;
            (
                fate(self.seed, from, to, ordinal, faults),
                st.cut.contains(&(from, to)),
            )
        };
        self.count(&self.counters.sent);
        if matches!(req, RpcRequest::InstallSnapshot(_)) {
            self.count(&self.counters.snapshot_chunks);
        }
        if cut {
            self.count(&self.counters.cut);
            return Err(self.lose(fate.black_hole, ttl, "partitioned").await);
        }
        if fate.drop_request {
            self.count(&self.counters.dropped);
            return Err(self.lose(fate.black_hole, ttl, "request dropped").await);
        }
        if !fate.delay_request.is_zero() {
            self.count(&self.counters.delayed);
            tokio::time::sleep(fate.delay_request).await;
            // The link may have been cut while the message was in flight.
            if self.is_cut(from, to) {
                self.count(&self.counters.cut);
                return Err(self.lose(true, ttl, "partitioned in flight").await);
            }
        }
        let raft = lock(&self.rafts).get(&to).cloned();
        let Some(raft) = raft else {
            return Err(Lost::Unreachable(format!("node {to} is down")));
        };
        let reply = match self.wire(&req, "a request")? {
            RpcRequest::AppendEntries(r) => RpcReply::AppendEntries(raft.append_entries(r).await),
            RpcRequest::Vote(r) => RpcReply::Vote(raft.vote(r).await),
            RpcRequest::InstallSnapshot(r) => {
                RpcReply::InstallSnapshot(raft.install_snapshot(r).await)
            }
            other => RpcReply::BadRequest(format!("not a raft rpc: {other:?}")),
        };
        if stopped(&reply) {
            // A stopped replica's server is gone too: the caller sees no answer.
            return Err(Lost::Unreachable(format!("node {to} stopped")));
        }
        let reply = self.wire(&reply, "a reply")?;
        if fate.drop_reply || self.is_cut(to, from) {
            // Delivered and acted on; only the answer is lost.
            self.count(&self.counters.replies_lost);
            return Err(if fate.black_hole {
                self.lose(true, ttl, "reply lost").await
            } else {
                Lost::Network("reply lost: connection reset".into())
            });
        }
        if !fate.delay_reply.is_zero() {
            self.count(&self.counters.delayed);
            tokio::time::sleep(fate.delay_reply).await;
        }
        Ok(reply)
    }
}

/// True when the answer is "this Raft has stopped" (a restart under way).
fn stopped(reply: &RpcReply) -> bool {
    let fatal = |e: &RaftError<NodeId, _>| matches!(e, RaftError::Fatal(Fatal::Stopped));
    match reply {
        RpcReply::AppendEntries(Err(e)) | RpcReply::Vote(Err(e)) => fatal(e),
        RpcReply::InstallSnapshot(Err(e)) => matches!(e, RaftError::Fatal(Fatal::Stopped)),
        _ => false,
    }
}

/// Makes one node's links.
#[derive(Clone, Debug)]
struct SimFactory {
    from: NodeId,
    net: Arc<SimNet>,
}

/// One node's link to one peer.
#[derive(Debug)]
struct SimLink {
    from: NodeId,
    to: NodeId,
    net: Arc<SimNet>,
}

impl RaftNetworkFactory<TypeConfig> for SimFactory {
    type Network = SimLink;

    async fn new_client(&mut self, target: NodeId, _node: &NodeInfo) -> SimLink {
        SimLink {
            from: self.from,
            to: target,
            net: self.net.clone(),
        }
    }
}

impl SimLink {
    async fn call<E: std::error::Error>(
        &self,
        req: RpcRequest,
        option: &RPCOption,
    ) -> Result<RpcReply, RPCError<NodeId, NodeInfo, E>> {
        match self
            .net
            .deliver(self.from, self.to, req, option.hard_ttl())
            .await
        {
            Ok(RpcReply::BadRequest(why)) => Err(Lost::Network(why).into_rpc()),
            Ok(reply) => Ok(reply),
            Err(lost) => Err(lost.into_rpc()),
        }
    }

    fn unexpected<E: std::error::Error>(&self, what: &str) -> RPCError<NodeId, NodeInfo, E> {
        self.net
            .trouble(format!("node {} answered {what} wrongly", self.to));
        Lost::Network(format!("wrong answer to {what}")).into_rpc()
    }
}

impl RaftNetwork<TypeConfig> for SimLink {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        match self.call(RpcRequest::AppendEntries(rpc), &option).await? {
            RpcReply::AppendEntries(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
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
        match self.call(RpcRequest::InstallSnapshot(rpc), &option).await? {
            RpcReply::InstallSnapshot(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
            }
            _ => Err(self.unexpected("install-snapshot")),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        match self.call(RpcRequest::Vote(rpc), &option).await? {
            RpcReply::Vote(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e))),
            _ => Err(self.unexpected("vote")),
        }
    }
}

// ---------------------------------------------------------------- storage

/// Runs `fut` while a blocking task pins tokio's paused clock. SQLite works on
/// sqlx's own threads, which tokio cannot see: without the pin, the clock
/// would jump to the next timer whenever every task waits for the database,
/// and a slow disk would look like minutes of silence (elections, timeouts).
/// The sled log needs no pin: it already runs on the blocking pool.
async fn hold<F: Future>(fut: F) -> F::Output {
    let (release, wait) = std::sync::mpsc::channel::<()>();
    let pin = tokio::task::spawn_blocking(move || {
        let _ = wait.recv();
    });
    let out = fut.await;
    drop(release);
    let _ = pin.await;
    out
}

/// The real state machine, its store calls made under [`hold`].
#[derive(Clone, Debug)]
struct HeldSm(StoreStateMachine);

impl RaftStateMachine<TypeConfig> for HeldSm {
    type SnapshotBuilder = HeldSm;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, NodeInfo>), StorageError> {
        hold(self.0.applied_state()).await
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        hold(self.0.apply(entries)).await
    }

    async fn get_snapshot_builder(&mut self) -> HeldSm {
        HeldSm(self.0.get_snapshot_builder().await)
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        self.0.begin_receiving_snapshot().await
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, NodeInfo>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        hold(self.0.install_snapshot(meta, snapshot)).await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        self.0.get_current_snapshot().await
    }
}

impl RaftSnapshotBuilder<TypeConfig> for HeldSm {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        hold(self.0.build_snapshot()).await
    }
}

/// A scratch directory, in memory when the machine has `/dev/shm` (sled
/// fsyncs every write; on a RAM disk that costs nothing).
fn scratch() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    let b = tempfile::Builder::new().prefix("stacyvm-sim-").clone();
    if shm.is_dir()
        && let Ok(dir) = b.tempdir_in(shm)
    {
        return dir;
    }
    b.tempdir().expect("temp dir")
}

// ---------------------------------------------------------------- observation

/// Whether openraft promises one leader per term. By default (its "advanced"
/// mode) a leader ID is `(term, node)` in lexicographic order, so a term may
/// see several leaders in turn (a candidate with a higher node ID can still win
/// a term another node already won; only the last can commit). With the
/// `single-term-leader` feature it is standard Raft's one leader per term, and
/// this test holds the cluster to that.
fn one_leader_per_term() -> bool {
    LeaderId::<NodeId>::new(1, 1)
        .partial_cmp(&LeaderId::new(1, 2))
        .is_none()
}

/// What the metrics watchers saw, across the whole seed.
#[derive(Debug, Default)]
struct Observed {
    /// Every node seen leading (or recognised as leader) in each term.
    leaders: BTreeMap<u64, BTreeSet<NodeId>>,
    /// Each node's last persisted vote (openraft reports it once saved).
    vote: BTreeMap<NodeId, Vote<NodeId>>,
    applied: BTreeMap<NodeId, u64>,
    trouble: Vec<String>,
}

impl Observed {
    fn record(&mut self, m: &RaftMetrics<NodeId, NodeInfo>, net: &SimNet) {
        let term = m.current_term;
        if m.state == ServerState::Leader {
            let new = self.leaders.entry(term).or_default().insert(m.id);
            if new {
                net.event(format!("node {} leads term {term}", m.id));
            }
        }
        if let Some(l) = m.current_leader {
            self.leaders.entry(term).or_default().insert(l);
        }
        // A saved vote never goes back, restarts included: it is what stops
        // a replica from voting twice.
        if let Some(before) = self.vote.insert(m.id, m.vote)
            && !matches!(
                m.vote.partial_cmp(&before),
                Some(std::cmp::Ordering::Greater | std::cmp::Ordering::Equal)
            )
        {
            self.trouble.push(format!(
                "node {}'s saved vote went back from {before} to {}",
                m.id, m.vote
            ));
        }
        let applied = m.last_applied.map_or(0, |l| store_index(l.index));
        let before = self.applied.insert(m.id, applied).unwrap_or(0);
        if applied < before {
            self.trouble.push(format!(
                "node {}'s applied index went back from {before} to {applied}",
                m.id
            ));
        }
    }
}

// ---------------------------------------------------------------- the cluster

/// One replica: its Raft (replaced on restart), log and store.
struct Node {
    id: NodeId,
    raft: Mutex<Raft>,
    log: SledLog,
    store: Arc<dyn Store>,
    _dir: tempfile::TempDir,
}

impl Node {
    fn raft(&self) -> Raft {
        lock(&self.raft).clone()
    }

    fn metrics(&self) -> RaftMetrics<NodeId, NodeInfo> {
        self.raft().metrics().borrow().clone()
    }
}

/// What the client learned about its writes.
#[derive(Debug, Default)]
struct Client {
    /// Writes (by index) whose success was acknowledged.
    acked: BTreeSet<u64>,
    /// Every write index ever proposed (acknowledged or not).
    proposed: BTreeSet<u64>,
}

enum Outcome {
    Acked,
    /// Proposed, fate unknown (timed out, or the node stopped).
    Unknown,
    /// Never proposed (no leader accepted it in time).
    NotProposed,
}

struct Sim {
    plan: Plan,
    config: Arc<Config>,
    net: Arc<SimNet>,
    nodes: Vec<Node>,
    observed: Arc<Mutex<Observed>>,
    watchers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    restarts: AtomicU64,
}

/// Per-seed numbers for the summary.
#[derive(Debug, Default)]
struct SeedStats {
    nodes: u64,
    sent: u64,
    snapshot_chunks: u64,
    dropped: u64,
    replies_lost: u64,
    delayed: u64,
    cut: u64,
    partitions: u64,
    restarts: u64,
    /// Terms in which more than one node led (see [`one_leader_per_term`]).
    shared_terms: u64,
    proposed: u64,
    acked: u64,
    virtual_ms: u64,
}

fn sandbox_id(i: u64) -> String {
    format!("sim-{i:06}")
}

fn index_of(id: &str) -> Option<u64> {
    id.strip_prefix("sim-")?.parse().ok()
}

fn write_cmd(i: u64) -> Command {
    let ms = i64::try_from(i).expect("small index");
    Command::Store(vec![
        Mutation::CreateSandbox(sandbox(&sandbox_id(i), "sim", ms)),
        Mutation::SetSandboxExpiry {
            id: ANCHOR.into(),
            expires_at: T0.plus_millis(EXPIRY_BASE_MS + ms),
            at: T0.plus_millis(ms),
        },
    ])
}

impl Sim {
    async fn start(plan: Plan) -> Result<Sim, String> {
        let timing = RaftTiming::default();
        // As `Replica::start` configures openraft, with the seed's snapshot settings.
        let config = Config {
            cluster_name: "stacyvm-sim".into(),
            heartbeat_interval: timing.heartbeat_ms,
            election_timeout_min: timing.election_min_ms,
            election_timeout_max: timing.election_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(plan.snapshot_every),
            max_in_snapshot_log_to_keep: plan.keep_logs,
            snapshot_max_chunk_size: plan.chunk,
            install_snapshot_timeout: 10_000,
            replication_lag_threshold: 100,
            max_payload_entries: 64,
            ..Default::default()
        }
        .validate()
        .map_err(|e| format!("config: {e}"))?;
        let mut nodes = Vec::new();
        for id in 1..=plan.nodes {
            let dir = scratch();
            let raft_dir = dir.path().join("raft");
            let log = tokio::task::spawn_blocking(move || SledLog::open(&raft_dir))
                .await
                .map_err(|e| format!("sled task: {e}"))?
                .map_err(|e| format!("open sled log: {e}"))?;
            let store = hold(stacyvm_store::open(&StoreConfig::sqlite(
                dir.path().join("stacyvm.db"),
            )))
            .await
            .map_err(|e| format!("open sqlite: {e}"))?;
            nodes.push((id, log, store, dir));
        }
        let mut sim = Sim {
            config: Arc::new(config),
            net: Arc::new(SimNet::new(plan.seed)),
            plan,
            nodes: Vec::new(),
            observed: Arc::new(Mutex::new(Observed::default())),
            watchers: Mutex::new(Vec::new()),
            restarts: AtomicU64::new(0),
        };
        for (id, log, store, dir) in nodes {
            let raft = sim.open(id, &log, &store).await?;
            sim.nodes.push(Node {
                id,
                raft: Mutex::new(raft),
                log,
                store,
                _dir: dir,
            });
        }
        let members: BTreeMap<NodeId, NodeInfo> = sim
            .nodes
            .iter()
            .map(|n| {
                let info = NodeInfo {
                    raft_addr: format!("sim-{}", n.id),
                    api_addr: String::new(),
                };
                (n.id, info)
            })
            .collect();
        sim.nodes[0]
            .raft()
            .initialize(members)
            .await
            .map_err(|e| format!("initialize: {e}"))?;
        Ok(sim)
    }

    /// Starts node `id`'s Raft on its log and store (as `Replica::start`
    /// does: the log checked against what the store has applied), connects
    /// it to the network and watches its metrics.
    async fn open(
        &self,
        id: NodeId,
        log: &SledLog,
        store: &Arc<dyn Store>,
    ) -> Result<Raft, String> {
        let state = hold(store.raft_state())
            .await
            .map_err(|e| format!("node {id}: read the store: {e}"))?;
        let applied = if state.applied_log.is_empty() {
            None
        } else {
            let l: LogId = serde_json::from_str(&state.applied_log)
                .map_err(|e| format!("node {id}: applied log id: {e}"))?;
            Some(l.index)
        };
        let log = tokio::task::spawn_blocking({
            let log = log.clone();
            move || RaftLogStore::open_checked(log, applied)
        })
        .await
        .map_err(|e| format!("node {id}: log check task: {e}"))?
        .map_err(|e| format!("node {id}: the log fails its check on open: {e}"))?;
        let sm = HeldSm(StoreStateMachine::new(store.clone()));
        let factory = SimFactory {
            from: id,
            net: self.net.clone(),
        };
        let raft = Raft::new(id, self.config.clone(), factory, log, sm)
            .await
            .map_err(|e| format!("start node {id}: {e}"))?;
        lock(&self.net.rafts).insert(id, raft.clone());
        let mut rx = raft.metrics();
        let (seen, net) = (self.observed.clone(), self.net.clone());
        let watcher = tokio::spawn(async move {
            // The value before the first change is openraft's placeholder
            // (term 0, nothing applied), not this node's state: skip it.
            while rx.changed().await.is_ok() {
                let m = rx.borrow_and_update().clone();
                lock(&seen).record(&m, &net);
            }
        });
        lock(&self.watchers).push(watcher);
        Ok(raft)
    }

    /// Stops node `id`'s Raft and starts a new one on the same log and
    /// store: it must come back with its vote, log and applied state.
    async fn restart(&self, id: NodeId) -> Result<(), String> {
        let node = self
            .nodes
            .iter()
            .find(|n| n.id == id)
            .ok_or(format!("no node {id}"))?;
        lock(&self.net.rafts).remove(&id);
        let old = node.raft();
        self.net.event(format!("restart node {id}"));
        if let Err(e) = old.shutdown().await {
            self.net
                .trouble(format!("node {id} did not stop cleanly: {e}"));
        }
        let raft = self.open(id, &node.log, &node.store).await?;
        *lock(&node.raft) = raft;
        self.restarts.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The node that leads in the highest term, if any claims to.
    fn leader(&self) -> Option<(NodeId, Raft)> {
        self.nodes
            .iter()
            .map(|n| (n, n.metrics()))
            .filter(|(_, m)| m.state == ServerState::Leader)
            .max_by_key(|(_, m)| (m.current_term, m.id))
            .map(|(n, _)| (n.id, n.raft()))
    }

    /// Proposes write `i` through the leader; retries only while nothing was
    /// proposed (so an index is never proposed twice).
    async fn write(&self, i: u64, client: &mut Client) -> Outcome {
        let give_up = Instant::now() + WRITE_PATIENCE;
        loop {
            if Instant::now() >= give_up {
                return Outcome::NotProposed;
            }
            let Some((leader, raft)) = self.leader() else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            client.proposed.insert(i);
            let r = tokio::time::timeout(ATTEMPT, raft.client_write(write_cmd(i))).await;
            match r {
                Err(_) => {
                    self.net
                        .event(format!("write {i} via node {leader}: timed out"));
                    return Outcome::Unknown;
                }
                Ok(Ok(resp)) => {
                    match resp.data {
                        Response::Applied(results) if results.iter().all(Result::is_ok) => {}
                        other => self.net.trouble(format!(
                            "write {i} via node {leader} applied with {other:?}"
                        )),
                    }
                    client.acked.insert(i);
                    return Outcome::Acked;
                }
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                    // Refused before it reached the log: not proposed after all.
                    client.proposed.remove(&i);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok(Err(RaftError::Fatal(Fatal::Stopped))) => {
                    // Restarted under the write; it may be in the log.
                    self.net
                        .event(format!("write {i} via node {leader}: node stopped"));
                    return Outcome::Unknown;
                }
                Ok(Err(e)) => {
                    self.net
                        .trouble(format!("write {i} via node {leader}: {e}"));
                    return Outcome::Unknown;
                }
            }
        }
    }

    /// Runs the fault schedule, then heals everything.
    async fn faults(&self) -> Result<(), String> {
        let ids: Vec<NodeId> = self.nodes.iter().map(|n| n.id).collect();
        for (k, phase) in self.plan.phases.iter().enumerate() {
            let leader = self.leader().map_or(ids[0], |(id, _)| id);
            let cut = links(&phase.cut, &ids, leader);
            self.net.event(format!(
                "phase {k}: {:?} (leader {leader}) for {} ms, {:?}; cut {cut:?}",
                phase.cut, phase.ms, phase.faults
            ));
            self.net.set(cut, phase.faults);
            match phase.restart {
                Some(Whom::Leader) => self.restart(leader).await?,
                Some(Whom::Node(id)) => self.restart(id).await?,
                None => {}
            }
            tokio::time::sleep(Duration::from_millis(phase.ms)).await;
        }
        self.net.event("heal".into());
        self.net.set(BTreeSet::new(), Faults::default());
        Ok(())
    }

    /// The client: [`WRITES`] writes paced over the schedule.
    async fn workload(&self, client: &mut Client) {
        let mut r = Rng::stream(self.plan.seed, &[CLIENT]);
        for i in 0..WRITES {
            tokio::time::sleep(Duration::from_millis(r.below(self.plan.write_gap_ms))).await;
            self.write(i, client).await;
        }
    }

    /// The whole run: a first write, faults with writes, a write after
    /// healing (liveness), and convergence.
    async fn exercise(&self) -> Result<Client, String> {
        let mut client = Client::default();
        self.wait_for_leader().await?;
        // The anchor first, fault-free.
        let anchor = Command::Store(vec![Mutation::CreateSandbox(sandbox(ANCHOR, "sim", 0))]);
        let deadline = Instant::now() + SETTLE;
        loop {
            let (_, leader) = self.leader().ok_or("no leader after the first election")?;
            match tokio::time::timeout_at(deadline, leader.client_write(anchor.clone())).await {
                Ok(Ok(_)) => break,
                // A new election in between: try its leader.
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(Err(e)) => return Err(format!("anchor write: {e}")),
                Err(_) => return Err("anchor write timed out".into()),
            }
        }
        let (faults, ()) = tokio::join!(self.faults(), self.workload(&mut client));
        faults?;
        // Healed: the cluster must take a write again.
        let mut i = WRITES;
        loop {
            if let Outcome::Acked = self.write(i, &mut client).await {
                break;
            }
            i += 1;
            if i > WRITES + 10 {
                return Err("no write acknowledged after healing (10 attempts)".into());
            }
        }
        self.converge().await?;
        Ok(client)
    }

    async fn wait_for_leader(&self) -> Result<(), String> {
        let deadline = Instant::now() + SETTLE;
        while self.leader().is_none() {
            if Instant::now() >= deadline {
                return Err(format!("no leader within {SETTLE:?}"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Waits until one leader is recognised by all and every node has
    /// applied every entry of the leader's log.
    async fn converge(&self) -> Result<(), String> {
        let deadline = Instant::now() + SETTLE;
        loop {
            let ms: Vec<RaftMetrics<NodeId, NodeInfo>> =
                self.nodes.iter().map(Node::metrics).collect();
            let leaders: Vec<&RaftMetrics<NodeId, NodeInfo>> = ms
                .iter()
                .filter(|m| m.state == ServerState::Leader)
                .collect();
            if let [l] = leaders.as_slice()
                && ms.iter().all(|m| {
                    m.current_leader == Some(l.id)
                        && m.current_term == l.current_term
                        && m.last_log_index == l.last_log_index
                        && m.last_applied.map(|a| a.index) == l.last_log_index
                })
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let state: Vec<String> = ms
                    .iter()
                    .map(|m| {
                        format!(
                            "node {}: {:?} term {} leader {:?} last log {:?} applied {:?}",
                            m.id,
                            m.state,
                            m.current_term,
                            m.current_leader,
                            m.last_log_index,
                            m.last_applied.map(|a| a.index)
                        )
                    })
                    .collect();
                return Err(format!(
                    "no convergence {SETTLE:?} after healing:\n    {}",
                    state.join("\n    ")
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The invariants, after convergence.
    async fn check(&self, client: &Client) -> Result<(), String> {
        let mut failures: Vec<String> = Vec::new();
        {
            let seen = lock(&self.observed);
            if one_leader_per_term() {
                for (term, leaders) in &seen.leaders {
                    if leaders.len() > 1 {
                        failures.push(format!("term {term} had leaders {leaders:?}"));
                    }
                }
            }
            failures.extend(seen.trouble.iter().cloned());
        }
        failures.extend(lock(&self.net.trouble).iter().cloned());

        let mut snaps: Vec<(NodeId, StoreSnapshot)> = Vec::new();
        for n in &self.nodes {
            let snap = hold(n.store.export_snapshot())
                .await
                .map_err(|e| format!("export node {}: {e}", n.id))?;
            snaps.push((n.id, snap));
        }
        let applied: BTreeMap<NodeId, (u64, Option<u64>)> = self
            .nodes
            .iter()
            .zip(&snaps)
            .map(|(n, (_, s))| {
                let metrics = n.metrics().last_applied;
                (
                    n.id,
                    (s.raft.applied_index, metrics.map(|l| store_index(l.index))),
                )
            })
            .collect();
        let distinct: BTreeSet<&(u64, Option<u64>)> = applied.values().collect();
        if distinct.len() != 1 || applied.values().any(|(s, m)| Some(*s) != *m) {
            failures.push(format!(
                "applied indexes differ (node: (store, raft)): {applied:?}"
            ));
        }

        for (id, snap) in &snaps {
            let present: BTreeSet<u64> = snap
                .sandboxes
                .iter()
                .filter_map(|s| index_of(&s.id))
                .collect();
            let missing: Vec<&u64> = client.acked.difference(&present).collect();
            if !missing.is_empty() {
                failures.push(format!("node {id} lacks acknowledged writes {missing:?}"));
            }
            let phantom: Vec<&u64> = present.difference(&client.proposed).collect();
            if !phantom.is_empty() {
                failures.push(format!("node {id} has writes nobody proposed {phantom:?}"));
            }
            // Each write set the anchor's expiry: the last one applied must be
            // the highest-numbered write present (the client writes in order).
            let anchor = snap.sandboxes.iter().find(|s| s.id == ANCHOR);
            let want = present
                .last()
                .map(|&i| T0.plus_millis(EXPIRY_BASE_MS + i64::try_from(i).expect("small index")));
            match anchor {
                None => failures.push(format!("node {id} lost the anchor sandbox")),
                Some(a) if Some(a.expires_at) != want => failures.push(format!(
                    "node {id}: the anchor's expiry {:?} is not that of the last write \
                     present ({:?}): the log order broke the client's order",
                    a.expires_at,
                    present.last()
                )),
                Some(_) => {}
            }
        }

        if let Some(((first, reference), rest)) = snaps.split_first() {
            let reference = tables(reference.clone());
            for (id, snap) in rest {
                if tables(snap.clone()) != reference {
                    let ids = |s: &StoreSnapshot| {
                        s.sandboxes
                            .iter()
                            .map(|x| x.id.clone())
                            .collect::<BTreeSet<_>>()
                    };
                    let (mine, theirs) = (ids(snap), ids(&reference));
                    failures.push(format!(
                        "node {id}'s store differs from node {first}'s: sandboxes only on \
                         {id}: {:?}, only on {first}: {:?} (other tables may differ too)",
                        mine.difference(&theirs).collect::<Vec<_>>(),
                        theirs.difference(&mine).collect::<Vec<_>>()
                    ));
                }
            }
        }

        if failures.is_empty() {
            Ok(())
        } else {
            Err(failures.join("\n  "))
        }
    }

    fn stats(&self, client: &Client) -> SeedStats {
        let c = &self.net.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SeedStats {
            nodes: self.plan.nodes,
            sent: get(&c.sent),
            snapshot_chunks: get(&c.snapshot_chunks),
            dropped: get(&c.dropped),
            replies_lost: get(&c.replies_lost),
            delayed: get(&c.delayed),
            cut: get(&c.cut),
            partitions: get(&c.partitions),
            restarts: self.restarts.load(Ordering::Relaxed),
            shared_terms: lock(&self.observed)
                .leaders
                .values()
                .filter(|l| l.len() > 1)
                .count() as u64,
            proposed: client.proposed.len() as u64,
            acked: client.acked.len() as u64,
            virtual_ms: self.net.started.elapsed().as_millis() as u64,
        }
    }

    /// Stops every node (and drops their stores and directories).
    async fn shutdown(self) {
        lock(&self.net.rafts).clear();
        for n in &self.nodes {
            let _ = n.raft().shutdown().await;
        }
        for w in lock(&self.watchers).drain(..) {
            w.abort();
        }
        for n in &self.nodes {
            hold(n.store.close()).await;
        }
    }
}

/// One seed, start to finish; `Err` says what broke (with the seed's story).
async fn run_seed(seed: u64) -> Result<SeedStats, String> {
    let plan = Plan::new(seed);
    let sim = Sim::start(plan.clone())
        .await
        .map_err(|e| report(&plan, &e, &[]))?;
    let run = match tokio::time::timeout(SEED_LIMIT, sim.exercise()).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "did not finish within {SEED_LIMIT:?} of virtual time"
        )),
    };
    let checked = match run {
        Ok(client) => sim.check(&client).await.map(|()| sim.stats(&client)),
        Err(e) => Err(e),
    };
    let events = lock(&sim.net.events).clone();
    sim.shutdown().await;
    checked.map_err(|e| report(&plan, &e, &events))
}

/// A failure report: what broke, the plan, and the last events.
fn report(plan: &Plan, why: &str, events: &[String]) -> String {
    let tail = &events[events.len().saturating_sub(60)..];
    format!(
        "{why}\n\nplan: {}\n\nlast events (virtual time):\n  {}",
        plan.describe(),
        tail.join("\n  ")
    )
}

fn replay_hint(seed: u64) -> String {
    format!("replay: {SEED_ENV}={seed} cargo nextest run -p stacyvm-raft --test it sim")
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}")),
    )
}

/// Runs test `k`'s share of the seeds (or the replayed seed, if it is `k`'s).
async fn run_share(k: u64) {
    let seeds: Vec<u64> = match env_u64(SEED_ENV) {
        Some(s) if s % TESTS == k => vec![s],
        Some(_) => return,
        None => {
            let count = env_u64(SEEDS_ENV).unwrap_or(DEFAULT_SEEDS);
            (0..count).map(|j| j * TESTS + k).collect()
        }
    };
    let started = std::time::Instant::now();
    let mut total = SeedStats::default();
    let mut five = 0;
    for &seed in &seeds {
        // A panic in the seed (an `expect`) must still name the seed.
        let outcome = match tokio::spawn(run_seed(seed)).await {
            Ok(r) => r,
            Err(e) => Err(format!("panicked: {}", panic_text(e))),
        };
        match outcome {
            Ok(s) => {
                five += u64::from(s.nodes == 5);
                total.sent += s.sent;
                total.snapshot_chunks += s.snapshot_chunks;
                total.dropped += s.dropped;
                total.replies_lost += s.replies_lost;
                total.delayed += s.delayed;
                total.cut += s.cut;
                total.partitions += s.partitions;
                total.restarts += s.restarts;
                total.shared_terms += s.shared_terms;
                total.proposed += s.proposed;
                total.acked += s.acked;
                total.virtual_ms += s.virtual_ms;
            }
            Err(why) => panic!(
                "sim seed {seed} failed: {why}\n\nsim seed {seed} failed; {}",
                replay_hint(seed)
            ),
        }
    }
    let t = total;
    eprintln!(
        "sim[{k}]: {} seeds ({five} with 5 nodes) in {:.1?} ({:.0} s virtual): {} messages \
         ({} snapshot chunks), {} dropped, {} replies lost, {} delayed, {} cut, \
         {} partition changes, {} restarts; writes {} acknowledged of {} proposed; \
         {} terms had several leaders in turn",
        seeds.len(),
        started.elapsed(),
        t.virtual_ms as f64 / 1000.0,
        t.sent,
        t.snapshot_chunks,
        t.dropped,
        t.replies_lost,
        t.delayed,
        t.cut,
        t.partitions,
        t.restarts,
        t.acked,
        t.proposed,
        t.shared_terms,
    );
}

fn panic_text(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "non-string panic".into()),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(start_paused = true)]
async fn seeds_0() {
    run_share(0).await;
}

#[tokio::test(start_paused = true)]
async fn seeds_1() {
    run_share(1).await;
}

#[tokio::test(start_paused = true)]
async fn seeds_2() {
    run_share(2).await;
}

#[tokio::test(start_paused = true)]
async fn seeds_3() {
    run_share(3).await;
}

/// The plan and every message's fate are functions of the seed alone.
#[test]
fn the_schedule_is_a_function_of_the_seed() {
    let describe = |seed| format!("{:?}", Plan::new(seed));
    assert_eq!(describe(7), describe(7));
    assert_ne!(describe(7), describe(8));
    let f = Faults {
        drop: 300,
        delay: 500,
        max_delay_ms: 200,
    };
    let fates = |seed| {
        (0..64)
            .map(|n| format!("{:?}", fate(seed, 1, 2, n, f)))
            .collect::<Vec<_>>()
    };
    assert_eq!(fates(7), fates(7));
    assert_ne!(fates(7), fates(8));
    // Both cluster sizes occur among the default seeds.
    let sizes: BTreeSet<u64> = (0..DEFAULT_SEEDS * TESTS)
        .map(|s| Plan::new(s).nodes)
        .collect();
    assert_eq!(sizes, BTreeSet::from([3, 5]));
}
