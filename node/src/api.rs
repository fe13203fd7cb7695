//! The HTTP API every replica serves (axum): health probes, cluster
//! operations, lease arbitration, and tenant records.
//!
//! Any replica answers any call. Writes go through the Raft leader (the
//! replica forwards them over QUIC); reads are linearizable by default (a
//! read-index barrier, then the local store) and `?consistency=stale` reads the
//! local store directly. Every response carries the leader's API address in
//! `X-StacyVM-Leader` and a request ID in `X-Request-ID`. Errors are
//! `{code, message, request_id}`, mapped once in [`ApiError`]. With no leader a
//! request waits a bounded time and then answers 503 `NO_LEADER` with
//! `Retry-After`.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use stacyvm_raft::codec::Command;
use stacyvm_raft::leases::{HeldLease, RenewOutcome};
use stacyvm_raft::replica::Replica;
use stacyvm_raft::rpc::{LeaseError, WriteError};
use stacyvm_raft::types::{NodeInfo, Response as RaftResponse};
use stacyvm_store::{Mutation, StoreError, Tenant, Ts};

/// Largest request body accepted (JSON and other small bodies).
pub const MAX_BODY: usize = 1024 * 1024;
/// Largest file upload (raw bodies are streamed, never held in memory).
pub const MAX_UPLOAD: usize = 4 * 1024 * 1024 * 1024;
/// Header naming the leader's API address.
pub const LEADER_HEADER: &str = "x-stacyvm-leader";

tokio::task_local! {
    static REQUEST_ID: String;
}

/// What the handlers share.
#[derive(Clone, Debug)]
pub struct AppState {
    pub replica: Arc<Replica>,
    pub cluster_id: String,
    pub node_id: u64,
    pub started: std::time::Instant,
    pub control: Arc<crate::control::Control>,
    pub events: Arc<crate::events::Events>,
    /// Client for forwarding leader-decided calls.
    pub forwarder: reqwest::Client,
    /// Credentials this replica checks (files re-read when they change).
    pub auth: Arc<crate::config::AuthSources>,
}

/// The current request's ID (empty outside a request).
pub fn request_id() -> String {
    REQUEST_ID.try_with(Clone::clone).unwrap_or_default()
}

/// RFC 3339 with milliseconds, UTC.
pub fn rfc3339(t: Ts) -> String {
    t.to_chrono()
        .map(|c| c.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// An API failure: a stable code, an HTTP status, a message for humans.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: std::borrow::Cow<'static, str>,
    message: String,
    /// For auth failures: the rule that refused (`token_expired`, ...).
    reason: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code: code.into(),
            message: message.into(),
            reason: None,
        }
    }

    /// An error with a code decided at run time (relayed from a worker).
    pub fn owned(status: StatusCode, code: String, message: String) -> Self {
        ApiError {
            status,
            code: code.into(),
            message,
            reason: None,
        }
    }

    pub fn code(&self) -> &str {
        &self.code
    }

    /// Names the rule that refused (auth failures).
    pub fn set_reason(&mut self, reason: &'static str) {
        self.reason = Some(reason);
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "BAD_REQUEST", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let request_id = REQUEST_ID.try_with(Clone::clone).unwrap_or_default();
        let mut body =
            json!({ "code": self.code, "message": self.message, "request_id": request_id });
        if let Some(r) = self.reason {
            body["reason"] = json!(r);
        }
        let mut resp = (self.status, Json(body)).into_response();
        if self.code == "NO_LEADER" || self.code == "NO_ELIGIBLE_WORKER" {
            resp.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
        }
        resp
    }
}

