//! REST handlers for sandboxes, exec, files, templates, quotas, workers,
//! worker heartbeats, events and metrics.
//!
//! Owns: HTTP shapes and the split between the two kinds of call.
//! Control calls (spawn, destroy, extend, prune, template spawn, worker
//! list/drain/undrain/remove) are decided by the leader: a follower forwards
//! them to the leader's API ([`forward_to_leader`]) and relays the answer.
//! Data calls (get, list, exec, files, logs) are served by whichever replica
//! is asked: a linearizable read finds the owner and its lease generation,
//! then the call goes straight to that worker, bodies streamed both ways.
//!
//! Does not own: the decisions ([`crate::control`]), worker RPC details
//! ([`crate::worker_rpc`]), or error mapping beyond [`From<ControlError>`].

use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde::Deserialize;
use stacyvm_api::{self as wire, ExecRequest, ExecStreamLine, StatusReply, codes};
use stacyvm_store::{
    ExecLog, Mutation, OwnerQuota, Sandbox, SandboxFilter, SandboxState, Template, Ts,
};

use crate::api::{ApiError, ApiJson, AppState, ReadQuery, request_id, rfc3339};
use crate::control::{ControlError, Route};

/// Header marking a request a follower forwarded (never forwarded twice).
const FORWARDED: &str = "x-stacyvm-forwarded";

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        let msg = e.to_string();
        match e {
            ControlError::BadRequest(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, codes::BAD_REQUEST, msg)
            }
            ControlError::NotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, codes::NOT_FOUND, msg)
            }
            ControlError::NotRunning(_) => {
                ApiError::new(StatusCode::CONFLICT, codes::SANDBOX_NOT_RUNNING, msg)
            }
            ControlError::Conflict(_) => ApiError::new(StatusCode::CONFLICT, codes::CONFLICT, msg),
            ControlError::ResourceLimit(_) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, codes::RESOURCE_LIMIT, msg)
            }
            ControlError::UnknownRuntime(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, codes::UNKNOWN_RUNTIME, msg)
            }
            ControlError::NoEligibleWorker(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                codes::NO_ELIGIBLE_WORKER,
                msg,
            ),
            ControlError::NotLeader => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                codes::NO_LEADER,
                "leadership changed; retry",
            ),
            ControlError::Worker(w) => match w {
                crate::worker_rpc::WorkerCallError::Unreachable { .. } => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    codes::WORKER_UNAVAILABLE,
                    msg,
                ),
                crate::worker_rpc::WorkerCallError::Refused { status, body, .. } => {
                    ApiError::owned(
                        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                        body.code,
                        body.message,
                    )
                }
            },
            ControlError::Write(w) => w.into(),
            ControlError::Store(s) => s.into(),
        }
    }
}

/// Converts a record to its API shape.
pub fn sandbox_view(s: &Sandbox, generation: i64) -> wire::Sandbox {
    wire::Sandbox {
        id: s.id.clone(),
        state: s.state.to_string(),
        runtime: s.runtime.clone(),
        provider: s.runtime.clone(),
        image: s.image.clone(),
        memory_mb: s.memory_mb,
        vcpus: s.vcpus,
        owner_id: s.owner_id.clone(),
        tenant_id: s.tenant_id.clone(),
        vm_id: s.runtime_id.clone(),
        worker_id: s.worker_id.clone(),
        generation,
        created_at: rfc3339(s.created_at),
        updated_at: rfc3339(s.updated_at),
        expires_at: rfc3339(s.expires_at),
        metadata: s.metadata.clone(),
    }
}

// ---------------------------------------------------------------- forwarding

/// Middleware for leader-decided routes: runs them here on the leader,
/// forwards them from a follower (waiting a bounded time for an election),
/// and answers `503 NO_LEADER` when no leader appears.
pub async fn forward_to_leader(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if s.replica.is_leader() {
            return next.run(req).await;
        }
        if req.headers().contains_key(FORWARDED) {
            // The sender thought we lead; we do not: let it retry.
            return ApiError::from(ControlError::NotLeader).into_response();
        }
        if let Some((_, node)) = s.replica.leader() {
            return match forward(&s, &node.api_addr, req).await {
                Ok(r) => r,
                Err(e) => e.into_response(),
            };
        }
        if Instant::now() >= deadline {
            return ApiError::from(ControlError::NotLeader).into_response();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn forward(s: &AppState, leader_api: &str, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, crate::api::MAX_BODY)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                codes::BAD_REQUEST,
                format!("request body: {e}"),
            )
        })?;
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let url = format!("http://{leader_api}{path}");
    let mut b = s
        .forwarder
        .request(parts.method.clone(), &url)
        .header(FORWARDED, "1")
        .header("x-request-id", request_id());
    for h in [
        "content-type",
        "x-api-key",
        "x-admin-api-key",
        "authorization",
        "x-user-id",
        "x-tenant-id",
    ] {
        if let Some(v) = parts.headers.get(h) {
            b = b.header(h, v);
        }
    }
    let resp = b.body(bytes).send().await.map_err(|e| {
        if e.is_timeout() {
            ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                codes::TIMEOUT,
                "the leader did not answer in time; the outcome is unknown",
            )
        } else {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                codes::NO_LEADER,
                format!("cannot reach the leader: {e}"),
            )
        }
    })?;
    let status = resp.status();
    let ct = resp.headers().get("content-type").cloned();
    let body = resp
        .bytes()
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, codes::UNAVAILABLE, e.to_string()))?;
    let mut out = (status, body).into_response();
    if let Some(ct) = ct {
        out.headers_mut().insert("content-type", ct);
    }
    Ok(out)
}

// ---------------------------------------------------------------- sandboxes

