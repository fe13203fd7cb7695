//! The sandbox control service: what the leader decides and what any replica
//! serves.
//!
//! Owns, on the leader only: admission (global, per-owner and TTL limits, with
//! an optional queue), placement, spawn and destroy with their leases, worker
//! heartbeats (registration, liveness, one batched lease renewal per beat),
//! declaring silent workers offline, the expiry reaper and reconciliation.
//! Leader memory (heartbeat times, sandbox counts, in-flight spawns) is rebuilt
//! from the store at each election; every decision that must survive is a
//! Raft write. Owns, on every replica: routing a data-path call (exec, files,
//! logs) to the sandbox's owner with the sandbox's lease generation.
//!
//! Does not own: HTTP (the `api` module maps [`ControlError`] once), lease
//! arithmetic (`stacyvm_raft::leases`), or the pure rules in the submodules
//! ([`liveness`], [`placement`], [`admission`], [`reconcile`]).

pub mod admission;
pub mod liveness;
pub mod placement;
pub mod reconcile;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use stacyvm_api::{self as wire, HeartbeatReply, HeartbeatRequest, RpcSandbox, RpcSpawn};
use stacyvm_raft::leases::HeldLease as RaftHeld;
use stacyvm_raft::replica::Replica;
use stacyvm_raft::rpc::{LeaseError, WriteError};
use stacyvm_store::{
    Mutation, Sandbox, SandboxFilter, SandboxState, Store, StoreError, Ts, Worker, WorkerStatus,
};
use tokio::sync::Notify;

use crate::worker_rpc::{Target, WorkerCallError, WorkerRpc};
use admission::{Limits, Usage};
use liveness::{Health, LivenessTiming};
use placement::Candidate;

/// Lease resource type of a sandbox.
pub const SANDBOX_LEASE: &str = "sandbox";

/// Knobs of the control service (`stacyvm serve` flags).
#[derive(Clone, Debug)]
pub struct ControlConfig {
    pub heartbeat: Duration,
    pub lease_ttl: Duration,
    pub offline_grace: Duration,
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    /// 0 = unlimited.
    pub max_sandboxes: i64,
    /// 0 = unlimited.
    pub max_per_owner: i64,
    pub default_exec_timeout: Option<Duration>,
    pub max_exec_timeout: Duration,
    /// Zero: refuse at once when full; otherwise wait up to this long.
    pub spawn_queue_timeout: Duration,
    pub max_spawn_queue: usize,
    pub spawn_timeout: Duration,
    pub reconcile_interval: Duration,
    pub reaper_interval: Duration,
    pub default_runtime: String,
    pub default_memory_mb: i64,
    pub default_vcpus: i64,
    /// Mutual TLS for worker RPC (workers with `https://` RPC URLs).
    pub rpc_tls: Option<Arc<crate::rpc_tls::RpcTlsClient>>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            heartbeat: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(10),
            offline_grace: Duration::from_secs(5),
            default_ttl: Duration::from_secs(30 * 60),
            max_ttl: Duration::from_secs(24 * 3600),
            max_sandboxes: 0,
            max_per_owner: 0,
            default_exec_timeout: None,
            max_exec_timeout: Duration::from_secs(600),
            spawn_queue_timeout: Duration::ZERO,
            max_spawn_queue: 1000,
            spawn_timeout: Duration::from_secs(120),
            reconcile_interval: Duration::from_secs(10),
            reaper_interval: Duration::from_secs(1),
            default_runtime: "mock".into(),
            default_memory_mb: 512,
            default_vcpus: 1,
            rpc_tls: None,
        }
    }
}

impl ControlConfig {
    pub fn timing(&self) -> LivenessTiming {
        LivenessTiming {
            heartbeat: self.heartbeat,
            lease_ttl: self.lease_ttl,
            grace: self.offline_grace,
        }
    }

    fn lease_ttl_ms(&self) -> i64 {
        i64::try_from(self.lease_ttl.as_millis()).unwrap_or(i64::MAX)
    }
}

/// Why a control operation failed; mapped to HTTP once, in `api`.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    NotRunning(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    ResourceLimit(String),
    #[error("{0}")]
    UnknownRuntime(String),
    #[error("{0}")]
    NoEligibleWorker(String),
    #[error("this replica is not the leader")]
    NotLeader,
    #[error(transparent)]
    Worker(#[from] WorkerCallError),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<LeaseError> for ControlError {
    fn from(e: LeaseError) -> Self {
        match e {
            LeaseError::Store(s) => s.into(),
            LeaseError::Write(w) => w.into(),
        }
    }
}

/// Whether a sandbox in `state` occupies a slot (counts against limits and
/// its worker's capacity).
pub fn occupies(state: SandboxState) -> bool {
    !matches!(
        state,
        SandboxState::Destroyed | SandboxState::Lost | SandboxState::Expired
    )
}

/// Where a data-path call goes.
#[derive(Clone, Debug)]
pub struct Route {
    pub sandbox: Sandbox,
    pub target: Target,
}

#[derive(Debug, Default)]
struct Counts {
    total: i64,
    by_owner: HashMap<String, i64>,
    by_worker: HashMap<String, i64>,
}

impl Counts {
    fn add(&mut self, owner: &str, worker: &str, d: i64) {
        self.total += d;
        if !owner.is_empty() {
            *self.by_owner.entry(owner.to_string()).or_default() += d;
        }
        if !worker.is_empty() {
            *self.by_worker.entry(worker.to_string()).or_default() += d;
        }
    }
}

/// Leader memory for one term.
#[derive(Debug)]
struct LeaderState {
    term: u64,
    elected_at: Instant,
    last_seen: HashMap<String, Instant>,
    workers: BTreeMap<String, Worker>,
    counts: Counts,
    inflight: i64,
    reconciled_once: bool,
}

/// Removes a sandbox from the replica's `spawning` set when its spawn ends,
/// however it ends (including a dropped request future).
struct SpawningGuard<'a> {
    control: &'a Control,
    id: String,
}

