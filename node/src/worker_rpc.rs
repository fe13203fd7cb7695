//! The control plane's client for worker RPC (HTTP).
//!
//! Owns: URLs, headers (worker ID, lease generation, request ID), timeouts and
//! decoding worker answers. Every call has a timeout: connect 2 s, plain calls
//! 30 s, execs their own timeout plus 30 s; streams (exec stream, file bodies)
//! have a connect timeout and an idle-read timeout instead of a total one, so
//! a long exec or a 100 MB file is never cut off.
//!
//! Does not own: which worker to call (the caller read the sandbox record).

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use stacyvm_api::{
    ErrorBody, ExecRequest, ExecResult, GENERATION_HEADER, RpcSandbox, RpcSpawn, WORKER_ID_HEADER,
    codes,
};

/// Why a worker call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WorkerCallError {
    /// Could not connect, or the call timed out or broke: the worker may be
    /// dead, and the call's outcome is unknown.
    #[error("worker {worker} unreachable: {reason}")]
    Unreachable { worker: String, reason: String },
    /// The worker answered with an error.
    #[error("worker {worker}: {} ({})", .body.code, .body.message)]
    Refused {
        worker: String,
        status: u16,
        body: ErrorBody,
    },
}

impl WorkerCallError {
    pub fn code(&self) -> &str {
        match self {
            WorkerCallError::Unreachable { .. } => codes::WORKER_UNAVAILABLE,
            WorkerCallError::Refused { body, .. } => &body.code,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.code() == codes::NOT_FOUND
    }
}

/// Where and as whom to call: one sandbox's owner.
#[derive(Clone, Debug)]
pub struct Target {
    pub worker_id: String,
    pub rpc_url: String,
    pub generation: i64,
    pub request_id: String,
    /// Signed `worker:rpc` token bound to this worker (sent as Bearer).
    pub signed_token: Option<String>,
    /// The worker's static token (sent as `X-Worker-Token`).
    pub static_token: Option<String>,
}

/// HTTP client for worker RPC.
#[derive(Clone, Debug)]
pub struct WorkerRpc {
    http: reqwest::Client,
    stream_http: reqwest::Client,
    /// Mutual TLS towards workers that advertise `https://` RPC URLs.
    tls: Option<std::sync::Arc<crate::rpc_tls::RpcTlsClient>>,
}

const CALL_TIMEOUT: Duration = Duration::from_secs(30);

impl WorkerRpc {
    /// With mutual TLS for workers whose RPC URL is `https://`.
    pub fn with_tls(
        tls: Option<std::sync::Arc<crate::rpc_tls::RpcTlsClient>>,
    ) -> Result<Self, reqwest::Error> {
        let mut w = Self::new()?;
        w.tls = tls;
        Ok(w)
    }

    pub fn new() -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()?;
        let stream_http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .read_timeout(Duration::from_secs(120))
            .build()?;
        Ok(WorkerRpc {
            http,
            stream_http,
            tls: None,
        })
    }

    fn request(
        &self,
        t: &Target,
        method: Method,
        path: &str,
        timeout: Option<Duration>,
    ) -> reqwest::RequestBuilder {
        let streaming = timeout.is_none();
        let mut client = if streaming {
            self.stream_http.clone()
        } else {
            self.http.clone()
        };
        let mut base = t.rpc_url.trim_end_matches('/').to_string();
        if let (Some(tls), Some(rest)) = (&self.tls, base.strip_prefix("https://")) {
            // Call the worker by its certificate name, resolved to its address.
            let addr =
                std::net::ToSocketAddrs::to_socket_addrs(rest.split('/').next().unwrap_or(rest))
                    .ok()
                    .and_then(|mut a| a.next());
            if let Some(addr) = addr {
                match tls.client_for(&t.worker_id, addr, streaming) {
                    Ok((c, b)) => {
                        client = c;
                        base = b;
                    }
                    Err(e) => {
                        tracing::error!(worker = %t.worker_id, error = %e, "cannot build the mTLS client")
                    }
                }
            }
        }
        let mut b = client
            .request(method, format!("{base}/rpc/v1{path}"))
            .header(WORKER_ID_HEADER, &t.worker_id)
            .header(GENERATION_HEADER, t.generation.to_string())
            .header("x-request-id", &t.request_id);
        if let Some(tok) = &t.signed_token {
            b = b.bearer_auth(tok);
        }
        if let Some(tok) = &t.static_token {
            b = b.header("x-worker-token", tok);
        }
        if let Some(d) = timeout {
            b = b.timeout(d);
        }
        b
    }