async fn spawn(
    State(s): State<AppState>,
    headers: HeaderMap,
    ApiJson(mut req): ApiJson<wire::SpawnRequest>,
) -> Result<Response, ApiError> {
    if req.owner_id.is_empty()
        && let Some(u) = headers.get("x-user-id").and_then(|v| v.to_str().ok())
    {
        req.owner_id = u.to_string();
    }
    let plan = s.control.plan_spawn(&req).await?;
    let (sb, generation) = s.control.spawn(plan, &request_id()).await?;
    Ok((StatusCode::CREATED, Json(sandbox_view(&sb, generation))).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    owner_id: Option<String>,
    tenant_id: Option<String>,
    worker_id: Option<String>,
    state: Option<String>,
    limit: Option<i64>,
    offset: Option<i64>,
    consistency: Option<String>,
}

async fn list(State(s): State<AppState>, Query(q): Query<ListQuery>) -> Result<Response, ApiError> {
    s.before_read(&ReadQuery::with(q.consistency.clone()))
        .await?;
    let state = match q.state.as_deref() {
        Some(st) => Some(st.parse::<SandboxState>().map_err(ApiError::from)?),
        None => None,
    };
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) || q.offset.is_some_and(|o| o < 0) {
        return Err(ApiError::bad_request(
            "limit must be 1..=1000 and offset >= 0",
        ));
    }
    let filter = SandboxFilter {
        owner_id: q.owner_id,
        tenant_id: q.tenant_id,
        worker_id: q.worker_id,
        state,
        limit: Some(limit + 1),
        offset: q.offset,
    };
    let mut rows = s.replica.store().list_sandboxes(&filter).await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(usize::try_from(limit).unwrap_or(0));
    let gens: std::collections::HashMap<String, i64> = s
        .replica
        .store()
        .list_leases(None)
        .await?
        .into_iter()
        .map(|l| (l.resource_id, l.generation))
        .collect();
    let out: Vec<wire::Sandbox> = rows
        .iter()
        .map(|r| sandbox_view(r, gens.get(&r.id).copied().unwrap_or(0)))
        .collect();
    let mut resp = Json(out).into_response();
    if more {
        let next = q.offset.unwrap_or(0) + limit;
        if let Ok(v) = HeaderValue::from_str(&next.to_string()) {
            resp.headers_mut().insert("x-next-offset", v);
        }
    }
    Ok(resp)
}

async fn get_one(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<ReadQuery>,
) -> Result<Json<wire::Sandbox>, ApiError> {
    wire::check_sandbox_id(&id).map_err(|e| ApiError::bad_request(e.0))?;
    s.before_read(&q).await?;
    let sb = s.replica.store().get_sandbox(&id).await?;
    if sb.state == SandboxState::Destroyed {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            codes::NOT_FOUND,
            format!("sandbox {id} is destroyed"),
        ));
    }
    let generation = s
        .replica
        .store()
        .get_lease(&id)
        .await
        .map(|l| l.generation)
        .unwrap_or(0);
    Ok(Json(sandbox_view(&sb, generation)))
}

async fn destroy(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<StatusReply>, ApiError> {
    s.control.destroy(&id, &request_id()).await?;
    Ok(Json(StatusReply {
        status: "destroyed".into(),
    }))
}

async fn prune(State(s): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let n = s.control.reaper_pass().await?;
    Ok(Json(serde_json::json!({ "pruned": n })))
}

async fn extend(
    State(s): State<AppState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<wire::ExtendRequest>,
) -> Result<Json<wire::Sandbox>, ApiError> {
    let ttl = req
        .ttl
        .parse()
        .map_err(|e| ApiError::bad_request(format!("ttl: {e}")))?;
    let sb = s.control.extend(&id, ttl).await?;
    let generation = s
        .replica
        .store()
        .get_lease(&id)
        .await
        .map(|l| l.generation)
        .unwrap_or(0);
    Ok(Json(sandbox_view(&sb, generation)))
}

async fn stats(Path(_id): Path<String>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "supported": false }))
}

// ---------------------------------------------------------------- exec

/// Checks an exec request and pins its timeout (bounded by quota or config).
async fn prepare_exec(s: &AppState, route: &Route, req: &mut ExecRequest) -> Result<(), ApiError> {
    crate::agent::exec_spec(req).map_err(ApiError::bad_request)?;
    let asked = match &req.timeout {
        Some(t) => Some(
            t.parse()
                .map_err(|e| ApiError::bad_request(format!("timeout: {e}")))?,
        ),
        None => None,
    };
    let t = s
        .control
        .exec_timeout(&route.sandbox.owner_id, asked)
        .await?;
    req.timeout = t.map(|d| wire::DurationValue::Text(format!("{}ms", d.as_millis())));
    Ok(())
}

async fn exec(
    State(s): State<AppState>,
    Path(id): Path<String>,
    ApiJson(mut req): ApiJson<ExecRequest>,
) -> Result<Response, ApiError> {
    let route = s.control.route(&id, &request_id()).await?;
    prepare_exec(&s, &route, &mut req).await?;
    s.control
        .counters
        .execs
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if req.stream {
        let resp = s
            .control
            .rpc
            .exec_stream(&route.target, &id, &req)
            .await
            .map_err(ControlError::from)?;
        let body = relay_ndjson(resp.bytes_stream());
        return Ok((
            [
                ("content-type", "application/x-ndjson"),
                ("cache-control", "no-cache"),
            ],
            Body::from_stream(body),
        )
            .into_response());
    }
    let timeout = req.timeout.as_ref().and_then(|t| t.parse().ok());
    let res = s
        .control
        .rpc
        .exec(&route.target, &id, &req, timeout)
        .await
        .map_err(ControlError::from)?;
    record_exec(&s, &id, &req, &res);
    if res.timed_out {
        return Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            codes::TIMEOUT,
            format!(
                "exec timed out after {}; the process tree was killed",
                res.duration
            ),
        ));
    }
    Ok(Json(res).into_response())
}

