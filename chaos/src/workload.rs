//! The client workload: sandbox clients (spawn → exec → destroy, keeping a
//! few alive) and lease clients (acquire → hold → release or let expire on
//! a few contended resources), each sending to a random replica and
//! recording every operation as ok, failed or unknown.
//!
//! Classification: a connection that could not be made, a 4xx or a 503
//! (`NO_LEADER`: nothing was proposed) is `failed`; a timeout, a broken
//! connection after sending, a 504 (`TIMEOUT`) or another 5xx is
//! `unknown`: it may have been applied, and the checker never counts it
//! as either.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::checker::{Op, OpKind, Outcome};
use crate::rng::Rng;

/// Every operation of the run, in completion order.
#[derive(Debug)]
pub struct History {
    pub origin: Instant,
    ops: Mutex<Vec<Op>>,
}

impl History {
    pub fn new(origin: Instant) -> Arc<History> {
        Arc::new(History {
            origin,
            ops: Mutex::new(Vec::new()),
        })
    }

    pub fn now_ms(&self) -> f64 {
        self.origin.elapsed().as_secs_f64() * 1000.0
    }

    fn push(&self, op: Op) {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).push(op);
    }

    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The replicas' API URLs (membership changes add and remove some).
pub type Targets = Arc<RwLock<Vec<String>>>;

/// What one request came back with.
struct Answer {
    outcome: Outcome,
    body: serde_json::Value,
    error: Option<String>,
}

async fn call(req: reqwest::RequestBuilder) -> Answer {
    match req.send().await {
        Err(e) => Answer {
            outcome: if e.is_connect() {
                Outcome::Failed
            } else {
                Outcome::Unknown
            },
            body: serde_json::Value::Null,
            error: Some(if e.is_timeout() {
                "timeout".into()
            } else {
                "transport".into()
            }),
        },
        Ok(r) => {
            let status = r.status();
            let body: serde_json::Value = r.json().await.unwrap_or(serde_json::Value::Null);
            let code = body
                .get("code")
                .and_then(|c| c.as_str())
                .unwrap_or("")
                .to_string();
            let outcome = if status.is_success() {
                Outcome::Ok
            } else if status.is_client_error() || status.as_u16() == 503 {
                Outcome::Failed
            } else {
                Outcome::Unknown
            };
            Answer {
                outcome,
                body,
                error: (!status.is_success()).then(|| format!("{} {code}", status.as_u16())),
            }
        }
    }
}

fn pick(targets: &Targets, rng: &mut Rng) -> Option<String> {
    let t = targets.read().unwrap_or_else(|p| p.into_inner());
    rng.pick(&t).cloned()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(8))
        .build()
        .unwrap_or_default()
}

/// A sandbox client until `stop` turns true.
pub async fn sandbox_client(
    id: u32,
    targets: Targets,
    history: Arc<History>,
    mut rng: Rng,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let http = client();
    let mut kept: Vec<String> = Vec::new();
    while !*stop.borrow() {
        let Some(url) = pick(&targets, &mut rng) else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut op = Op::new(id, OpKind::Spawn, history.now_ms());
        let a = call(http.post(format!("{url}/api/v1/sandboxes")).json(&json!({
            "image": "busybox", "runtime": "mock", "ttl": "1h", "owner_id": format!("chaos-{id}"),
        })))
        .await;
        op.complete_ms = history.now_ms();
        op.outcome = a.outcome;
        op.error = a.error;
        op.sandbox_id = a
            .body
            .get("id")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        if op.outcome == Outcome::Ok && op.sandbox_id.is_none() {
            op.outcome = Outcome::Unknown;
            op.error = Some("spawn answer without an id".into());
        }
        let spawned = (op.outcome == Outcome::Ok)
            .then(|| op.sandbox_id.clone())
            .flatten();
        history.push(op);
        let Some(sb) = spawned else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if let Some(url) = pick(&targets, &mut rng) {
            let mut op = Op::new(id, OpKind::Exec, history.now_ms());
            op.sandbox_id = Some(sb.clone());
            let a = call(
                http.post(format!("{url}/api/v1/sandboxes/{sb}/exec"))
                    .json(&json!({ "command": "echo ok" })),
            )
            .await;
            op.complete_ms = history.now_ms();
            op.outcome = a.outcome;
            op.error = a.error;
            history.push(op);
        }
        // Keep one in four alive for a while (they are destroyed later).
        if rng.range(0, 4) == 0 {
            kept.push(sb);
            if kept.len() < 4 {
                continue;
            }
            let sb = kept.remove(0);
            destroy(id, &http, &targets, &history, &mut rng, sb).await;
        } else {
            destroy(id, &http, &targets, &history, &mut rng, sb).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.range(20, 120))).await;
    }
    for sb in kept {
        destroy(id, &http, &targets, &history, &mut rng, sb).await;
    }
}

async fn destroy(
    id: u32,
    http: &reqwest::Client,
    targets: &Targets,
    history: &History,
    rng: &mut Rng,
    sb: String,
) {
    let Some(url) = pick(targets, rng) else {
        return;
    };
    let mut op = Op::new(id, OpKind::Destroy, history.now_ms());
    op.sandbox_id = Some(sb.clone());
    let a = call(http.delete(format!("{url}/api/v1/sandboxes/{sb}"))).await;
    op.complete_ms = history.now_ms();
    op.outcome = a.outcome;
    op.error = a.error;
    history.push(op);
}

/// A lease client on `resources` until `stop` turns true.
pub async fn lease_client(
    id: u32,
    targets: Targets,
    history: Arc<History>,
    mut rng: Rng,
    resources: Vec<String>,
    ttl_ms: u64,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let http = client();
    let mut n = 0u64;
    while !*stop.borrow() {
        let (Some(url), Some(resource)) = (pick(&targets, &mut rng), rng.pick(&resources).cloned())
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        n += 1;
        let holder = format!("chaos-{id}-{n}");
        let mut op = Op::new(id, OpKind::Acquire, history.now_ms());
        op.resource = Some(resource.clone());
        op.holder = Some(holder.clone());
        op.ttl_ms = Some(ttl_ms);
        let a = call(http.post(format!("{url}/api/v1/leases/acquire")).json(&json!({
            "resource_id": resource, "resource_type": "chaos", "holder_id": holder, "ttl_ms": ttl_ms,
        })))
        .await;
        op.complete_ms = history.now_ms();
        op.outcome = a.outcome;
        op.error = a.error;
        op.generation = a.body.get("generation").and_then(|g| g.as_i64());
        let granted = op.outcome == Outcome::Ok;
        history.push(op);
        if !granted {
            tokio::time::sleep(Duration::from_millis(rng.range(50, 250))).await;
            continue;
        }
        tokio::time::sleep(Duration::from_millis(rng.range(50, 400))).await;
        if rng.range(0, 3) > 0
            && let Some(url) = pick(&targets, &mut rng)
        {
            let mut op = Op::new(id, OpKind::Release, history.now_ms());
            op.resource = Some(resource.clone());
            op.holder = Some(holder.clone());
            let a = call(
                http.post(format!("{url}/api/v1/leases/release"))
                    .json(&json!({ "resource_id": resource, "holder_id": holder })),
            )
            .await;
            op.complete_ms = history.now_ms();
            op.outcome = a.outcome;
            op.error = a.error;
            history.push(op);
        }
    }
}