impl Drop for SpawningGuard<'_> {
    fn drop(&mut self) {
        self.control
            .spawning
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// A failed spawn: the error for the client, and whether the sandbox's
/// record and lease are known closed (nothing written, or the destroy
/// recorded) or may be left for reconciliation.
struct SpawnFailed {
    error: ControlError,
    closed: bool,
}

impl SpawnFailed {
    fn new(error: ControlError, closed: bool) -> Self {
        SpawnFailed { error, closed }
    }

    fn closed(error: ControlError) -> Self {
        SpawnFailed::new(error, true)
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    pub spawns_ok: AtomicU64,
    pub spawns_failed: AtomicU64,
    pub spawns_refused: AtomicU64,
    pub destroys: AtomicU64,
    pub execs: AtomicU64,
    pub workers_declared_offline: AtomicU64,
    pub sandboxes_marked_lost: AtomicU64,
    pub reaped: AtomicU64,
    pub spawn_queued: AtomicU64,
    pub spawn_queue_timeouts: AtomicU64,
}

/// The control service of one replica.
#[derive(Debug)]
pub struct Control {
    replica: Arc<Replica>,
    auth: Arc<crate::config::AuthSources>,
    pub cfg: ControlConfig,
    pub rpc: WorkerRpc,
    leader: std::sync::Mutex<Option<LeaderState>>,
    /// Sandboxes whose spawn this replica is running, whatever the term
    /// (reconciliation leaves their `creating` records alone).
    spawning: std::sync::Mutex<std::collections::HashSet<String>>,
    init: tokio::sync::Mutex<()>,
    capacity: Notify,
    queued: std::sync::atomic::AtomicUsize,
    pub counters: Counters,
}

fn lock(
    m: &std::sync::Mutex<Option<LeaderState>>,
) -> std::sync::MutexGuard<'_, Option<LeaderState>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_ts() -> Ts {
    Ts::now()
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A new sandbox ID: `sb-` + 12 hex digits.
pub fn new_sandbox_id() -> String {
    format!("sb-{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

/// What a spawn asks for, after validation and defaults.
#[derive(Clone, Debug)]
pub struct SpawnPlan {
    pub image: String,
    pub runtime: String,
    pub memory_mb: i64,
    pub vcpus: i64,
    pub ttl: Duration,
    pub env: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    pub owner_id: String,
    pub tenant_id: String,
    pub setup: Vec<String>,
}

impl Control {
    pub fn new(
        replica: Arc<Replica>,
        cfg: ControlConfig,
        auth: Arc<crate::config::AuthSources>,
    ) -> Result<Arc<Self>, reqwest::Error> {
        let rpc = WorkerRpc::with_tls(cfg.rpc_tls.clone())?;
        Ok(Arc::new(Control {
            replica,
            auth,
            cfg,
            rpc,
            leader: std::sync::Mutex::new(None),
            spawning: Default::default(),
            init: tokio::sync::Mutex::new(()),
            capacity: Notify::new(),
            queued: std::sync::atomic::AtomicUsize::new(0),
            counters: Counters::default(),
        }))
    }

    pub fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }

    /// Where and how to call a worker: a signed RPC token bound to that
    /// worker (when a signing key is configured) and the worker's static
    /// token (per-worker, else shared) when one exists; the worker accepts
    /// either.
    pub fn target(
        &self,
        worker_id: &str,
        rpc_url: &str,
        generation: i64,
        request_id: &str,
    ) -> Target {
        let (signed, static_token) = match self.auth.worker_auth() {
            Ok(wa) => {
                let now = Ts::now().micros() / 1_000_000;
                let st = wa
                    .worker_tokens
                    .get(worker_id)
                    .or(wa.shared_token.as_ref())
                    .map(|t| t.expose().to_string());
                (wa.mint_rpc(worker_id, now), st)
            }
            Err(e) => {
                tracing::error!(error = %e, "worker credentials unusable; calling without");
                (None, None)
            }
        };
        Target {
            worker_id: worker_id.to_string(),
            rpc_url: rpc_url.to_string(),
            generation,
            request_id: request_id.to_string(),
            signed_token: signed,
            static_token,
        }
    }

    fn store(&self) -> &Arc<dyn Store> {
        self.replica.store()
    }

    fn term(&self) -> u64 {
        self.replica.raft().metrics().borrow().current_term
    }

    /// Makes sure this replica leads and its leader memory is for this term.
    pub async fn ensure_leader(&self) -> Result<(), ControlError> {
        if !self.replica.is_leader() {
            return Err(ControlError::NotLeader);
        }
        let term = self.term();
        if lock(&self.leader).as_ref().is_some_and(|s| s.term == term) {
            return Ok(());
        }
        let _g = self.init.lock().await;
        if lock(&self.leader).as_ref().is_some_and(|s| s.term == term) {
            return Ok(());
        }
        // Everything earlier leaders committed is applied here first.
        self.replica.read_barrier().await?;
        let workers = self
            .store()
            .list_workers()
            .await?
            .into_iter()
            .map(|w| (w.id.clone(), w))
            .collect();
        let counts = self.count_from_store().await?;
        tracing::info!(term, "leading: sandbox control active");
        *lock(&self.leader) = Some(LeaderState {
            term,
            elected_at: Instant::now(),
            last_seen: HashMap::new(),
            workers,
            counts,
            inflight: 0,
            reconciled_once: false,
        });
        Ok(())
    }

    /// Every non-destroyed sandbox matching `filter`, however many: the
    /// store pages at most 1,000 rows at a time. Rows that shift between pages
    /// may be seen twice (de-duplicated) or, when destroyed meanwhile, missed;
    /// callers never act on absence alone.
    async fn all_sandboxes(&self, filter: SandboxFilter) -> Result<Vec<Sandbox>, StoreError> {
        const PAGE: i64 = 1000;
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        let mut offset = 0;
        loop {
            let page = self
                .store()
                .list_sandboxes(&SandboxFilter {
                    limit: Some(PAGE),
                    offset: Some(offset),
                    ..filter.clone()
                })
                .await?;
            let n = i64::try_from(page.len()).unwrap_or(0);
            for s in page {
                if seen.insert(s.id.clone()) {
                    out.push(s);
                }
            }
            if n < PAGE {
                return Ok(out);
            }
            offset += PAGE;
        }
    }

    async fn count_from_store(&self) -> Result<Counts, StoreError> {
        let mut counts = Counts::default();
        for s in self
            .all_sandboxes(SandboxFilter::default())
            .await?
            .iter()
            .filter(|s| occupies(s.state))
        {
            counts.add(&s.owner_id, &s.worker_id, 1);
        }
        Ok(counts)
    }

    /// Runs `f` on the leader memory, only while this replica leads the term
    /// that memory was built for. openraft 0.9 lets a higher node ID win a
    /// term another node led (leader IDs are `(term, node)`), so the term
    /// alone does not show that this replica still leads; a node never leads
    /// the same term twice, so `(term, leading now)` does.
    fn with_leader<T>(&self, f: impl FnOnce(&mut LeaderState) -> T) -> Result<T, ControlError> {
        if !self.replica.is_leader() {
            return Err(ControlError::NotLeader);
        }
        let term = self.term();
        let mut g = lock(&self.leader);
        match g.as_mut() {
            Some(s) if s.term == term => Ok(f(s)),
            _ => Err(ControlError::NotLeader),
        }
    }

    /// Drops leader memory (called when leadership is lost).
    pub fn step_down(&self) {
        if lock(&self.leader).take().is_some() {
            tracing::info!("no longer leading: sandbox control paused");
        }
    }

    // ------------------------------------------------------------ spawn

    /// Validates a spawn request and fills defaults (any replica).
    pub async fn plan_spawn(&self, req: &wire::SpawnRequest) -> Result<SpawnPlan, ControlError> {
        let bad = |m: String| ControlError::BadRequest(m);
        let mut plan = SpawnPlan {
            image: req.image.clone(),
            runtime: req.runtime.clone(),
            memory_mb: req.memory_mb.unwrap_or(0),
            vcpus: req.vcpus.unwrap_or(0),
            ttl: Duration::ZERO,
            env: BTreeMap::new(),
            metadata: req.metadata.clone(),
            owner_id: req.owner_id.clone(),
            tenant_id: req.tenant_id.clone(),
            setup: Vec::new(),
        };
        let mut template_ttl = None;
        if !req.template.is_empty() {
            wire::check_name("template", &req.template).map_err(|e| bad(e.0))?;
            let t = match self.store().get_template(&req.template).await {
                Ok(t) => t,
                Err(StoreError::NotFound { .. }) => {
                    return Err(ControlError::NotFound(format!(
                        "template {:?} not found",
                        req.template
                    )));
                }
                Err(e) => return Err(e.into()),
            };
            if plan.image.is_empty() {
                plan.image = t.image.clone();
            }
            if plan.runtime.is_empty() {
                plan.runtime = t.runtime.clone();
            }
            if plan.memory_mb == 0 {
                plan.memory_mb = t.memory_mb;
            }
            if plan.vcpus == 0 {
                plan.vcpus = t.vcpus;
            }
            if t.ttl_seconds > 0 {
                template_ttl = Some(Duration::from_secs(
                    u64::try_from(t.ttl_seconds).unwrap_or(0),
                ));
            }
            plan.env = t.env.clone();
            plan.setup = t.setup.clone();
            plan.metadata.insert("template".into(), t.name.clone());
        }
        plan.env.extend(req.env.clone());
        if plan.image.is_empty() {
            return Err(bad("image is required".into()));
        }
        if plan.image.len() > 512
            || plan
                .image
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(bad(format!(
                "image {:?} is not a valid image reference",
                plan.image
            )));
        }
        if plan.runtime.is_empty() {
            plan.runtime = self.cfg.default_runtime.clone();
        }
        wire::check_name("runtime", &plan.runtime).map_err(|e| bad(e.0))?;
        if plan.memory_mb == 0 {
            plan.memory_mb = self.cfg.default_memory_mb;
        }
        if plan.vcpus == 0 {
            plan.vcpus = self.cfg.default_vcpus;
        }
        if !(16..=1_048_576).contains(&plan.memory_mb) {
            return Err(bad(format!(
                "memory_mb {} is outside 16..=1048576",
                plan.memory_mb
            )));
        }
        if !(1..=256).contains(&plan.vcpus) {
            return Err(bad(format!("vcpus {} is outside 1..=256", plan.vcpus)));
        }
        plan.ttl = match &req.ttl {
            Some(t) => t.parse().map_err(|e| bad(format!("ttl: {e}")))?,
            None => template_ttl.unwrap_or(self.cfg.default_ttl),
        };
        if plan.ttl < Duration::from_secs(1) {
            return Err(bad("ttl must be at least 1s".into()));
        }
        if !plan.owner_id.is_empty() {
            wire::check_name("owner_id", &plan.owner_id).map_err(|e| bad(e.0))?;
        }
        if !plan.tenant_id.is_empty() {
            wire::check_name("tenant_id", &plan.tenant_id).map_err(|e| bad(e.0))?;
        }
        if !matches!(req.network_mode.as_str(), "" | "none") {
            return Err(bad(format!(
                "network_mode {:?} is not allowed; sandboxes run with network \"none\"",
                req.network_mode
            )));
        }
        check_env(&plan.env).map_err(bad)?;
        if plan.metadata.len() > 64
            || plan
                .metadata
                .iter()
                .any(|(k, v)| k.is_empty() || k.len() > 128 || v.len() > 1024)
        {
            return Err(bad(
                "metadata: at most 64 entries, keys 1-128 bytes, values up to 1024 bytes".into(),
            ));
        }
        Ok(plan)
    }

    async fn limits_for(&self, owner: &str) -> Result<Limits, ControlError> {
        let mut l = Limits {
            max_sandboxes: self.cfg.max_sandboxes,
            max_per_owner: self.cfg.max_per_owner,
            max_ttl: Some(self.cfg.max_ttl),
        };
        if !owner.is_empty() {
            match self.store().get_quota(owner).await {
                Ok(q) => {
                    if q.max_sandboxes > 0 {
                        l.max_per_owner = q.max_sandboxes;
                    }
                    if q.max_ttl_seconds > 0 {
                        l.max_ttl = Some(Duration::from_secs(
                            u64::try_from(q.max_ttl_seconds).unwrap_or(0),
                        ));
                    }
                }
                Err(StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(l)
    }

    /// Admission and placement; reserves a slot on success and returns the
    /// worker and the term the reservation belongs to.
    fn admit_and_place(
        &self,
        plan: &SpawnPlan,
        limits: &Limits,
    ) -> Result<Result<(String, u64), ControlError>, admission::AdmissionError> {
        let now = Instant::now();
        let timing = self.cfg.timing();
        let r = self.with_leader(|s| {
            let usage = Usage {
                total: s.counts.total,
                owner: s.counts.by_owner.get(&plan.owner_id).copied().unwrap_or(0),
            };
            admission::admit(plan.ttl, !plan.owner_id.is_empty(), usage, limits)?;
            let candidates: Vec<Candidate> = s
                .workers
                .values()
                .map(|w| Candidate {
                    id: w.id.clone(),
                    health: liveness::judge(
                        w.status,
                        s.last_seen.get(&w.id).copied(),
                        s.elected_at,
                        now,
                        &timing,
                    ),
                    runtimes: w.runtimes.clone(),
                    max_sandboxes: w.capacity.get("max_sandboxes").copied().unwrap_or(0),
                    active: s.counts.by_worker.get(&w.id).copied().unwrap_or(0),
                })
                .collect();
            Ok(match placement::place(&candidates, &plan.runtime) {
                Ok(worker) => {
                    s.counts.add(&plan.owner_id, &worker, 1);
                    s.inflight += 1;
                    Ok((worker, s.term))
                }
                Err(placement::PlacementError::UnknownRuntime(r)) => {
                    Err(ControlError::UnknownRuntime(format!(
                        "no worker in the cluster offers runtime {r:?}"
                    )))
                }
                Err(e @ placement::PlacementError::NoEligibleWorker { .. }) => {
                    Err(ControlError::NoEligibleWorker(e.to_string()))
                }
            })
        });
        match r {
            Ok(inner) => inner,
            Err(e) => Ok(Err(e)),
        }
    }

    /// Frees the slot of a sandbox that no longer occupies one.
    fn release_slot(&self, owner: &str, worker: &str) {
        let _ = self.with_leader(|s| s.counts.add(owner, worker, -1));
        self.capacity.notify_waiters();
    }

    /// Ends a spawn's reservation made in `term`: `release` also frees its
    /// slot (nothing of it is on record). Leader memory of a later term was
    /// rebuilt from the store and never counted it: left alone.
    fn end_reservation(&self, owner: &str, worker: &str, term: u64, release: bool) {
        let _ = self.with_leader(|s| {
            if s.term != term {
                return;
            }
            s.inflight -= 1;
            if release {
                s.counts.add(owner, worker, -1);
            }
        });
        if release {
            self.capacity.notify_waiters();
        }
    }

    /// Spawns on the leader: admission, placement, lease + record in one Raft
    /// entry, the worker RPC, then the running record. A failed spawn leaves no
    /// lease and no live record.
    /// Returns the record and its lease generation.
    pub async fn spawn(
        &self,
        plan: SpawnPlan,
        request_id: &str,
    ) -> Result<(Sandbox, i64), ControlError> {
        self.ensure_leader().await?;
        let limits = self.limits_for(&plan.owner_id).await?;
        let deadline = Instant::now() + self.cfg.spawn_queue_timeout;
        let mut queued = false;
        let (worker_id, term) = loop {
            let notified = self.capacity.notified();
            match self.admit_and_place(&plan, &limits) {
                Ok(Ok(w)) => break w,
                Ok(Err(e)) => {
                    self.counters.spawns_refused.fetch_add(1, Ordering::Relaxed);
                    return Err(e);
                }
                Err(e) if e.queueable() && !self.cfg.spawn_queue_timeout.is_zero() => {
                    if !queued {
                        if self.queued.fetch_add(1, Ordering::SeqCst) >= self.cfg.max_spawn_queue {
                            self.queued.fetch_sub(1, Ordering::SeqCst);
                            return Err(ControlError::ResourceLimit(format!(
                                "{e}; the spawn queue is full"
                            )));
                        }
                        self.counters.spawn_queued.fetch_add(1, Ordering::Relaxed);
                        queued = true;
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() || tokio::time::timeout(left, notified).await.is_err() {
                        self.queued.fetch_sub(1, Ordering::SeqCst);
                        self.counters
                            .spawn_queue_timeouts
                            .fetch_add(1, Ordering::Relaxed);
                        return Err(ControlError::ResourceLimit(format!(
                            "{e}; still full after waiting {:?} in the spawn queue",
                            self.cfg.spawn_queue_timeout
                        )));
                    }
                }
                Err(e) => {
                    self.counters.spawns_refused.fetch_add(1, Ordering::Relaxed);
                    return Err(
                        if matches!(e, admission::AdmissionError::TtlOverMax { .. }) {
                            ControlError::BadRequest(e.to_string())
                        } else {
                            ControlError::ResourceLimit(e.to_string())
                        },
                    );
                }
            }
        };
        if queued {
            self.queued.fetch_sub(1, Ordering::SeqCst);
        }
        match self.spawn_on(&plan, &worker_id, request_id).await {
            Ok(r) => {
                self.end_reservation(&plan.owner_id, &worker_id, term, false);
                self.counters.spawns_ok.fetch_add(1, Ordering::Relaxed);
                Ok(r)
            }
            Err(f) => {
                // A record left open still occupies its slot; reconciliation
                // closes it and frees the slot then.
                self.end_reservation(&plan.owner_id, &worker_id, term, f.closed);
                self.counters.spawns_failed.fetch_add(1, Ordering::Relaxed);
                Err(f.error)
            }
        }
    }

    async fn spawn_on(
        &self,
        plan: &SpawnPlan,
        worker_id: &str,
        request_id: &str,
    ) -> Result<(Sandbox, i64), SpawnFailed> {
        let worker = self
            .with_leader(|s| s.workers.get(worker_id).cloned())
            .map_err(SpawnFailed::closed)?
            .ok_or_else(|| ControlError::NoEligibleWorker(format!("worker {worker_id} vanished")))
            .map_err(SpawnFailed::closed)?;
        let now = now_ts();
        let id = new_sandbox_id();
        self.spawning
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone());
        let _spawning = SpawningGuard {
            control: self,
            id: id.clone(),
        };
        let record = Sandbox {
            id: id.clone(),
            state: SandboxState::Creating,
            runtime: plan.runtime.clone(),
            image: plan.image.clone(),
            memory_mb: plan.memory_mb,
            vcpus: plan.vcpus,
            owner_id: plan.owner_id.clone(),
            tenant_id: plan.tenant_id.clone(),
            worker_id: worker_id.to_string(),
            runtime_id: String::new(),
            metadata: plan.metadata.clone(),
            created_at: now,
            updated_at: now,
            expires_at: now.plus_millis(ms(plan.ttl)),
        };
        let (lease, extra) = self
            .replica
            .acquire_lease_with(
                &id,
                SANDBOX_LEASE,
                worker_id,
                self.cfg.lease_ttl_ms(),
                vec![Mutation::CreateSandbox(record.clone())],
            )
            .await
            .map_err(|e| SpawnFailed::closed(e.into()))?;
        if let Some(Err(e)) = extra.into_iter().next() {
            let closed = self.revoke_and_destroy_or_log(&id, true).await;
            return Err(SpawnFailed::new(e.into(), closed));
        }
        let target = self.target(worker_id, &worker.rpc_url, lease.generation, request_id);
        let req = RpcSpawn {
            sandbox_id: id.clone(),
            image: plan.image.clone(),
            runtime: plan.runtime.clone(),
            memory_mb: plan.memory_mb,
            vcpus: plan.vcpus,
            env: plan.env.clone(),
            metadata: plan.metadata.clone(),
            generation: lease.generation,
            lease_ttl_ms: self.cfg.lease_ttl_ms(),
        };
        let started = match self.rpc.spawn(&target, &req, self.cfg.spawn_timeout).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(sandbox = %id, worker = worker_id, error = %e, "spawn failed on the worker; lease released");
                // If the worker did start it after all, its next heartbeat
                // learns the lease is gone and it stops the sandbox.
                if !matches!(e, WorkerCallError::Refused { .. }) {
                    let _ = self.rpc.destroy(&target, &id).await;
                }
                let closed = self.revoke_and_destroy_or_log(&id, true).await;
                return Err(SpawnFailed::new(e.into(), closed));
            }
        };
        for (i, cmd) in plan.setup.iter().enumerate() {
            let exec = wire::ExecRequest {
                command: cmd.clone(),
                ..Default::default()
            };
            let res = self
                .rpc
                .exec(&target, &id, &exec, Some(self.cfg.max_exec_timeout))
                .await;
            let failed = match &res {
                Ok(r) if r.exit_code == 0 => None,
                Ok(r) => Some(format!(
                    "exit code {}: {}",
                    r.exit_code,
                    r.stderr.chars().take(500).collect::<String>()
                )),
                Err(e) => Some(e.to_string()),
            };
            if let Some(why) = failed {
                let _ = self.rpc.destroy(&target, &id).await;
                let closed = self.revoke_and_destroy_or_log(&id, true).await;
                return Err(SpawnFailed::new(
                    ControlError::BadRequest(format!(
                        "template setup step {} ({cmd:?}) failed: {why}",
                        i + 1
                    )),
                    closed,
                ));
            }
        }
        let at = now_ts();
        let muts = vec![
            Mutation::SetSandboxPlacement {
                id: id.clone(),
                worker_id: worker_id.to_string(),
                runtime_id: started.runtime_id.clone(),
                at,
            },
            Mutation::SetSandboxState {
                id: id.clone(),
                state: SandboxState::Running,
                at,
            },
        ];
        let failed: Option<ControlError> = match self.replica.write_revoking(&[], muts).await {
            Ok(out) => out.into_iter().find_map(|r| r.err()).map(Into::into),
            Err(e) => Some(e.into()),
        };
        if let Some(e) = failed {
            // Not acknowledged, so not kept: stop it and close the record
            // (a deposed leader cannot; reconciliation then does).
            tracing::warn!(sandbox = %id, error = %e, "could not record the running sandbox; undoing the spawn");
            let _ = self.rpc.destroy(&target, &id).await;
            let closed = self.revoke_and_destroy_or_log(&id, true).await;
            return Err(SpawnFailed::new(e, closed));
        }
        let mut s = record;
        s.state = SandboxState::Running;
        s.runtime_id = started.runtime_id;
        s.updated_at = at;
        Ok((s, lease.generation))
    }

    /// Revokes a sandbox's lease and marks it destroyed, in one entry.
    /// Errors are logged: the reconciler closes whatever is left.
    /// Records a destroy (and revokes the lease). Spawn clean-up ignores a
    /// failure (`revoke_and_destroy_or_log`: the reconciler closes what it
    /// leaves); a user's destroy must not be acknowledged without it.
    async fn revoke_and_destroy(&self, id: &str, has_lease: bool) -> Result<(), WriteError> {
        let mut m = Vec::new();
        if has_lease {
            m.push(Mutation::RevokeLease {
                resource_id: id.to_string(),
            });
        }
        m.push(Mutation::DestroySandbox {
            id: id.to_string(),
            at: now_ts(),
        });
        self.replica
            .write_revoking(&[id.to_string()], m)
            .await
            .map(|_| ())
    }

    /// Whether the destroy is on record.
    async fn revoke_and_destroy_or_log(&self, id: &str, has_lease: bool) -> bool {
        match self.revoke_and_destroy(id, has_lease).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(sandbox = id, error = %e, "could not record the destroy; the reconciler will retry");
                false
            }
        }
    }

    // ------------------------------------------------------------ destroy, extend

    /// Destroys a sandbox (leader). Succeeds whatever its worker's state: the
    /// lease is revoked, so a worker that still runs it stops it once it
    /// learns (next heartbeat) or fences itself if it cannot learn.
    pub async fn destroy(&self, id: &str, request_id: &str) -> Result<(), ControlError> {
        wire::check_sandbox_id(id).map_err(|e| ControlError::BadRequest(e.0))?;
        self.ensure_leader().await?;
        let sb = self.store().get_sandbox(id).await.map_err(not_found(id))?;
        if sb.state == SandboxState::Destroyed {
            return Err(ControlError::NotFound(format!("sandbox {id} is destroyed")));
        }
        let lease = match self.store().get_lease(id).await {
            Ok(l) => Some(l),
            Err(StoreError::NotFound { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        if let Some(l) = &lease {
            let worker = self.with_leader(|s| s.workers.get(&l.holder_id).cloned())?;
            if let Some(w) = worker.filter(|w| w.status != WorkerStatus::Offline) {
                let t = self.target(&w.id, &w.rpc_url, l.generation, request_id);
                match self.rpc.destroy(&t, id).await {
                    Ok(()) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => {
                        tracing::warn!(sandbox = id, error = %e, "worker did not confirm the destroy; lease revoked, it stops the sandbox when it learns")
                    }
                }
            }
        }
        // The worker may already have stopped it; the destroy is
        // acknowledged only once it is on record (a client retries a
        // failure, and the worker then answers NotFound).
        self.revoke_and_destroy(id, lease.is_some()).await?;
        if occupies(sb.state) {
            self.release_slot(&sb.owner_id, &sb.worker_id);
        }
        self.counters.destroys.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Moves a sandbox's expiry to now + `ttl` (bounded by the max TTL and the
    /// owner's quota).
    pub async fn extend(&self, id: &str, ttl: Duration) -> Result<Sandbox, ControlError> {
        wire::check_sandbox_id(id).map_err(|e| ControlError::BadRequest(e.0))?;
        self.ensure_leader().await?;
        let mut sb = self.store().get_sandbox(id).await.map_err(not_found(id))?;
        if !occupies(sb.state) {
            return Err(ControlError::NotFound(format!(
                "sandbox {id} is {}",
                sb.state
            )));
        }
        let limits = self.limits_for(&sb.owner_id).await?;
        if let Some(max) = limits.max_ttl
            && ttl > max
        {
            return Err(ControlError::BadRequest(format!(
                "ttl {ttl:?} is over the maximum {max:?}"
            )));
        }
        let now = now_ts();
        let expires_at = now.plus_millis(ms(ttl));
        let out = self
            .replica
            .write_revoking(
                &[],
                vec![Mutation::SetSandboxExpiry {
                    id: id.to_string(),
                    expires_at,
                    at: now,
                }],
            )
            .await?;
        if let Some(Err(e)) = out.into_iter().next() {
            return Err(e.into());
        }
        sb.expires_at = expires_at;
        sb.updated_at = now;
        Ok(sb)
    }

    // ------------------------------------------------------------ data path

    /// Finds a running sandbox's owner (any replica; linearizable read).
    pub async fn route(&self, id: &str, request_id: &str) -> Result<Route, ControlError> {
        wire::check_sandbox_id(id).map_err(|e| ControlError::BadRequest(e.0))?;
        self.replica.read_barrier().await?;
        let sb = self.store().get_sandbox(id).await.map_err(not_found(id))?;
        match sb.state {
            SandboxState::Destroyed => {
                return Err(ControlError::NotFound(format!("sandbox {id} is destroyed")));
            }
            SandboxState::Running
            | SandboxState::Idle
            | SandboxState::Unhealthy
            | SandboxState::Error => {}
            other => return Err(ControlError::NotRunning(format!("sandbox {id} is {other}"))),
        }
        let lease = match self.store().get_lease(id).await {
            Ok(l) if l.holder_id == sb.worker_id => l,
            Ok(_) | Err(StoreError::NotFound { .. }) => {
                return Err(ControlError::NotRunning(format!(
                    "sandbox {id} has no owner right now"
                )));
            }
            Err(e) => return Err(e.into()),
        };
        let worker = self
            .store()
            .get_worker(&sb.worker_id)
            .await
            .map_err(|e| match e {
                StoreError::NotFound { .. } => {
                    ControlError::NotRunning(format!("sandbox {id}: its worker is gone"))
                }
                e => e.into(),
            })?;
        Ok(Route {
            target: self.target(&worker.id, &worker.rpc_url, lease.generation, request_id),
            sandbox: sb,
        })
    }

    /// Effective exec timeout for a request (bounded by quota or config).
    pub async fn exec_timeout(
        &self,
        owner: &str,
        asked: Option<Duration>,
    ) -> Result<Option<Duration>, ControlError> {
        let mut max = self.cfg.max_exec_timeout;
        if !owner.is_empty()
            && let Ok(q) = self.store().get_quota(owner).await
            && q.max_exec_timeout_seconds > 0
        {
            max = Duration::from_secs(u64::try_from(q.max_exec_timeout_seconds).unwrap_or(0));
        }
        let t = asked.or(self.cfg.default_exec_timeout);
        if let Some(t) = t
            && (t > max || t.is_zero())
        {
            return Err(ControlError::BadRequest(format!(
                "exec timeout {t:?} must be between 1ms and {max:?}"
            )));
        }
        Ok(Some(t.unwrap_or(max)))
    }

    // ------------------------------------------------------------ workers

    /// A worker's heartbeat (leader): registration when something changed,
    /// liveness, and one renewal of every lease it claims.
    pub async fn heartbeat(
        &self,
        worker_id: &str,
        req: HeartbeatRequest,
    ) -> Result<HeartbeatReply, ControlError> {
        wire::check_name("worker id", worker_id).map_err(|e| ControlError::BadRequest(e.0))?;
        check_heartbeat(&req).map_err(ControlError::BadRequest)?;
        self.ensure_leader().await?;
        let now = Instant::now();
        let recorded = self.with_leader(|s| {
            s.last_seen.insert(worker_id.to_string(), now);
            s.workers.get(worker_id).cloned()
        })?;
        let status =
            liveness::status_after_heartbeat(recorded.as_ref().map(|w| w.status), &req.status);
        let changed = recorded.as_ref().is_none_or(|w| {
            w.status != status
                || w.hostname != req.hostname
                || w.rpc_url != req.rpc_url
                || w.runtimes != req.runtimes
                || w.capabilities != req.capabilities
                || w.capacity != req.capacity
        });
        let mut worker = recorded.clone().unwrap_or_else(|| Worker {
            id: worker_id.to_string(),
            hostname: String::new(),
            status,
            rpc_url: String::new(),
            runtimes: Vec::new(),
            capabilities: Vec::new(),
            capacity: BTreeMap::new(),
            last_heartbeat: now_ts(),
            created_at: now_ts(),
            updated_at: now_ts(),
        });
        if changed {
            let at = now_ts();
            worker.hostname = req.hostname.clone();
            worker.status = status;
            worker.rpc_url = req.rpc_url.clone();
            worker.runtimes = req.runtimes.clone();
            worker.capabilities = req.capabilities.clone();
            worker.capacity = req.capacity.clone();
            worker.last_heartbeat = at;
            worker.updated_at = at;
            let out = self
                .replica
                .write_revoking(&[], vec![Mutation::PutWorker(worker.clone())])
                .await?;
            if let Some(Err(e)) = out.into_iter().next() {
                return Err(e.into());
            }
            if recorded
                .as_ref()
                .is_none_or(|w| w.status == WorkerStatus::Offline)
            {
                tracing::info!(worker = worker_id, "worker registered");
            }
            let w = worker.clone();
            self.with_leader(|s| {
                s.workers.insert(w.id.clone(), w);
            })?;
        }
        let claims: Vec<RaftHeld> = req
            .leases
            .iter()
            .map(|l| RaftHeld {
                resource_id: l.resource_id.clone(),
                generation: l.generation,
            })
            .collect();
        let outcome = if claims.is_empty() {
            Default::default()
        } else {
            self.replica.renew_leases(worker_id, claims).await?
        };
        let conv = |v: Vec<RaftHeld>| {
            v.into_iter()
                .map(|l| wire::HeldLease {
                    resource_id: l.resource_id,
                    generation: l.generation,
                })
                .collect()
        };
        let view = self.worker_view(&worker)?;
        Ok(HeartbeatReply {
            worker: view,
            renewed: conv(outcome.renewed),
            lost: conv(outcome.lost),
            lease_ttl_ms: self.cfg.lease_ttl_ms(),
            heartbeat_interval_ms: ms(self.cfg.heartbeat),
            rpc_keys: Vec::new(),
            revoked_token_ids: Vec::new(),
        })
    }

    fn worker_view(&self, w: &Worker) -> Result<wire::Worker, ControlError> {
        let now = Instant::now();
        let timing = self.cfg.timing();
        self.with_leader(|s| {
            let seen = s.last_seen.get(&w.id).copied();
            let health = liveness::judge(w.status, seen, s.elected_at, now, &timing);
            let last = match seen {
                Some(t) => Ts::now().minus_millis(ms(now.saturating_duration_since(t))),
                None => w.last_heartbeat,
            };
            wire::Worker {
                id: w.id.clone(),
                hostname: w.hostname.clone(),
                status: health.as_str().to_string(),
                runtimes: w.runtimes.clone(),
                providers: w.runtimes.clone(),
                capabilities: w.capabilities.clone(),
                capacity: w.capacity.clone(),
                rpc_url: w.rpc_url.clone(),
                active_sandboxes: s.counts.by_worker.get(&w.id).copied().unwrap_or(0),
                last_heartbeat: crate::api::rfc3339(last),
                created_at: crate::api::rfc3339(w.created_at),
                updated_at: crate::api::rfc3339(w.updated_at),
                stale: health == Health::Stale,
            }
        })
    }

    /// Every worker as the leader sees it now.
    pub async fn workers(&self) -> Result<Vec<wire::Worker>, ControlError> {
        self.ensure_leader().await?;
        let all: Vec<Worker> = self.with_leader(|s| s.workers.values().cloned().collect())?;
        all.iter().map(|w| self.worker_view(w)).collect()
    }

    pub async fn worker(&self, id: &str) -> Result<wire::Worker, ControlError> {
        self.ensure_leader().await?;
        let w = self
            .with_leader(|s| s.workers.get(id).cloned())?
            .ok_or_else(|| ControlError::NotFound(format!("worker {id:?} not found")))?;
        self.worker_view(&w)
    }

    /// Operator drain (`drain = true`) or undrain.
    pub async fn set_draining(&self, id: &str, drain: bool) -> Result<wire::Worker, ControlError> {
        self.ensure_leader().await?;
        let mut w = self
            .with_leader(|s| s.workers.get(id).cloned())?
            .ok_or_else(|| ControlError::NotFound(format!("worker {id:?} not found")))?;
        if w.status == WorkerStatus::Offline {
            return Err(ControlError::Conflict(format!("worker {id} is offline")));
        }
        let status = if drain {
            WorkerStatus::Draining
        } else {
            WorkerStatus::Online
        };
        let at = now_ts();
        let out = self
            .replica
            .write_revoking(
                &[],
                vec![Mutation::SetWorkerStatus {
                    id: id.to_string(),
                    status,
                    at,
                }],
            )
            .await?;
        if let Some(Err(e)) = out.into_iter().next() {
            return Err(e.into());
        }
        w.status = status;
        w.updated_at = at;
        let view = w.clone();
        self.with_leader(|s| {
            s.workers.insert(view.id.clone(), view);
        })?;
        self.worker_view(&w)
    }

    /// Removes a worker record. Refused while it is alive or owns sandboxes.
    pub async fn remove_worker(&self, id: &str) -> Result<(), ControlError> {
        self.ensure_leader().await?;
        let now = Instant::now();
        let timing = self.cfg.timing();
        let (exists, health, active) = self.with_leader(|s| match s.workers.get(id) {
            Some(w) => (
                true,
                liveness::judge(
                    w.status,
                    s.last_seen.get(id).copied(),
                    s.elected_at,
                    now,
                    &timing,
                ),
                s.counts.by_worker.get(id).copied().unwrap_or(0),
            ),
            None => (false, Health::Offline, 0),
        })?;
        if !exists {
            return Err(ControlError::NotFound(format!("worker {id:?} not found")));
        }
        if health != Health::Offline && active > 0 {
            return Err(ControlError::Conflict(format!(
                "worker {id} is {} with {active} sandboxes; drain it and destroy them first",
                health.as_str()
            )));
        }
        self.declare_offline(id).await?;
        let out = self
            .replica
            .write_revoking(&[], vec![Mutation::DeleteWorker { id: id.to_string() }])
            .await?;
        if let Some(Err(e)) = out.into_iter().next() {
            return Err(e.into());
        }
        self.with_leader(|s| {
            s.workers.remove(id);
            s.last_seen.remove(id);
        })?;
        Ok(())
    }

    /// Records a worker offline: its leases revoked and its sandboxes `lost`,
    /// in one Raft entry.
    async fn declare_offline(&self, id: &str) -> Result<(), ControlError> {
        let leases = self.store().list_leases(Some(id)).await?;
        let sandboxes = self
            .all_sandboxes(SandboxFilter {
                worker_id: Some(id.to_string()),
                ..Default::default()
            })
            .await?;
        let at = now_ts();
        let mut m = vec![Mutation::SetWorkerStatus {
            id: id.to_string(),
            status: WorkerStatus::Offline,
            at,
        }];
        let revoked: Vec<String> = leases.iter().map(|l| l.resource_id.clone()).collect();
        for r in &revoked {
            m.push(Mutation::RevokeLease {
                resource_id: r.clone(),
            });
        }
        let mut lost = Vec::new();
        for s in sandboxes.iter().filter(|s| occupies(s.state)) {
            m.push(Mutation::SetSandboxState {
                id: s.id.clone(),
                state: SandboxState::Lost,
                at,
            });
            lost.push(s);
        }
        self.replica.write_revoking(&revoked, m).await?;
        self.counters
            .workers_declared_offline
            .fetch_add(1, Ordering::Relaxed);
        self.counters
            .sandboxes_marked_lost
            .fetch_add(lost.len() as u64, Ordering::Relaxed);
        let _ = self.with_leader(|s| {
            if let Some(w) = s.workers.get_mut(id) {
                w.status = WorkerStatus::Offline;
                w.updated_at = at;
            }
            for sb in &lost {
                s.counts.add(&sb.owner_id, &sb.worker_id, -1);
            }
        });
        self.capacity.notify_waiters();
        tracing::warn!(
            worker = id,
            leases = revoked.len(),
            lost = lost.len(),
            "worker declared offline"
        );
        Ok(())
    }

    // ------------------------------------------------------------ leader loops

    /// One liveness pass: declares silent workers offline.
    pub async fn liveness_pass(&self) -> Result<(), ControlError> {
        self.ensure_leader().await?;
        let now = Instant::now();
        let timing = self.cfg.timing();
        let due: Vec<String> = self.with_leader(|s| {
            s.workers
                .values()
                .filter(|w| {
                    let h = liveness::judge(
                        w.status,
                        s.last_seen.get(&w.id).copied(),
                        s.elected_at,
                        now,
                        &timing,
                    );
                    liveness::must_declare_offline(w.status, h)
                })
                .map(|w| w.id.clone())
                .collect()
        })?;
        for id in due {
            self.declare_offline(&id).await?;
        }
        Ok(())
    }

    /// One reaper pass: destroys expired sandboxes.
    pub async fn reaper_pass(&self) -> Result<usize, ControlError> {
        self.ensure_leader().await?;
        let expired = self.store().list_expired_sandboxes(now_ts()).await?;
        let mut n = 0;
        for s in expired
            .iter()
            .filter(|s| s.state != SandboxState::Destroyed && s.state != SandboxState::Creating)
        {
            match self.destroy(&s.id, "reaper").await {
                Ok(()) => n += 1,
                Err(ControlError::NotFound(_)) => {}
                Err(e) => {
                    tracing::warn!(sandbox = %s.id, error = %e, "reaper could not destroy an expired sandbox")
                }
            }
        }
        self.counters.reaped.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    /// Revokes a sandbox's lease (if any) and moves its record to `state`
    /// (`Lost` or `Destroyed`) in one entry. Uses `SetSandboxState`, not
    /// `DestroySandbox`: that answers Ok for a record a user destroyed
    /// meanwhile, whose slot is already free. Returns whether this call moved
    /// the record, and only then frees its slot.
    async fn close_record(&self, sb: &Sandbox, state: SandboxState) -> Result<bool, ControlError> {
        let mut m = Vec::new();
        if self.store().get_lease(&sb.id).await.is_ok() {
            m.push(Mutation::RevokeLease {
                resource_id: sb.id.clone(),
            });
        }
        m.push(Mutation::SetSandboxState {
            id: sb.id.clone(),
            state,
            at: now_ts(),
        });
        let out = self
            .replica
            .write_revoking(std::slice::from_ref(&sb.id), m)
            .await?;
        let moved = out.last().is_some_and(|r| r.is_ok());
        if moved && occupies(sb.state) {
            self.release_slot(&sb.owner_id, &sb.worker_id);
        }
        Ok(moved)
    }

    /// One reconciliation pass over every persisted sandbox (see [`reconcile`]).
    /// Returns the actions taken, for tests and logs.
    pub async fn reconcile_pass(&self) -> Result<Vec<(String, reconcile::Action)>, ControlError> {
        self.ensure_leader().await?;
        let now = Instant::now();
        let timing = self.cfg.timing();
        // Taken before the listing: a spawn that starts after it is young.
        let spawning = self
            .spawning
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let sandboxes = self.all_sandboxes(SandboxFilter::default()).await?;
        let (owners, workers): (HashMap<String, reconcile::Owner>, BTreeMap<String, Worker>) = self
            .with_leader(|s| {
                let owners = s
                    .workers
                    .values()
                    .map(|w| {
                        let h = liveness::judge(
                            w.status,
                            s.last_seen.get(&w.id).copied(),
                            s.elected_at,
                            now,
                            &timing,
                        );
                        (w.id.clone(), reconcile::Owner::Known(h))
                    })
                    .collect();
                (owners, s.workers.clone())
            })?;
        // A spawn another leader began may still be in its worker RPC.
        let settled_before = now_ts().plus_millis(-ms(self.cfg.spawn_timeout));
        let mut reports: HashMap<String, Option<HashMap<String, RpcSandbox>>> = HashMap::new();
        let mut taken = Vec::new();
        for sb in &sandboxes {
            let owner = owners
                .get(&sb.worker_id)
                .copied()
                .unwrap_or(reconcile::Owner::Missing);
            let settled = !spawning.contains(&sb.id) && sb.created_at < settled_before;
            let mut action = reconcile::decide(sb.state, owner, None, settled);
            if action == reconcile::Action::AskOwner {
                if !reports.contains_key(&sb.worker_id) {
                    let listed =
                        match workers.get(&sb.worker_id) {
                            Some(w) => {
                                let t = self.target(&w.id, &w.rpc_url, 0, "reconcile");
                                self.rpc.list(&t).await.ok().map(|v| {
                                    v.into_iter().map(|r| (r.sandbox_id.clone(), r)).collect()
                                })
                            }
                            None => None,
                        };
                    reports.insert(sb.worker_id.clone(), listed);
                }
                let report = match reports.get(&sb.worker_id) {
                    Some(Some(list)) => match list.get(&sb.id) {
                        Some(r) if r.state == "running" => reconcile::Report::Running,
                        Some(_) => reconcile::Report::Stopped,
                        None => reconcile::Report::Missing,
                    },
                    _ => reconcile::Report::NoAnswer,
                };
                action = reconcile::decide(sb.state, owner, Some(report), settled);
            }
            match action {
                reconcile::Action::Keep | reconcile::Action::AskOwner => {}
                reconcile::Action::SetState(state) => {
                    self.replica
                        .write_revoking(
                            &[],
                            vec![Mutation::SetSandboxState {
                                id: sb.id.clone(),
                                state,
                                at: now_ts(),
                            }],
                        )
                        .await?;
                    taken.push((sb.id.clone(), action));
                }
                reconcile::Action::MarkLost => {
                    if self.close_record(sb, SandboxState::Lost).await? {
                        self.counters
                            .sandboxes_marked_lost
                            .fetch_add(1, Ordering::Relaxed);
                        taken.push((sb.id.clone(), action));
                    }
                }
                reconcile::Action::Abandon => {
                    if self.close_record(sb, SandboxState::Destroyed).await? {
                        taken.push((sb.id.clone(), action));
                    }
                }
            }
        }
        // Leases that guard no live sandbox (a spawn cut short by a leader
        // crash, a destroy whose write was lost) are closed.
        let live: std::collections::HashSet<&str> = sandboxes
            .iter()
            .filter(|s| occupies(s.state))
            .map(|s| s.id.as_str())
            .collect();
        let candidates: Vec<String> = self
            .store()
            .list_leases(None)
            .await?
            .into_iter()
            .filter(|l| l.resource_type == SANDBOX_LEASE && !live.contains(l.resource_id.as_str()))
            .map(|l| l.resource_id)
            .collect();
        // Never act on absence from a listing alone: confirm each one.
        let mut orphans = Vec::new();
        for id in candidates {
            match self.store().get_sandbox(&id).await {
                Ok(sb) if occupies(sb.state) => {}
                Ok(_) | Err(StoreError::NotFound { .. }) => orphans.push(id),
                Err(e) => return Err(e.into()),
            }
        }
        if !orphans.is_empty() {
            let m = orphans
                .iter()
                .map(|r| Mutation::RevokeLease {
                    resource_id: r.clone(),
                })
                .collect();
            self.replica.write_revoking(&orphans, m).await?;
        }
        // Counts drift only if a path forgot one; resync when nothing is in flight.
        let fresh = self.count_from_store().await?;
        let _ = self.with_leader(|s| {
            if s.inflight == 0 {
                s.counts = fresh;
            }
            s.reconciled_once = true;
        });
        for (id, a) in &taken {
            tracing::info!(sandbox = %id, action = ?a, "reconciled");
        }
        Ok(taken)
    }

    /// Runs the leader duties forever: liveness every half heartbeat, the
    /// reaper, and reconciliation (first pass two heartbeats after election,
    /// so live workers have re-attached).
    pub async fn run_leader_loops(self: Arc<Self>) {
        let tick = (self.cfg.heartbeat / 2).max(Duration::from_millis(50));
        let mut last_reap = Instant::now();
        let mut last_reconcile: Option<Instant> = None;
        loop {
            tokio::time::sleep(tick).await;
            if !self.replica.is_leader() {
                self.step_down();
                last_reconcile = None;
                continue;
            }
            if let Err(e) = self.liveness_pass().await {
                tracing::debug!(error = %e, "liveness pass");
                continue;
            }
            if last_reap.elapsed() >= self.cfg.reaper_interval {
                last_reap = Instant::now();
                if let Err(e) = self.reaper_pass().await {
                    tracing::debug!(error = %e, "reaper pass");
                }
            }
            let elected_at = self.with_leader(|s| s.elected_at).ok();
            let due = match (last_reconcile, elected_at) {
                (None, Some(e)) => e.elapsed() >= self.cfg.heartbeat * 2,
                (Some(t), _) => t.elapsed() >= self.cfg.reconcile_interval,
                _ => false,
            };
            if due {
                last_reconcile = Some(Instant::now());
                if let Err(e) = self.reconcile_pass().await {
                    tracing::warn!(error = %e, "reconciliation pass failed; retrying next interval");
                }
            }
        }
    }

    /// Leader-side counts for metrics: (total, spawns in flight).
    pub fn leader_counts(&self) -> Option<(i64, i64)> {
        self.with_leader(|s| (s.counts.total, s.inflight)).ok()
    }
}

fn not_found(id: &str) -> impl FnOnce(StoreError) -> ControlError + '_ {
    move |e| match e {
        StoreError::NotFound { .. } => ControlError::NotFound(format!("sandbox {id} not found")),
        e => e.into(),
    }
}

fn check_env(env: &BTreeMap<String, String>) -> Result<(), String> {
    if env.len() > 256 {
        return Err("env: at most 256 variables".into());
    }
    for (k, v) in env {
        let ok = !k.is_empty()
            && k.len() <= 256
            && !k.starts_with(|c: char| c.is_ascii_digit())
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok {
            return Err(format!("env: {k:?} is not a valid variable name"));
        }
        if v.len() > 32 * 1024 || v.contains('\0') {
            return Err(format!("env: value of {k} is over 32 KiB or holds NUL"));
        }
    }
    Ok(())
}

fn check_heartbeat(r: &HeartbeatRequest) -> Result<(), String> {
    if !matches!(r.status.as_str(), "" | "online" | "draining") {
        return Err(format!(
            "status {:?} must be \"online\" or \"draining\"",
            r.status
        ));
    }
    let url =
        reqwest::Url::parse(&r.rpc_url).map_err(|e| format!("rpc_url {:?}: {e}", r.rpc_url))?;
    if !matches!(url.scheme(), "http" | "https")
        || url.host_str().is_none()
        || url.port_or_known_default().is_none()
    {
        return Err(format!(
            "rpc_url {:?} must be http(s)://host:port",
            r.rpc_url
        ));
    }
    if r.runtimes.len() > 32 || r.capabilities.len() > 64 || r.capacity.len() > 64 {
        return Err("too many runtimes, capabilities or capacity keys".into());
    }
    for rt in &r.runtimes {
        wire::check_name("runtime", rt).map_err(|e| e.0)?;
    }
    if r.hostname.len() > 255 {
        return Err("hostname is over 255 bytes".into());
    }
    if r.leases.len() > 100_000 {
        return Err("more than 100000 leases in one heartbeat".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_and_heartbeat_validation() {
        let mut env = BTreeMap::new();
        env.insert("GOOD_1".to_string(), "x".to_string());
        assert!(check_env(&env).is_ok());
        for bad in ["1X", "A-B", "", "A B"] {
            let mut e = BTreeMap::new();
            e.insert(bad.to_string(), "v".to_string());
            assert!(check_env(&e).is_err(), "{bad}");
        }
        let ok = HeartbeatRequest {
            rpc_url: "http://127.0.0.1:7430".into(),
            runtimes: vec!["mock".into()],
            ..Default::default()
        };
        assert!(check_heartbeat(&ok).is_ok());
        for url in [":7430", "ftp://x:1", "http://", ""] {
            let r = HeartbeatRequest {
                rpc_url: url.into(),
                ..Default::default()
            };
            assert!(check_heartbeat(&r).is_err(), "{url}");
        }
        let r = HeartbeatRequest {
            rpc_url: "http://127.0.0.1:1".into(),
            status: "sleepy".into(),
            ..Default::default()
        };
        assert!(check_heartbeat(&r).is_err());
    }

    #[test]
    fn ids_look_like_the_earlier_api() {
        for _ in 0..100 {
            let id = new_sandbox_id();
            assert!(wire::check_sandbox_id(&id).is_ok(), "{id}");
        }
        assert!(occupies(SandboxState::Running));
        assert!(occupies(SandboxState::Creating));
        assert!(!occupies(SandboxState::Lost));
        assert!(!occupies(SandboxState::Destroyed));
    }
}