/// Appends the exec log through Raft, off the request path.
fn record_exec(s: &AppState, id: &str, req: &ExecRequest, res: &wire::ExecResult) {
    let cut = |v: &str| v.chars().take(64 * 1024).collect::<String>();
    let log = ExecLog {
        id: 0,
        sandbox_id: id.to_string(),
        command: cut(&stacyvm_runtimes::shell_line(&req.command, &req.args)),
        exit_code: i64::from(res.exit_code),
        stdout: cut(&res.stdout),
        stderr: cut(&res.stderr),
        duration_ms: i64::try_from(res.duration_ms).unwrap_or(i64::MAX),
        created_at: Ts::now(),
    };
    let replica = s.replica.clone();
    tokio::spawn(async move {
        if let Err(e) = replica
            .write(stacyvm_raft::codec::Command::Store(vec![
                Mutation::AppendExecLog(log),
            ]))
            .await
        {
            tracing::debug!(error = %e, "exec log not recorded");
        }
    });
}

/// Relays a worker's NDJSON exec stream; if the worker goes away before the
/// exit line, the stream ends with an error line instead of silently.
fn relay_ndjson(
    body: impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send + 'static,
) -> impl futures::Stream<Item = Result<bytes::Bytes, Infallible>> + Send + 'static {
    let lines = stacyvm_client::ndjson_lines::<ExecStreamLine>(body);
    let mut ended = false;
    lines
        .map(Some)
        .chain(futures::stream::once(async { None }))
        .filter_map(move |item| {
            let out = match item {
                Some(Ok(line)) => {
                    if line.exit_code.is_some() || line.error.is_some() {
                        ended = true;
                    }
                    Some(crate::agent::ndjson(&line))
                }
                Some(Err(e)) if !ended => {
                    ended = true;
                    Some(crate::agent::ndjson(&worker_gone(&e.to_string())))
                }
                None if !ended => {
                    ended = true;
                    Some(crate::agent::ndjson(&worker_gone(
                        "the stream ended without an exit code",
                    )))
                }
                _ => None,
            };
            futures::future::ready(out.map(Ok))
        })
}

fn worker_gone(why: &str) -> ExecStreamLine {
    ExecStreamLine {
        error: Some(wire::ErrorBody {
            code: codes::WORKER_UNAVAILABLE.into(),
            message: format!("the worker stopped answering mid-exec: {why}"),
            request_id: request_id(),
        }),
        ..Default::default()
    }
}

async fn exec_ws(
    State(s): State<AppState>,
    Path(id): Path<String>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    // Fail before upgrading when the sandbox cannot be reached at all.
    let route = s.control.route(&id, &request_id()).await?;
    let rid = request_id();
    Ok(ws
        .max_message_size(crate::api::MAX_BODY)
        .on_upgrade(move |socket| ws_session(s, route, id, socket, rid)))
}

async fn ws_session(s: AppState, route: Route, id: String, mut socket: WebSocket, rid: String) {
    let send_line = |line: &ExecStreamLine| {
        Message::Text(serde_json::to_string(line).unwrap_or_default().into())
    };
    let first = tokio::time::timeout(Duration::from_secs(30), socket.recv()).await;
    let mut req: ExecRequest = match first {
        Ok(Some(Ok(Message::Text(t)))) => match serde_json::from_str(&t) {
            Ok(r) => r,
            Err(e) => {
                let _ = socket
                    .send(send_line(&error_line(
                        codes::BAD_REQUEST,
                        &format!("first frame must be an exec request: {e}"),
                        &rid,
                    )))
                    .await;
                return;
            }
        },
        _ => {
            let _ = socket
                .send(send_line(&error_line(
                    codes::BAD_REQUEST,
                    "first frame must be an exec request (text)",
                    &rid,
                )))
                .await;
            return;
        }
    };
    if let Err(e) = prepare_exec(&s, &route, &mut req).await {
        let _ = socket
            .send(send_line(&error_line(e.code(), e.message(), &rid)))
            .await;
        return;
    }
    let resp = match s.control.rpc.exec_stream(&route.target, &id, &req).await {
        Ok(r) => r,
        Err(e) => {
            let _ = socket
                .send(send_line(&error_line(e.code(), &e.to_string(), &rid)))
                .await;
            return;
        }
    };
    let mut lines = Box::pin(stacyvm_client::ndjson_lines::<ExecStreamLine>(
        resp.bytes_stream(),
    ));
    let mut exit = None;
    while let Some(item) = lines.next().await {
        let line = match item {
            Ok(l) => l,
            Err(e) => worker_gone(&e.to_string()),
        };
        let done = line.exit_code.is_some() || line.error.is_some();
        if line.exit_code.is_some() {
            exit = line.exit_code;
        }
        if socket.send(send_line(&line)).await.is_err() {
            return; // client went away; dropping the stream stops the exec
        }
        if done {
            break;
        }
    }
    let done = ExecStreamLine {
        kind: Some("done".into()),
        exit_code: exit,
        ..Default::default()
    };
    let _ = socket.send(send_line(&done)).await;
    let _ = socket.send(Message::Close(None)).await;
}

fn error_line(code: &str, message: &str, rid: &str) -> ExecStreamLine {
    ExecStreamLine {
        error: Some(wire::ErrorBody {
            code: code.into(),
            message: message.into(),
            request_id: rid.into(),
        }),
        ..Default::default()
    }
}

// ---------------------------------------------------------------- files, logs

fn check_path_param(raw: Option<&str>) -> Result<(), ApiError> {
    let Some(q) = raw else { return Ok(()) };
    for (k, v) in url::form_urlencoded::parse(q.as_bytes()) {
        if matches!(k.as_ref(), "path" | "pattern") && v.split('/').any(|c| c == "..") {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                codes::INVALID_PATH,
                format!("{k} {v:?}: `..` is not allowed"),
            ));
        }
    }
    Ok(())
}

