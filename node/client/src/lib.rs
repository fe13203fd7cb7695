//! Typed client for the StacyVM REST API.
//!
//! Owns: request building, replica failover and error decoding. A client is
//! given every replica's base URL; a call goes to the last replica that
//! answered and moves to the next one when a replica cannot be reached (the
//! request never left, so retrying is safe even for a spawn) or answers
//! `503 NO_LEADER` (an election is under way: it waits and retries, bounded).
//! A call that timed out is never retried: its outcome is unknown.
//!
//! Does not own: wire types (`stacyvm-api`) or any policy about what to call.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use stacyvm_api::{
    ErrorBody, ExecRequest, ExecResult, ExecStreamLine, ExtendRequest, FileInfo, Sandbox,
    SpawnRequest, StatusReply, Worker, codes,
};

/// How long a call keeps retrying through an election before giving up.
const FAILOVER_BUDGET: Duration = Duration::from_secs(15);

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error body.
    #[error("{} ({}): {}", .body.code, .status, .body.message)]
    Api { status: u16, body: ErrorBody },
    /// No replica could be reached, or the connection broke.
    #[error("transport: {0}")]
    Transport(String),
    /// The server's answer did not parse.
    #[error("unexpected answer: {0}")]
    Decode(String),
    /// Bad client configuration (URL list).
    #[error("{0}")]
    Config(String),
}

impl ClientError {
    /// The API error code, when the server sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { body, .. } => Some(&body.code),
            _ => None,
        }
    }
}

/// A StacyVM API client over one or more replicas.
#[derive(Debug)]
pub struct Client {
    http: reqwest::Client,
    servers: Vec<String>,
    api_key: Option<String>,
    current: AtomicUsize,
}