impl From<stacyvm_auth::AuthError> for ApiError {
    fn from(e: stacyvm_auth::AuthError) -> Self {
        let (status, code) = if e.is_forbidden() {
            (StatusCode::FORBIDDEN, "FORBIDDEN")
        } else if matches!(e, stacyvm_auth::AuthError::NotConfigured) {
            (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE")
        } else {
            (StatusCode::UNAUTHORIZED, "UNAUTHORIZED")
        };
        ApiError {
            status,
            code: code.into(),
            message: e.to_string(),
            reason: Some(e.reason()),
        }
    }
}

impl From<crate::config::ConfigError> for ApiError {
    fn from(e: crate::config::ConfigError) -> Self {
        // A secret file that became unreadable: the replica cannot decide.
        tracing::error!(error = %e, "credential source unusable");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            "credential configuration is unusable on this replica",
        )
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::NoLeader => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "NO_LEADER", e.to_string())
            }
            WriteError::Timeout => {
                ApiError::new(StatusCode::GATEWAY_TIMEOUT, "TIMEOUT", e.to_string())
            }
            WriteError::Refused(m) => ApiError::new(StatusCode::CONFLICT, "CONFLICT", m),
            WriteError::Fatal(m) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", m)
            }
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let msg = e.to_string();
        match e {
            StoreError::NotFound { .. } => ApiError::new(StatusCode::NOT_FOUND, "NOT_FOUND", msg),
            StoreError::Conflict { .. } => ApiError::new(StatusCode::CONFLICT, "CONFLICT", msg),
            StoreError::Invalid(_) => ApiError::bad_request(msg),
            StoreError::Unavailable(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", msg)
            }
        }
    }
}

impl From<LeaseError> for ApiError {
    fn from(e: LeaseError) -> Self {
        match e {
            LeaseError::Store(s) => s.into(),
            LeaseError::Write(w) => w.into(),
        }
    }
}

/// `Json` whose rejections (bad JSON, unknown fields, wrong content type,
/// oversized body) answer in the API's error format.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            // Malformed, mistyped or unknown fields are all 400 (axum says
            // 422 for some); oversized bodies stay 413, wrong types 415.
            Err(rej) => {
                let status = match rej.status() {
                    StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                        rej.status()
                    }
                    _ => StatusCode::BAD_REQUEST,
                };
                Err(ApiError::new(status, "BAD_REQUEST", rej.body_text()))
            }
        }
    }
}

/// `?consistency=linearizable|stale` on reads.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadQuery {
    #[serde(default)]
    consistency: Option<String>,
}

impl ReadQuery {
    pub fn with(consistency: Option<String>) -> Self {
        ReadQuery { consistency }
    }
}

impl AppState {
    /// Makes the local store current enough for the requested consistency.
    pub async fn before_read(&self, q: &ReadQuery) -> Result<(), ApiError> {
        match q.consistency.as_deref() {
            None | Some("linearizable") => Ok(self.replica.read_barrier().await?),
            Some("stale") => Ok(()),
            Some(other) => Err(ApiError::bad_request(format!(
                "unknown consistency {other:?}; use \"linearizable\" (default) or \"stale\""
            ))),
        }
    }

    /// Replicates one mutation and returns its outcome.
    pub async fn write_one(&self, m: Mutation) -> Result<stacyvm_store::MutationOutput, ApiError> {
        match self.replica.write(Command::Store(vec![m])).await? {
            RaftResponse::Applied(mut r) if r.len() == 1 => Ok(r.remove(0)?),
            other => Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "INTERNAL_ERROR",
                format!("unexpected apply result {other:?}"),
            )),
        }
    }
}

/// Sets the request ID and the leader hint on every response.
async fn envelope(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.chars().all(|c| c.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| format!("req-{:016x}", rand::random::<u64>()));
    let mut resp = REQUEST_ID.scope(request_id.clone(), next.run(req)).await;
    let headers = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        headers.insert("x-request-id", v);
    }
    if let Some((_, node)) = state.replica.leader()
        && let Ok(v) = HeaderValue::from_str(&node.api_addr)
    {
        headers.insert(LEADER_HEADER, v);
    }
    resp
}

/// Which credential a path needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guard {
    Public,
    Worker,
    User,
    Admin,
}

/// The guard of a request path (pure; table-tested).
pub fn guard_of(method: &axum::http::Method, path: &str) -> Guard {
    use axum::http::Method;
    if matches!(path, "/health" | "/live" | "/ready" | "/metrics") {
        return Guard::Public;
    }
    if path.starts_with("/api/v1/worker/") {
        // Enrollment carries its own secret (checked by the handler).
        if path.ends_with("/enroll") {
            return Guard::Public;
        }
        return Guard::Worker;
    }
    if path.starts_with("/api/v1/admin/") || path == "/api/v1/admin" {
        return Guard::Admin;
    }
    // Membership changes and worker administration are operator actions.
    let admin_posts = [
        "/api/v1/cluster/join",
        "/api/v1/cluster/leave",
        "/api/v1/cluster/transfer-leader",
        "/api/v1/cluster/incarnation",
    ];
    if *method == Method::POST && admin_posts.contains(&path) {
        return Guard::Admin;
    }
    if path.starts_with("/api/v1/workers/")
        && (*method == Method::POST || *method == Method::DELETE)
    {
        return Guard::Admin;
    }
    Guard::User
}