/// Relays a file or log call to the owner, bodies streamed both ways.
async fn relay(
    s: &AppState,
    id: &str,
    method: Method,
    suffix: &str,
    raw_query: Option<String>,
    body: Option<Body>,
    json: Option<serde_json::Value>,
) -> Result<Response, ApiError> {
    check_path_param(raw_query.as_deref())?;
    let route = s.control.route(id, &request_id()).await?;
    let path = match &raw_query {
        Some(q) => format!("/sandboxes/{id}{suffix}?{q}"),
        None => format!("/sandboxes/{id}{suffix}"),
    };
    let body = body.map(|b| reqwest::Body::wrap_stream(b.into_data_stream()));
    let resp = s
        .control
        .rpc
        .files(&route.target, method, &path, body, json)
        .await
        .map_err(ControlError::from)?;
    let status = resp.status();
    let mut headers = HeaderMap::new();
    for h in ["content-type", "content-length"] {
        if let Some(v) = resp.headers().get(h) {
            headers.insert(h, v.clone());
        }
    }
    Ok((status, headers, Body::from_stream(resp.bytes_stream())).into_response())
}

async fn file_get(
    State(s): State<AppState>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    relay(&s, &id, Method::GET, "/files", q, None, None).await
}

async fn file_put(
    State(s): State<AppState>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
    body: Body,
) -> Result<Response, ApiError> {
    relay(&s, &id, Method::PUT, "/files", q, Some(body), None).await
}

/// The earlier JSON upload (`{path, content, mode}`; text content).
async fn file_post(
    State(s): State<AppState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<wire::WriteFileRequest>,
) -> Result<Response, ApiError> {
    let mut q = format!("path={}", stacyvm_client::enc(&req.path));
    if let Some(m) = &req.mode {
        q.push_str(&format!(
            "&mode={:o}",
            m.bits().map_err(ApiError::bad_request)?
        ));
    }
    relay(
        &s,
        &id,
        Method::PUT,
        "/files",
        Some(q),
        Some(Body::from(req.content)),
        None,
    )
    .await
}

async fn file_delete(
    State(s): State<AppState>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    relay(&s, &id, Method::DELETE, "/files", q, None, None).await
}

async fn file_list(
    State(s): State<AppState>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    relay(&s, &id, Method::GET, "/files/list", q, None, None).await
}

async fn file_stat(
    State(s): State<AppState>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    relay(&s, &id, Method::GET, "/files/stat", q, None, None).await
}

async fn file_glob(
    State(s): State<AppState>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    relay(&s, &id, Method::GET, "/files/glob", q, None, None).await
}

async fn file_move(
    State(s): State<AppState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<wire::MoveRequest>,
) -> Result<Response, ApiError> {
    if [&req.old_path, &req.new_path]
        .iter()
        .any(|p| p.split('/').any(|c| c == ".."))
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            codes::INVALID_PATH,
            "`..` is not allowed in paths",
        ));
    }
    let json = serde_json::to_value(&req).ok();
    relay(&s, &id, Method::POST, "/files/move", None, None, json).await
}

async fn file_chmod(
    State(s): State<AppState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<wire::ChmodRequest>,
) -> Result<Response, ApiError> {
    if req.path.split('/').any(|c| c == "..") {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            codes::INVALID_PATH,
            "`..` is not allowed in paths",
        ));
    }
    req.mode.bits().map_err(ApiError::bad_request)?;
    let json = serde_json::to_value(&req).ok();
    relay(&s, &id, Method::POST, "/files/chmod", None, None, json).await
}