impl Client {
    /// `servers` is a comma-separated list of base URLs (`http://127.0.0.1:7423`).
    /// `timeout` bounds each whole request (streams excepted: they have none).
    pub fn new(
        servers: &str,
        api_key: Option<String>,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let servers: Vec<String> = servers
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                if s.contains("://") {
                    s.trim_end_matches('/').to_string()
                } else {
                    format!("http://{}", s.trim_end_matches('/'))
                }
            })
            .collect();
        if servers.is_empty() {
            return Err(ClientError::Config("no server URL given".into()));
        }
        for s in &servers {
            reqwest::Url::parse(s)
                .map_err(|e| ClientError::Config(format!("bad server URL {s:?}: {e}")))?;
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .read_timeout(timeout)
            .build()
            .map_err(|e| ClientError::Config(e.to_string()))?;
        Ok(Client {
            http,
            servers,
            api_key: api_key.filter(|k| !k.is_empty()),
            current: AtomicUsize::new(0),
        })
    }

    /// The base URL calls currently go to.
    pub fn server(&self) -> &str {
        &self.servers[self.current.load(Ordering::Relaxed) % self.servers.len()]
    }

    /// Sends a request, failing over between replicas (see the module docs).
    /// `body` is rebuilt for each attempt.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: impl Fn() -> Option<reqwest::Body>,
        content_type: Option<&str>,
    ) -> Result<reqwest::Response, ClientError> {
        let started = Instant::now();
        let n = self.servers.len();
        let mut attempt = 0usize;
        loop {
            let idx = (self.current.load(Ordering::Relaxed) + attempt) % n;
            let url = format!("{}{}", self.servers[idx], path);
            let mut req = self.http.request(method.clone(), &url);
            if let Some(k) = &self.api_key {
                req = req.header("x-api-key", k);
            }
            if let Some(ct) = content_type {
                req = req.header("content-type", ct);
            }
            if let Some(b) = body() {
                req = req.body(b);
            }
            let retry_after = match req.send().await {
                Ok(resp) if resp.status() == StatusCode::SERVICE_UNAVAILABLE => {
                    // Peek at the code without consuming the body for other 503s.
                    let status = resp.status();
                    let bytes = resp
                        .bytes()
                        .await
                        .map_err(|e| ClientError::Transport(e.to_string()))?;
                    let body: ErrorBody = serde_json::from_slice(&bytes).unwrap_or(ErrorBody {
                        code: codes::UNAVAILABLE.into(),
                        message: String::from_utf8_lossy(&bytes).into_owned(),
                        request_id: String::new(),
                    });
                    if body.code != codes::NO_LEADER {
                        return Err(ClientError::Api {
                            status: status.as_u16(),
                            body,
                        });
                    }
                    if started.elapsed() > FAILOVER_BUDGET {
                        return Err(ClientError::Api {
                            status: status.as_u16(),
                            body,
                        });
                    }
                    Duration::from_millis(300)
                }
                Ok(resp) => {
                    self.current.store(idx, Ordering::Relaxed);
                    return Ok(resp);
                }
                Err(e) if e.is_connect() => {
                    if started.elapsed() > FAILOVER_BUDGET {
                        return Err(ClientError::Transport(format!("no replica reachable: {e}")));
                    }
                    if (attempt + 1).is_multiple_of(n) {
                        Duration::from_millis(300)
                    } else {
                        Duration::ZERO
                    }
                }
                Err(e) => return Err(ClientError::Transport(e.to_string())),
            };
            attempt += 1;
            if !retry_after.is_zero() {
                tokio::time::sleep(retry_after).await;
            }
        }
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, ClientError> {
        let bytes = match body {
            Some(b) => Some(serde_json::to_vec(b).map_err(|e| ClientError::Config(e.to_string()))?),
            None => None,
        };
        let resp = self
            .send(
                method,
                path,
                || bytes.clone().map(reqwest::Body::from),
                bytes.as_ref().map(|_| "application/json"),
            )
            .await?;
        decode(resp).await
    }

    pub async fn spawn(&self, req: &SpawnRequest) -> Result<Sandbox, ClientError> {
        self.json(Method::POST, "/api/v1/sandboxes", Some(req))
            .await
    }

    pub async fn get(&self, id: &str) -> Result<Sandbox, ClientError> {
        self.json(Method::GET, &format!("/api/v1/sandboxes/{id}"), None::<&()>)
            .await
    }

    /// `query` is appended as is (`state=running&limit=10`).
    pub async fn list(&self, query: &str) -> Result<Vec<Sandbox>, ClientError> {
        let path = if query.is_empty() {
            "/api/v1/sandboxes".to_string()
        } else {
            format!("/api/v1/sandboxes?{query}")
        };
        self.json(Method::GET, &path, None::<&()>).await
    }

    pub async fn destroy(&self, id: &str) -> Result<StatusReply, ClientError> {
        self.json(
            Method::DELETE,
            &format!("/api/v1/sandboxes/{id}"),
            None::<&()>,
        )
        .await
    }

    pub async fn extend(&self, id: &str, req: &ExtendRequest) -> Result<Sandbox, ClientError> {
        self.json(
            Method::POST,
            &format!("/api/v1/sandboxes/{id}/extend"),
            Some(req),
        )
        .await
    }

    pub async fn exec(&self, id: &str, req: &ExecRequest) -> Result<ExecResult, ClientError> {
        let mut req = req.clone();
        req.stream = false;
        self.json(
            Method::POST,
            &format!("/api/v1/sandboxes/{id}/exec"),
            Some(&req),
        )
        .await
    }

    /// Streams an exec as NDJSON lines; the last line carries the exit code.
    pub async fn exec_stream(
        &self,
        id: &str,
        req: &ExecRequest,
    ) -> Result<impl Stream<Item = Result<ExecStreamLine, ClientError>> + use<>, ClientError> {
        let mut req = req.clone();
        req.stream = true;
        let bytes = serde_json::to_vec(&req).map_err(|e| ClientError::Config(e.to_string()))?;
        let resp = self
            .send(
                Method::POST,
                &format!("/api/v1/sandboxes/{id}/exec"),
                || Some(reqwest::Body::from(bytes.clone())),
                Some("application/json"),
            )
            .await?;
        let resp = check(resp).await?;
        Ok(ndjson_lines(resp.bytes_stream()))
    }

    /// Uploads raw bytes to `path` (binary-safe, streamed).
    pub async fn upload(
        &self,
        id: &str,
        path: &str,
        body: impl Fn() -> reqwest::Body,
        mode: Option<u32>,
    ) -> Result<StatusReply, ClientError> {
        let mut q = format!("path={}", enc(path));
        if let Some(m) = mode {
            q.push_str(&format!("&mode={m:o}"));
        }
        let resp = self
            .send(
                Method::PUT,
                &format!("/api/v1/sandboxes/{id}/files?{q}"),
                || Some(body()),
                Some("application/octet-stream"),
            )
            .await?;
        decode(resp).await
    }

    /// Downloads `path`; the response body streams the file's bytes.
    pub async fn download(&self, id: &str, path: &str) -> Result<reqwest::Response, ClientError> {
        let resp = self
            .send(
                Method::GET,
                &format!("/api/v1/sandboxes/{id}/files?path={}", enc(path)),
                || None,
                None,
            )
            .await?;
        check(resp).await
    }

    pub async fn list_files(&self, id: &str, path: &str) -> Result<Vec<FileInfo>, ClientError> {
        self.json(
            Method::GET,
            &format!("/api/v1/sandboxes/{id}/files/list?path={}", enc(path)),
            None::<&()>,
        )
        .await
    }

    pub async fn workers(&self) -> Result<Vec<Worker>, ClientError> {
        self.json(Method::GET, "/api/v1/workers", None::<&()>).await
    }

    /// `action` is `drain` or `undrain`.
    pub async fn worker_action(&self, id: &str, action: &str) -> Result<Worker, ClientError> {
        self.json(
            Method::POST,
            &format!("/api/v1/workers/{id}/{action}"),
            None::<&()>,
        )
        .await
    }

    pub async fn cluster_status(&self) -> Result<serde_json::Value, ClientError> {
        self.json(Method::GET, "/api/v1/cluster/status", None::<&()>)
            .await
    }
}