/// The identity a request proved (set by [`authenticate`]).
#[derive(Clone, Debug)]
pub enum Caller {
    Open,
    Role(stacyvm_auth::Role),
    Worker(stacyvm_auth::WorkerIdentity),
}

fn header<'a>(h: &'a axum::http::HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// The worker token of a request: `X-Worker-Token`, else `Authorization: Bearer`.
pub fn worker_token(h: &axum::http::HeaderMap) -> Option<&str> {
    header(h, "x-worker-token")
        .or_else(|| header(h, "authorization").and_then(|a| a.strip_prefix("Bearer ")))
}

/// Checks credentials before any handler runs: API keys on user and admin
/// routes (admin routes need the admin key; the user key is never promoted),
/// worker credentials on worker routes, and neither kind on the other's
/// routes. With no key configured, user and admin routes are open; with no
/// worker credential configured, worker routes are open (development).
async fn authenticate(State(s): State<AppState>, mut req: Request, next: Next) -> Response {
    let guard = guard_of(req.method(), req.uri().path());
    let headers = req.headers().clone();
    let caller = match check(&s, guard, &headers).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    req.extensions_mut().insert(caller);
    next.run(req).await
}

async fn check(s: &AppState, guard: Guard, h: &axum::http::HeaderMap) -> Result<Caller, ApiError> {
    match guard {
        Guard::Public => Ok(Caller::Open),
        Guard::User | Guard::Admin => {
            let keys = s.auth.api_keys()?;
            if !keys.enabled() {
                return Ok(Caller::Open);
            }
            let key = header(h, "x-admin-api-key")
                .or_else(|| header(h, "x-api-key"))
                .or_else(|| header(h, "authorization").and_then(|a| a.strip_prefix("Bearer ")));
            if key.is_none() && header(h, "x-worker-token").is_some() {
                return Err(stacyvm_auth::AuthError::WrongKind.into());
            }
            let role = keys.role(key)?;
            if guard == Guard::Admin && role != stacyvm_auth::Role::Admin {
                return Err(stacyvm_auth::AuthError::AdminRequired.into());
            }
            Ok(Caller::Role(role))
        }
        Guard::Worker => {
            let wa = s.auth.worker_auth()?;
            let worker_id = header(h, "x-worker-id").unwrap_or("");
            let token = worker_token(h);
            // An enrolled credential lives (hashed) in the replicated store.
            let enrolled = if worker_id.is_empty() {
                None
            } else {
                match s.replica.store().get_worker_credential(worker_id).await {
                    Ok(c) => Some(c.token_hash),
                    Err(stacyvm_store::StoreError::NotFound { .. }) => None,
                    Err(e) => return Err(e.into()),
                }
            };
            if !wa.configured() && enrolled.is_none() {
                return Ok(Caller::Open);
            }
            // Revocation: the configured list plus the replicated one.
            let revoked_jti = match token.map(stacyvm_auth::token::decode_unverified) {
                Some(Ok(c))
                    if s.replica
                        .store()
                        .is_token_revoked(&c.jti)
                        .await
                        .unwrap_or(true) =>
                {
                    Some(c.jti)
                }
                _ => None,
            };
            let now = Ts::now().micros() / 1_000_000;
            let id = wa.authenticate_with(
                worker_id,
                token,
                now,
                "worker:heartbeat",
                &|j| revoked_jti.as_deref() == Some(j),
                enrolled.as_deref(),
            )?;
            Ok(Caller::Worker(id))
        }
    }
}

/// The router for one replica.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/live", get(live))
        .route("/ready", get(ready))
        .route("/api/v1/cluster/status", get(cluster_status))
        .route("/api/v1/cluster/members", get(cluster_members))
        .route("/api/v1/cluster/digest", get(cluster_digest))
        .route("/api/v1/cluster/join", post(cluster_join))
        .route("/api/v1/cluster/leave", post(cluster_leave))
        .route("/api/v1/cluster/incarnation", post(cluster_incarnation))
        .route("/api/v1/cluster/transfer-leader", post(cluster_transfer))
        .route("/api/v1/leases/acquire", post(lease_acquire))
        .route("/api/v1/leases/renew", post(lease_renew))
        .route("/api/v1/leases/release", post(lease_release))
        .route("/api/v1/leases/{id}", get(lease_get))
        .route("/api/v1/admin/tenants", post(tenant_create))
        .route("/api/v1/admin/tenants/{id}", get(tenant_get))
        .merge(crate::sandbox_api::leader_routes(state.clone()))
        .merge(crate::sandbox_api::local_routes())
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "NOT_FOUND", "no such route") })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn_with_state(state.clone(), envelope))
        .with_state(state)
}