async fn logs(
    State(s): State<AppState>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    relay(&s, &id, Method::GET, "/logs", q, None, None).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecLogQuery {
    limit: Option<i64>,
}

async fn exec_logs(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<ExecLogQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    wire::check_sandbox_id(&id).map_err(|e| ApiError::bad_request(e.0))?;
    s.replica.read_barrier().await?;
    let rows = s
        .replica
        .store()
        .list_exec_logs(&id, Some(q.limit.unwrap_or(100).clamp(1, 1000)))
        .await?;
    let out: Vec<serde_json::Value> = rows
        .into_iter()
        .map(|l| serde_json::json!({"id": l.id, "command": l.command, "exit_code": l.exit_code, "stdout": l.stdout, "stderr": l.stderr, "duration_ms": l.duration_ms, "created_at": rfc3339(l.created_at)}))
        .collect();
    Ok(Json(serde_json::json!({ "exec_logs": out })))
}

// ---------------------------------------------------------------- templates

fn template_view(t: &Template) -> wire::Template {
    wire::Template {
        name: t.name.clone(),
        version: t.version,
        image: t.image.clone(),
        description: t.description.clone(),
        runtime: t.runtime.clone(),
        setup: t.setup.clone(),
        allowed_hosts: t.allowed_hosts.clone(),
        env: t.env.clone(),
        memory_mb: t.memory_mb,
        cpu_cores: t.vcpus,
        ttl_seconds: t.ttl_seconds,
        created_at: rfc3339(t.created_at),
        updated_at: rfc3339(t.updated_at),
    }
}

fn template_record(w: &wire::Template, version: i64) -> Result<Template, ApiError> {
    wire::check_name("template name", &w.name).map_err(|e| ApiError::bad_request(e.0))?;
    if w.image.is_empty() {
        return Err(ApiError::bad_request("image is required"));
    }
    let now = Ts::now();
    Ok(Template {
        name: w.name.clone(),
        version,
        image: w.image.clone(),
        description: w.description.clone(),
        runtime: w.runtime.clone(),
        setup: w.setup.clone(),
        allowed_hosts: w.allowed_hosts.clone(),
        env: w.env.clone(),
        memory_mb: if w.memory_mb == 0 { 512 } else { w.memory_mb },
        vcpus: if w.cpu_cores == 0 { 1 } else { w.cpu_cores },
        ttl_seconds: if w.ttl_seconds == 0 {
            300
        } else {
            w.ttl_seconds
        },
        created_at: now,
        updated_at: now,
    })
}

async fn templates_list(
    State(s): State<AppState>,
    Query(q): Query<ReadQuery>,
) -> Result<Json<Vec<wire::Template>>, ApiError> {
    s.before_read(&q).await?;
    Ok(Json(
        s.replica
            .store()
            .list_templates()
            .await?
            .iter()
            .map(template_view)
            .collect(),
    ))
}

async fn template_create(
    State(s): State<AppState>,
    ApiJson(t): ApiJson<wire::Template>,
) -> Result<Response, ApiError> {
    let rec = template_record(&t, 1)?;
    s.write_one(Mutation::CreateTemplate(rec.clone())).await?;
    Ok((StatusCode::CREATED, Json(template_view(&rec))).into_response())
}

async fn template_get(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<ReadQuery>,
) -> Result<Json<wire::Template>, ApiError> {
    s.before_read(&q).await?;
    Ok(Json(template_view(
        &s.replica.store().get_template(&name).await?,
    )))
}

async fn template_put(
    State(s): State<AppState>,
    Path(name): Path<String>,
    ApiJson(mut t): ApiJson<wire::Template>,
) -> Result<Json<wire::Template>, ApiError> {
    if t.name.is_empty() {
        t.name = name.clone();
    }
    if t.name != name {
        return Err(ApiError::bad_request("the body's name must match the path"));
    }
    s.replica.read_barrier().await?;
    let old = s.replica.store().get_template(&name).await?;
    let mut rec = template_record(&t, old.version + 1)?;
    rec.created_at = old.created_at;
    s.write_one(Mutation::UpdateTemplate(rec.clone())).await?;
    Ok(Json(template_view(&rec)))
}

async fn template_delete(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<StatusReply>, ApiError> {
    s.replica.read_barrier().await?;
    s.replica.store().get_template(&name).await?;
    s.write_one(Mutation::DeleteTemplate { name }).await?;
    Ok(Json(StatusReply {
        status: "deleted".into(),
    }))
}

async fn template_spawn(
    State(s): State<AppState>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<wire::TemplateSpawnRequest>,
) -> Result<Response, ApiError> {
    let spawn = wire::SpawnRequest {
        runtime: req.runtime,
        ttl: req.ttl,
        owner_id: req.owner_id,
        template: name,
        ..Default::default()
    };
    let plan = s.control.plan_spawn(&spawn).await?;
    let (sb, generation) = s.control.spawn(plan, &request_id()).await?;
    Ok((StatusCode::CREATED, Json(sandbox_view(&sb, generation))).into_response())
}

// ---------------------------------------------------------------- quotas

fn quota_view(q: &OwnerQuota) -> wire::Quota {
    let d =
        |secs: i64| wire::format_duration(Duration::from_secs(u64::try_from(secs).unwrap_or(0)));
    wire::Quota {
        owner_id: q.owner_id.clone(),
        max_sandboxes: q.max_sandboxes,
        max_ttl: d(q.max_ttl_seconds),
        max_exec_timeout: d(q.max_exec_timeout_seconds),
        created_at: rfc3339(q.created_at),
        updated_at: rfc3339(q.updated_at),
    }
}

async fn quotas_list(
    State(s): State<AppState>,
    Query(q): Query<ReadQuery>,
) -> Result<Json<Vec<wire::Quota>>, ApiError> {
    s.before_read(&q).await?;
    Ok(Json(
        s.replica
            .store()
            .list_quotas()
            .await?
            .iter()
            .map(quota_view)
            .collect(),
    ))
}

async fn quota_get(
    State(s): State<AppState>,
    Path(owner): Path<String>,
    Query(q): Query<ReadQuery>,
) -> Result<Json<wire::Quota>, ApiError> {
    s.before_read(&q).await?;
    Ok(Json(quota_view(
        &s.replica.store().get_quota(&owner).await?,
    )))
}

fn whole_seconds(what: &str, v: &Option<wire::DurationValue>) -> Result<i64, ApiError> {
    let Some(v) = v else { return Ok(0) };
    if matches!(v, wire::DurationValue::Text(t) if t.is_empty() || t == "0" || t == "0s") {
        return Ok(0);
    }
    let d = v
        .parse()
        .map_err(|e| ApiError::bad_request(format!("{what}: {e}")))?;
    if d.subsec_millis() != 0 || d.is_zero() {
        return Err(ApiError::bad_request(format!(
            "{what} must be whole seconds, at least 1s"
        )));
    }
    i64::try_from(d.as_secs()).map_err(|_| ApiError::bad_request(format!("{what} is too large")))
}

async fn quota_put(
    State(s): State<AppState>,
    Path(owner): Path<String>,
    ApiJson(req): ApiJson<wire::QuotaRequest>,
) -> Result<Json<wire::Quota>, ApiError> {
    wire::check_name("owner", &owner).map_err(|e| ApiError::bad_request(e.0))?;
    if req.max_sandboxes < 0 {
        return Err(ApiError::bad_request("max_sandboxes must be >= 0"));
    }
    let now = Ts::now();
    let q = OwnerQuota {
        owner_id: owner,
        max_sandboxes: req.max_sandboxes,
        max_ttl_seconds: whole_seconds("max_ttl", &req.max_ttl)?,
        max_exec_timeout_seconds: whole_seconds("max_exec_timeout", &req.max_exec_timeout)?,
        created_at: now,
        updated_at: now,
    };
    s.write_one(Mutation::PutQuota(q.clone())).await?;
    Ok(Json(quota_view(&q)))
}

async fn quota_delete(
    State(s): State<AppState>,
    Path(owner): Path<String>,
) -> Result<Json<StatusReply>, ApiError> {
    s.replica.read_barrier().await?;
    s.replica.store().get_quota(&owner).await?;
    s.write_one(Mutation::DeleteQuota { owner_id: owner })
        .await?;
    Ok(Json(StatusReply {
        status: "deleted".into(),
    }))
}

// ---------------------------------------------------------------- workers

async fn workers_list(State(s): State<AppState>) -> Result<Json<Vec<wire::Worker>>, ApiError> {
    Ok(Json(s.control.workers().await?))
}

async fn worker_get(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<wire::Worker>, ApiError> {
    Ok(Json(s.control.worker(&id).await?))
}

async fn worker_drain(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<wire::Worker>, ApiError> {
    Ok(Json(s.control.set_draining(&id, true).await?))
}

async fn worker_undrain(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<wire::Worker>, ApiError> {
    Ok(Json(s.control.set_draining(&id, false).await?))
}

async fn worker_remove(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<StatusReply>, ApiError> {
    s.control.remove_worker(&id).await?;
    Ok(Json(StatusReply {
        status: "deleted".into(),
    }))
}

/// `POST /api/v1/worker/{id}/heartbeat`. Not forwarded: a follower answers
/// `421 NOT_LEADER` with the leader's address, and the worker goes there.
async fn heartbeat(
    State(s): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    axum::Extension(caller): axum::Extension<crate::api::Caller>,
    ApiJson(req): ApiJson<wire::HeartbeatRequest>,
) -> Result<Json<wire::HeartbeatReply>, ApiError> {
    // The credential names the worker (X-Worker-ID); the path must agree,
    // and renewing leases needs `worker:lease`.
    let identity = match &caller {
        crate::api::Caller::Worker(w) => Some(w.clone()),
        _ => None,
    };
    if let Some(w) = &identity {
        if w.worker_id != id {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                codes::FORBIDDEN,
                "credential is for another worker",
            ));
        }
        if !req.leases.is_empty() && !w.scopes.contains("worker:lease") {
            return Err(
                stacyvm_auth::AuthError::Token(stacyvm_auth::TokenError::MissingScope(
                    "worker:lease".into(),
                ))
                .into(),
            );
        }
    }
    let named = headers
        .get(wire::WORKER_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or(&id);
    if named != id {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            codes::FORBIDDEN,
            "X-Worker-ID does not match the path",
        ));
    }
    match s.control.heartbeat(&id, req).await {
        Ok(mut r) => {
            let wa = s.auth.worker_auth()?;
            // RPC verification keys go only to a worker whose credential is
            // bound to its ID: the shared token could claim any ID.
            if identity
                .as_ref()
                .is_some_and(stacyvm_auth::WorkerIdentity::is_bound)
            {
                r.rpc_keys = wa.rpc_keys(&id).iter().map(hex::encode).collect();
            }
            let mut revoked: Vec<String> = wa.revoked.iter().cloned().collect();
            if let Ok(rows) = s.replica.store().list_revoked_tokens().await {
                revoked.extend(rows.into_iter().map(|r| r.jti));
            }
            r.revoked_token_ids = revoked;
            Ok(Json(r))
        }
        Err(ControlError::NotLeader) => Err(ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            codes::NOT_LEADER,
            "this replica is not the leader; see X-StacyVM-Leader",
        )),
        Err(e) => Err(e.into()),
    }
}

// ---------------------------------------------------------------- worker tokens

async fn issue_token(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<wire::IssueTokenRequest>,
) -> Result<Response, ApiError> {
    use stacyvm_auth::token;
    wire::check_name("worker_id", &req.worker_id).map_err(|e| ApiError::bad_request(e.0))?;
    let ttl = match &req.ttl {
        Some(t) => t
            .parse()
            .map_err(|e| ApiError::bad_request(format!("ttl: {e}")))?,
        None => Duration::from_secs(300),
    };
    if ttl.is_zero() || ttl.as_secs() > token::MAX_LIFETIME_S as u64 {
        return Err(ApiError::bad_request("ttl must be between 1s and 15m"));
    }
    let audience = if req.audience.is_empty() {
        token::AUD_CONTROL_PLANE.to_string()
    } else {
        req.audience.clone()
    };
    if audience != token::AUD_CONTROL_PLANE && audience != token::AUD_RPC {
        return Err(ApiError::bad_request(format!(
            "audience must be {} or {}",
            token::AUD_CONTROL_PLANE,
            token::AUD_RPC
        )));
    }
    let scopes: Vec<&str> = if req.scopes.is_empty() {
        vec!["worker:heartbeat", "worker:lease"]
    } else {
        req.scopes.iter().map(String::as_str).collect()
    };
    if let Some(bad) = scopes.iter().find(|s| !token::SCOPES.contains(s)) {
        return Err(ApiError::bad_request(format!(
            "unknown scope {bad:?}; known: {}",
            token::SCOPES.join(", ")
        )));
    }
    let wa = s.auth.worker_auth()?;
    let now = Ts::now().micros() / 1_000_000;
    let claims = token::claims_for(
        &req.worker_id,
        &audience,
        &scopes,
        now,
        i64::try_from(ttl.as_secs()).unwrap_or(0),
    );
    let t = wa.issue(&claims).map_err(|e| match e {
        token::TokenError::NoKey => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            codes::UNAVAILABLE,
            "no worker signing key is configured",
        ),
        e => ApiError::bad_request(e.to_string()),
    })?;
    let ts = |sec: i64| rfc3339(Ts(sec.saturating_mul(1_000_000)));
    let out = wire::IssuedToken {
        token: t,
        token_id: claims.jti.clone(),
        worker_id: claims.worker_id.clone(),
        audience,
        scopes: claims.scopes.clone(),
        issued_at: ts(claims.iat),
        expires_at: ts(claims.exp),
    };
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

fn random_secret(prefix: &str) -> String {
    format!("{prefix}{}", hex::encode(rand::random::<[u8; 32]>()))
}

async fn create_enrollment(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<wire::EnrollmentRequest>,
) -> Result<Response, ApiError> {
    wire::check_name("worker_id", &req.worker_id).map_err(|e| ApiError::bad_request(e.0))?;
    let ttl = match &req.ttl {
        Some(t) => t
            .parse()
            .map_err(|e| ApiError::bad_request(format!("ttl: {e}")))?,
        None => Duration::from_secs(600),
    };
    if ttl.is_zero() || ttl > Duration::from_secs(3600) {
        return Err(ApiError::bad_request("ttl must be between 1s and 1h"));
    }
    // Replicas authenticate to an enrolled worker's RPC with tokens made from
    // its derived key, which exists only under a signing key.
    let wa = s.auth.worker_auth()?;
    if wa.signing_key.as_ref().is_none_or(|k| k.is_empty()) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            codes::UNAVAILABLE,
            "enrollment needs auth.worker_signing_key: replicas call enrolled workers with RPC tokens derived from it",
        ));
    }
    let secret = random_secret(wire::ENROLL_PREFIX);
    let now = Ts::now();
    let expires_at = now.plus_millis(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
    s.write_one(Mutation::CreateEnrollment(stacyvm_store::Enrollment {
        token_hash: stacyvm_auth::hash_secret(&secret),
        worker_id: req.worker_id.clone(),
        created_at: now,
        expires_at,
        used_at: None,
    }))
    .await?;
    let out = wire::EnrollmentIssued {
        enroll_token: secret,
        worker_id: req.worker_id,
        expires_at: rfc3339(expires_at),
    };
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

/// `POST /api/v1/worker/{id}/enroll`: the enrollment secret is the credential;
/// it is consumed (one Raft entry, race-free) and a per-worker credential is
/// returned once. The cluster keeps only hashes of both.
async fn enroll(
    State(s): State<AppState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<wire::EnrollRequest>,
) -> Result<Json<wire::EnrollReply>, ApiError> {
    wire::check_name("worker id", &id).map_err(|e| ApiError::bad_request(e.0))?;
    let refuse = |status: StatusCode, code: &'static str, reason: &'static str, msg: &str| {
        let mut e = ApiError::new(status, code, msg);
        e.set_reason(reason);
        e
    };
    if !req.enroll_token.starts_with(wire::ENROLL_PREFIX) || req.enroll_token.len() > 256 {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            codes::UNAUTHORIZED,
            "enroll_invalid",
            "not an enrollment secret",
        ));
    }
    let credential = random_secret(wire::CREDENTIAL_PREFIX);
    let m = Mutation::ConsumeEnrollment {
        token_hash: stacyvm_auth::hash_secret(&req.enroll_token),
        worker_id: id.clone(),
        credential_hash: stacyvm_auth::hash_secret(&credential),
        now: Ts::now(),
    };
    match s.write_one(m).await {
        Ok(_) => Ok(Json(wire::EnrollReply {
            worker_id: id,
            worker_token: credential,
        })),
        Err(e) if e.code() == codes::NOT_FOUND => Err(refuse(
            StatusCode::UNAUTHORIZED,
            codes::UNAUTHORIZED,
            "enroll_invalid",
            "unknown enrollment secret",
        )),
        Err(e) if e.code() == codes::CONFLICT => {
            let reason = if e.message().contains("already used") {
                "enroll_reused"
            } else if e.message().contains("expired") {
                "enroll_expired"
            } else {
                "enroll_wrong_worker"
            };
            Err(refuse(
                StatusCode::FORBIDDEN,
                codes::FORBIDDEN,
                reason,
                "enrollment secret refused (used, expired, or for another worker)",
            ))
        }
        Err(e) => Err(e),
    }
}