/// Percent-encodes a query value.
pub fn enc(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Turns an error status into [`ClientError::Api`].
pub async fn check(resp: reqwest::Response) -> Result<reqwest::Response, ClientError> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status().as_u16();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| ClientError::Transport(e.to_string()))?;
    let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| ErrorBody {
        code: codes::INTERNAL_ERROR.into(),
        message: String::from_utf8_lossy(&bytes).chars().take(512).collect(),
        request_id: String::new(),
    });
    Err(ClientError::Api { status, body })
}

async fn decode<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T, ClientError> {
    let resp = check(resp).await?;
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| ClientError::Transport(e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
}

/// Splits a byte stream into NDJSON values.
pub fn ndjson_lines<T: DeserializeOwned>(
    body: impl Stream<Item = reqwest::Result<bytes::Bytes>> + Send + 'static,
) -> impl Stream<Item = Result<T, ClientError>> {
    let body = Box::pin(body);
    futures::stream::unfold(
        (body, Vec::<u8>::new(), false),
        |(mut body, mut buf, mut done)| async move {
            loop {
                if let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    let item = serde_json::from_slice(&line)
                        .map_err(|e| ClientError::Decode(e.to_string()));
                    return Some((item, (body, buf, done)));
                }
                if done {
                    if buf.iter().all(u8::is_ascii_whitespace) {
                        return None;
                    }
                    let line = std::mem::take(&mut buf);
                    let item = serde_json::from_slice(&line)
                        .map_err(|e| ClientError::Decode(e.to_string()));
                    return Some((item, (body, buf, true)));
                }
                match body.next().await {
                    Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                    Some(Err(e)) => {
                        return Some((
                            Err(ClientError::Transport(e.to_string())),
                            (body, Vec::new(), true),
                        ));
                    }
                    None => done = true,
                }
            }
        },
    )
}