async fn health(State(s): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "node_id": s.node_id,
        "uptime_seconds": s.started.elapsed().as_secs(),
    }))
}

async fn live() -> Json<serde_json::Value> {
    Json(json!({ "status": "alive" }))
}

async fn ready(State(s): State<AppState>) -> Response {
    let leader = s.replica.leader().map(|(id, _)| id);
    let store =
        tokio::time::timeout(std::time::Duration::from_secs(2), s.replica.store().ping()).await;
    let store_ok = matches!(store, Ok(Ok(())));
    let ready = leader.is_some() && store_ok;
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "leader_id": leader,
        "store": if store_ok { "ok" } else { "unavailable" },
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// `GET /api/v1/cluster/status`: this replica's own view (no leader round trip).
#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub cluster_id: String,
    pub node_id: u64,
    pub state: String,
    pub term: u64,
    pub leader_id: Option<u64>,
    pub leader_api: Option<String>,
    pub last_log_index: Option<u64>,
    pub last_applied_index: Option<u64>,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
}

async fn cluster_status(State(s): State<AppState>) -> Json<ClusterStatus> {
    let m = s.replica.raft().metrics().borrow().clone();
    let membership = m.membership_config.membership();
    Json(ClusterStatus {
        cluster_id: s.cluster_id.clone(),
        node_id: s.node_id,
        state: format!("{:?}", m.state).to_lowercase(),
        term: m.current_term,
        leader_id: m.current_leader,
        leader_api: s.replica.leader().map(|(_, n)| n.api_addr),
        last_log_index: m.last_log_index,
        last_applied_index: m.last_applied.map(|l| l.index),
        voters: membership.voter_ids().collect(),
        learners: membership.learner_ids().collect(),
    })
}

/// `GET /api/v1/cluster/digest`: a digest of this replica's own store
/// (not a linearizable read), for checking that replicas converged: two
/// replicas at the same `applied_index` must report the same `digest`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreDigest {
    pub node_id: u64,
    pub applied_index: u64,
    /// SHA-256 (hex) of every table but the Raft bookkeeping row, read in
    /// one consistent snapshot.
    pub digest: String,
    pub sandboxes: usize,
}

async fn cluster_digest(State(s): State<AppState>) -> Result<Json<StoreDigest>, ApiError> {
    use sha2::Digest;
    let mut snap = s.replica.store().export_snapshot().await?;
    let applied_index = snap.raft.applied_index;
    snap.raft = Default::default();
    let bytes = serde_json::to_vec(&snap).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL_ERROR",
            format!("cannot encode the store: {e}"),
        )
    })?;
    Ok(Json(StoreDigest {
        node_id: s.node_id,
        applied_index,
        digest: hex::encode(sha2::Sha256::digest(&bytes)),
        sandboxes: snap.sandboxes.len(),
    }))
}

async fn cluster_members(
    State(s): State<AppState>,
) -> Result<Json<stacyvm_raft::rpc::Members>, ApiError> {
    Ok(Json(s.replica.members().await?))
}

/// `POST /api/v1/cluster/join`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub id: u64,
    pub raft_addr: String,
    pub api_addr: String,
}

/// The answer to a join: which cluster was joined.
#[derive(Debug, Serialize, Deserialize)]
pub struct JoinResponse {
    pub cluster_id: String,
}

async fn cluster_join(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<JoinRequest>,
) -> Result<Json<JoinResponse>, ApiError> {
    if req.id == 0 {
        return Err(ApiError::bad_request("node id must be at least 1"));
    }
    let members = s.replica.members().await?;
    if members.voters.contains(&req.id) {
        // Re-joining under one's own ID (e.g. after a crash mid-join) is fine only
        // from the same address; anything else is an ID clash.
        let same = members
            .nodes
            .get(&req.id)
            .is_some_and(|n| n.raft_addr == req.raft_addr);
        if !same {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "CONFLICT",
                format!("node id {} is already a member at another address", req.id),
            ));
        }
    }
    let node = NodeInfo {
        raft_addr: req.raft_addr,
        api_addr: req.api_addr,
    };
    s.replica.join(req.id, node).await?;
    Ok(Json(JoinResponse {
        cluster_id: s.cluster_id.clone(),
    }))
}