async fn revoke_token(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<wire::RevokeTokenRequest>,
) -> Result<Json<StatusReply>, ApiError> {
    if req.token_id.is_empty()
        || req.token_id.len() > 128
        || !req.token_id.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(ApiError::bad_request(
            "token_id must be 1 to 128 printable characters",
        ));
    }
    let now = Ts::now();
    let row = stacyvm_store::RevokedToken {
        jti: req.token_id,
        reason: req.reason.chars().take(500).collect(),
        revoked_at: now,
        // No token outlives 15 minutes (+ skew): the row can go after that.
        expires_at: now.plus_millis(
            (stacyvm_auth::token::MAX_LIFETIME_S + stacyvm_auth::token::SKEW_S) * 1000,
        ),
    };
    s.write_one(Mutation::RevokeToken(row)).await?;
    Ok(Json(StatusReply {
        status: "revoked".into(),
    }))
}

async fn revoked_tokens(
    State(s): State<AppState>,
    Query(q): Query<ReadQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    s.before_read(&q).await?;
    let rows = s.replica.store().list_revoked_tokens().await?;
    let ids: Vec<serde_json::Value> = rows
        .into_iter()
        .map(|r| serde_json::json!({"token_id": r.jti, "reason": r.reason, "revoked_at": rfc3339(r.revoked_at), "expires_at": rfc3339(r.expires_at)}))
        .collect();
    Ok(Json(serde_json::json!({ "revoked": ids })))
}