    /// Sends and checks the status; the body is left to the caller.
    pub async fn send(
        &self,
        t: &Target,
        b: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, WorkerCallError> {
        let resp = b.send().await.map_err(|e| WorkerCallError::Unreachable {
            worker: t.worker_id.clone(),
            reason: e.to_string(),
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let bytes = resp.bytes().await.unwrap_or_default();
        let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| ErrorBody {
            code: if status == StatusCode::NOT_FOUND {
                codes::NOT_FOUND.into()
            } else {
                codes::INTERNAL_ERROR.into()
            },
            message: String::from_utf8_lossy(&bytes).chars().take(300).collect(),
            request_id: t.request_id.clone(),
        });
        Err(WorkerCallError::Refused {
            worker: t.worker_id.clone(),
            status: status.as_u16(),
            body,
        })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        t: &Target,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
        timeout: Duration,
    ) -> Result<T, WorkerCallError> {
        let mut b = self.request(t, method, path, Some(timeout));
        if let Some(body) = body {
            b = b.json(body);
        }
        let resp = self.send(t, b).await?;
        resp.json().await.map_err(|e| WorkerCallError::Unreachable {
            worker: t.worker_id.clone(),
            reason: format!("bad answer: {e}"),
        })
    }

    pub async fn spawn(
        &self,
        t: &Target,
        req: &RpcSpawn,
        timeout: Duration,
    ) -> Result<RpcSandbox, WorkerCallError> {
        self.call(t, Method::POST, "/sandboxes", Some(req), timeout)
            .await
    }

    pub async fn destroy(&self, t: &Target, id: &str) -> Result<(), WorkerCallError> {
        let b = self.request(
            t,
            Method::DELETE,
            &format!("/sandboxes/{id}"),
            Some(CALL_TIMEOUT),
        );
        self.send(t, b).await.map(|_| ())
    }

    pub async fn status(&self, t: &Target, id: &str) -> Result<RpcSandbox, WorkerCallError> {
        self.call(
            t,
            Method::GET,
            &format!("/sandboxes/{id}"),
            None::<&()>,
            CALL_TIMEOUT,
        )
        .await
    }

    /// Every sandbox the worker runs (generation header 0: not about one sandbox).
    pub async fn list(&self, t: &Target) -> Result<Vec<RpcSandbox>, WorkerCallError> {
        self.call(
            t,
            Method::GET,
            "/sandboxes",
            None::<&()>,
            Duration::from_secs(10),
        )
        .await
    }

    pub async fn exec(
        &self,
        t: &Target,
        id: &str,
        req: &ExecRequest,
        timeout: Option<Duration>,
    ) -> Result<ExecResult, WorkerCallError> {
        let budget = timeout.unwrap_or(Duration::from_secs(3600)) + CALL_TIMEOUT;
        self.call(
            t,
            Method::POST,
            &format!("/sandboxes/{id}/exec"),
            Some(req),
            budget,
        )
        .await
    }

    /// Starts a streamed exec; the response body is NDJSON `ExecStreamLine`s.
    pub async fn exec_stream(
        &self,
        t: &Target,
        id: &str,
        req: &ExecRequest,
    ) -> Result<reqwest::Response, WorkerCallError> {
        let b = self
            .request(
                t,
                Method::POST,
                &format!("/sandboxes/{id}/exec/stream"),
                None,
            )
            .json(req);
        self.send(t, b).await
    }

    /// A file call with a streamed request and/or response body
    /// (`/sandboxes/{id}/files...` plus query).
    pub async fn files(
        &self,
        t: &Target,
        method: Method,
        path_and_query: &str,
        body: Option<reqwest::Body>,
        json: Option<serde_json::Value>,
    ) -> Result<reqwest::Response, WorkerCallError> {
        let streaming = body.is_some() || method == Method::GET;
        let mut b = self.request(
            t,
            method,
            path_and_query,
            if streaming { None } else { Some(CALL_TIMEOUT) },
        );
        if let Some(body) = body {
            b = b
                .header("content-type", "application/octet-stream")
                .body(body);
        }
        if let Some(j) = json {
            b = b.json(&j);
        }
        self.send(t, b).await
    }
}