/// `POST /api/v1/cluster/incarnation`: a restarting replica has the start
/// it is making recorded before it takes part in Raft (see `serve`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncarnationRequest {
    pub node_id: u64,
    pub incarnation: u64,
    pub boot_id: String,
}

async fn cluster_incarnation(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<IncarnationRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (Ok(node_id), Ok(incarnation)) =
        (i64::try_from(req.node_id), i64::try_from(req.incarnation))
    else {
        return Err(ApiError::bad_request("node id or incarnation out of range"));
    };
    let m = Mutation::RecordIncarnation {
        node_id,
        incarnation,
        boot_id: req.boot_id,
        at: stacyvm_store::Ts::now(),
    };
    match s.write_one(m).await {
        Ok(_) => Ok(Json(
            serde_json::json!({ "node_id": node_id, "incarnation": incarnation }),
        )),
        Err(e) if e.code == "CONFLICT" => Err(ApiError::new(
            StatusCode::CONFLICT,
            "STALE_REPLICA",
            e.message,
        )),
        Err(e) => Err(e),
    }
}

/// `POST /api/v1/cluster/leave` and `transfer-leader`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRef {
    pub id: u64,
}

async fn cluster_leave(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<NodeRef>,
) -> Result<StatusCode, ApiError> {
    s.replica.leave(req.id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn cluster_transfer(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<NodeRef>,
) -> Result<StatusCode, ApiError> {
    s.replica.transfer_leader(req.id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/v1/leases/acquire`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcquireRequest {
    pub resource_id: String,
    #[serde(default)]
    pub resource_type: String,
    pub holder_id: String,
    pub ttl_ms: i64,
}

async fn lease_acquire(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<AcquireRequest>,
) -> Result<Json<stacyvm_store::Lease>, ApiError> {
    let l = s
        .replica
        .acquire_lease(
            &req.resource_id,
            &req.resource_type,
            &req.holder_id,
            req.ttl_ms,
        )
        .await?;
    Ok(Json(l))
}

/// `POST /api/v1/leases/renew`: every lease a holder claims, in one call.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    pub holder_id: String,
    pub leases: Vec<HeldLease>,
}

async fn lease_renew(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<RenewRequest>,
) -> Result<Json<RenewOutcome>, ApiError> {
    if req.leases.len() > 10_000 {
        return Err(ApiError::bad_request("at most 10000 leases per renewal"));
    }
    Ok(Json(
        s.replica.renew_leases(&req.holder_id, req.leases).await?,
    ))
}

/// `POST /api/v1/leases/release`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    pub resource_id: String,
    pub holder_id: String,
}

async fn lease_release(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<ReleaseRequest>,
) -> Result<StatusCode, ApiError> {
    s.replica
        .release_lease(&req.resource_id, &req.holder_id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn lease_get(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<ReadQuery>,
) -> Result<Json<stacyvm_store::Lease>, ApiError> {
    s.before_read(&q).await?;
    Ok(Json(s.replica.store().get_lease(&id).await?))
}

/// `POST /api/v1/admin/tenants`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantRequest {
    #[serde(default)]
    pub id: Option<String>,
    pub name: String,
    #[serde(default)]
    pub owner_id: String,
}

async fn tenant_create(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<TenantRequest>,
) -> Result<(StatusCode, Json<Tenant>), ApiError> {
    // The receiving replica chooses every non-deterministic input.
    let now = Ts::now();
    let tenant = Tenant {
        id: req
            .id
            .unwrap_or_else(|| format!("tenant-{:08x}", rand::random::<u32>())),
        name: req.name,
        owner_id: req.owner_id,
        settings: "{}".into(),
        created_at: now,
        updated_at: now,
    };
    s.write_one(Mutation::CreateTenant(tenant.clone())).await?;
    Ok((StatusCode::CREATED, Json(tenant)))
}

async fn tenant_get(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<ReadQuery>,
) -> Result<Json<Tenant>, ApiError> {
    s.before_read(&q).await?;
    Ok(Json(s.replica.store().get_tenant(&id).await?))
}