// ---------------------------------------------------------------- events, metrics

async fn events(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (replay, rx) = s.events.subscribe(last.as_deref());
    let to_sse = |e: &wire::Event| {
        SseEvent::default()
            .id(e.id.clone())
            .event(e.kind.clone())
            .data(serde_json::to_string(e).unwrap_or_default())
    };
    let replay = futures::stream::iter(
        replay
            .into_iter()
            .map(move |e| Ok::<_, Infallible>(to_sse(&e))),
    );
    let live = tokio_stream::wrappers::BroadcastStream::new(rx)
        .take_while(|r| futures::future::ready(r.is_ok()))
        .filter_map(move |r| {
            futures::future::ready(r.ok().map(|e| Ok::<_, Infallible>(to_sse(&e))))
        });
    Sse::new(replay.chain(live))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

async fn prometheus(State(s): State<AppState>) -> Response {
    use std::fmt::Write as _;
    use std::sync::atomic::Ordering::Relaxed;
    let c = &s.control.counters;
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, v: u64| {
        let _ = writeln!(
            out,
            "# HELP stacyvm_{name} {help}\n# TYPE stacyvm_{name} counter\nstacyvm_{name} {v}"
        );
    };
    counter(
        "spawns_total",
        "Spawns that succeeded on this replica while it led.",
        c.spawns_ok.load(Relaxed),
    );
    counter(
        "spawn_failures_total",
        "Spawns that failed after placement.",
        c.spawns_failed.load(Relaxed),
    );
    counter(
        "spawn_refusals_total",
        "Spawns refused by admission or placement.",
        c.spawns_refused.load(Relaxed),
    );
    counter(
        "spawn_queued_total",
        "Spawns that waited in the queue.",
        c.spawn_queued.load(Relaxed),
    );
    counter(
        "spawn_queue_timeouts_total",
        "Spawns that gave up waiting in the queue.",
        c.spawn_queue_timeouts.load(Relaxed),
    );
    counter(
        "destroys_total",
        "Sandboxes destroyed.",
        c.destroys.load(Relaxed),
    );
    counter(
        "execs_total",
        "Execs relayed by this replica.",
        c.execs.load(Relaxed),
    );
    counter(
        "workers_declared_offline_total",
        "Workers this replica declared offline.",
        c.workers_declared_offline.load(Relaxed),
    );
    counter(
        "sandboxes_marked_lost_total",
        "Sandboxes marked lost.",
        c.sandboxes_marked_lost.load(Relaxed),
    );
    counter(
        "sandboxes_reaped_total",
        "Expired sandboxes the reaper destroyed.",
        c.reaped.load(Relaxed),
    );
    let m = s.replica.raft().metrics().borrow().clone();
    let is_leader = u8::from(s.replica.is_leader());
    let _ = writeln!(
        out,
        "# HELP stacyvm_raft_is_leader 1 when this replica leads.\n# TYPE stacyvm_raft_is_leader gauge\nstacyvm_raft_is_leader {is_leader}"
    );
    let _ = writeln!(
        out,
        "# HELP stacyvm_raft_term Current Raft term.\n# TYPE stacyvm_raft_term gauge\nstacyvm_raft_term {}",
        m.current_term
    );
    let _ = writeln!(
        out,
        "# HELP stacyvm_raft_applied_index Last applied log index.\n# TYPE stacyvm_raft_applied_index gauge\nstacyvm_raft_applied_index {}",
        m.last_applied.map(|l| l.index).unwrap_or(0)
    );
    if let Some((total, inflight)) = s.control.leader_counts() {
        let _ = writeln!(
            out,
            "# HELP stacyvm_sandboxes_active Sandboxes occupying a slot (leader only).\n# TYPE stacyvm_sandboxes_active gauge\nstacyvm_sandboxes_active {total}"
        );
        let _ = writeln!(
            out,
            "# HELP stacyvm_spawns_in_flight Spawns between placement and running (leader only).\n# TYPE stacyvm_spawns_in_flight gauge\nstacyvm_spawns_in_flight {inflight}"
        );
    }
    ([("content-type", "text/plain; version=0.0.4")], out).into_response()
}

// ---------------------------------------------------------------- router

/// Routes decided by the leader (forwarded by followers).
pub fn leader_routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/api/v1/sandboxes", post(spawn).delete(prune))
        .route("/api/v1/sandboxes/{id}", axum::routing::delete(destroy))
        .route("/api/v1/sandboxes/{id}/extend", post(extend))
        .route("/api/v1/templates/{name}/spawn", post(template_spawn))
        .route("/api/v1/workers", get(workers_list))
        .route(
            "/api/v1/workers/{id}",
            get(worker_get).delete(worker_remove),
        )
        .route("/api/v1/workers/{id}/drain", post(worker_drain))
        .route("/api/v1/workers/{id}/undrain", post(worker_undrain))
        .route("/api/v1/admin/workers", get(workers_list))
        .route(
            "/api/v1/admin/workers/{id}",
            get(worker_get).delete(worker_remove),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state,
            forward_to_leader,
        ))
}

/// Routes any replica serves itself.
pub fn local_routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/sandboxes", get(list))
        .route("/api/v1/sandboxes/{id}", get(get_one))
        .route("/api/v1/sandboxes/{id}/exec", post(exec))
        .route("/api/v1/sandboxes/{id}/exec/ws", get(exec_ws))
        .route("/api/v1/sandboxes/{id}/exec-logs", get(exec_logs))
        .route(
            "/api/v1/sandboxes/{id}/files",
            get(file_get)
                .put(file_put)
                .post(file_post)
                .delete(file_delete),
        )
        .route("/api/v1/sandboxes/{id}/files/list", get(file_list))
        .route("/api/v1/sandboxes/{id}/files/stat", get(file_stat))
        .route("/api/v1/sandboxes/{id}/files/glob", get(file_glob))
        .route("/api/v1/sandboxes/{id}/files/move", post(file_move))
        .route("/api/v1/sandboxes/{id}/files/chmod", post(file_chmod))
        .route("/api/v1/sandboxes/{id}/logs", get(logs))
        .route("/api/v1/sandboxes/{id}/stats", get(stats))
        .route(
            "/api/v1/templates",
            get(templates_list).post(template_create),
        )
        .route(
            "/api/v1/templates/{name}",
            get(template_get).put(template_put).delete(template_delete),
        )
        .route("/api/v1/quotas", get(quotas_list))
        .route("/api/v1/quotas/{owner}", get(quota_get))
        .route("/api/v1/admin/quotas", get(quotas_list))
        .route(
            "/api/v1/admin/quotas/{owner}",
            get(quota_get).put(quota_put).delete(quota_delete),
        )
        .route("/api/v1/worker/{id}/heartbeat", post(heartbeat))
        .route("/api/v1/admin/worker-tokens", post(issue_token))
        .route("/api/v1/admin/worker-enrollments", post(create_enrollment))
        .route("/api/v1/worker/{id}/enroll", post(enroll))
        .route("/api/v1/admin/worker-tokens/revoke", post(revoke_token))
        .route("/api/v1/admin/worker-tokens/revoked", get(revoked_tokens))
        .route("/api/v1/events", get(events))
        .route("/api/v1/metrics/prometheus", get(prometheus))
        .route("/metrics", get(prometheus))
}

/// Upload routes get a larger body limit than the 1 MiB default.
pub fn is_upload(method: &Method, path: &str) -> bool {
    method == Method::PUT && path.starts_with("/api/v1/sandboxes/") && path.ends_with("/files")
}
