//! The event stream (`GET /api/v1/events`, server-sent events).
//!
//! Owns: turning what the Raft state machine applies into events, a ring of
//! the latest [`RING`] events for `Last-Event-ID` replay, and fan-out to
//! subscribers. Events come from applied log entries, so every replica emits
//! the same events with the same IDs (`evt-<raft index>-<n>`), and a client
//! that reconnects to another replica resumes where it left off. A subscriber
//! too slow to keep up is disconnected (never silently skipped) and resumes
//! with `Last-Event-ID`.
//!
//! Does not own: HTTP framing (the `sandbox_api` handler) or what the
//! mutations mean (the store).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use stacyvm_api::Event;
use stacyvm_raft::replica::Replica;
use stacyvm_store::{Mutation, Ts};
use tokio::sync::broadcast;

/// Events kept for replay.
pub const RING: usize = 4096;

/// The event hub of one replica.
#[derive(Debug)]
pub struct Events {
    ring: Mutex<VecDeque<(u64, u32, Event)>>,
    tx: broadcast::Sender<Arc<Event>>,
}

fn key_of(id: &str) -> Option<(u64, u32)> {
    let rest = id.strip_prefix("evt-")?;
    let (a, b) = rest.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

fn ts(at: Ts) -> String {
    crate::api::rfc3339(at)
}

/// The events one mutation produces (none for bookkeeping ones).
pub fn events_of(m: &Mutation, out: &mut Vec<(String, String, String, serde_json::Value)>) {
    use serde_json::json;
    let mut push = |kind: &str, sandbox: &str, at: Ts, data: serde_json::Value| {
        out.push((kind.to_string(), sandbox.to_string(), ts(at), data));
    };
    match m {
        Mutation::CreateSandbox(s) => push(
            "sandbox.created",
            &s.id,
            s.created_at,
            json!({"worker_id": s.worker_id, "runtime": s.runtime, "image": s.image, "owner_id": s.owner_id}),
        ),
        Mutation::SetSandboxState { id, state, at } => push(
            &format!("sandbox.{state}"),
            id,
            *at,
            serde_json::Value::Null,
        ),
        Mutation::SetSandboxExpiry { id, expires_at, at } => push(
            "sandbox.extended",
            id,
            *at,
            json!({"expires_at": ts(*expires_at)}),
        ),
        Mutation::DestroySandbox { id, at } => {
            push("sandbox.destroyed", id, *at, serde_json::Value::Null)
        }
        Mutation::AppendExecLog(l) => push(
            "exec.completed",
            &l.sandbox_id,
            l.created_at,
            json!({"exit_code": l.exit_code, "duration_ms": l.duration_ms}),
        ),
        Mutation::PutWorker(w) => push(
            "worker.registered",
            "",
            w.updated_at,
            json!({"worker_id": w.id, "status": w.status}),
        ),
        Mutation::SetWorkerStatus { id, status, at } => push(
            &format!("worker.{status}"),
            "",
            *at,
            json!({"worker_id": id}),
        ),
        Mutation::DeleteWorker { id } => {
            push("worker.removed", "", Ts::now(), json!({"worker_id": id}))
        }
        Mutation::AcquireLease(a) => push(
            "lease.granted",
            if a.resource_type == "sandbox" {
                &a.resource_id
            } else {
                ""
            },
            a.now,
            json!({"resource_id": a.resource_id, "holder_id": a.holder_id}),
        ),
        Mutation::RevokeLease { resource_id } => push(
            "lease.revoked",
            "",
            Ts::now(),
            json!({"resource_id": resource_id}),
        ),
        Mutation::PutQuota(q) => push(
            "quota.saved",
            "",
            q.updated_at,
            json!({"owner_id": q.owner_id}),
        ),
        Mutation::DeleteQuota { owner_id } => push(
            "quota.deleted",
            "",
            Ts::now(),
            json!({"owner_id": owner_id}),
        ),
        Mutation::CreateTemplate(t) | Mutation::UpdateTemplate(t) => {
            push("template.saved", "", t.updated_at, json!({"name": t.name}))
        }
        Mutation::DeleteTemplate { name } => {
            push("template.deleted", "", Ts::now(), json!({"name": name}))
        }
        Mutation::Atomic(v) => {
            for m in v {
                events_of(m, out);
            }
        }
        _ => {}
    }
}

impl Events {
    /// Starts the hub: follows what `replica` applies.
    pub fn start(replica: &Replica) -> Arc<Events> {
        let hub = Arc::new(Events {
            ring: Mutex::new(VecDeque::with_capacity(RING)),
            tx: broadcast::channel(1024).0,
        });
        let mut rx = replica.subscribe_applied();
        let h = hub.clone();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(batch) => {
                        for (index, muts) in &batch.entries {
                            let mut evs = Vec::new();
                            for m in muts {
                                events_of(m, &mut evs);
                            }
                            for (n, (kind, sandbox_id, timestamp, data)) in
                                evs.into_iter().enumerate()
                            {
                                let n = u32::try_from(n).unwrap_or(u32::MAX);
                                h.publish(
                                    *index,
                                    n,
                                    Event {
                                        id: format!("evt-{index}-{n}"),
                                        kind,
                                        sandbox_id,
                                        timestamp,
                                        data,
                                    },
                                );
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(
                            missed = n,
                            "event hub fell behind the state machine; some events are missing"
                        );
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        hub
    }

    fn publish(&self, index: u64, n: u32, e: Event) {
        {
            let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            if ring.len() == RING {
                ring.pop_front();
            }
            ring.push_back((index, n, e.clone()));
        }
        let _ = self.tx.send(Arc::new(e));
    }

    /// Subscribes, returning the events after `last_id` still in the ring
    /// (all of the ring when `last_id` is unknown or too old) and the live feed.
    pub fn subscribe(
        &self,
        last_id: Option<&str>,
    ) -> (Vec<Event>, broadcast::Receiver<Arc<Event>>) {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let rx = self.tx.subscribe();
        let replay = match last_id.and_then(key_of) {
            Some(k) => ring
                .iter()
                .filter(|(i, n, _)| (*i, *n) > k)
                .map(|(_, _, e)| e.clone())
                .collect(),
            None => Vec::new(),
        };
        (replay, rx)
    }

    /// Ordering key of an event ID.
    pub fn key(id: &str) -> Option<(u64, u32)> {
        key_of(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_order_by_index_then_position() {
        assert_eq!(key_of("evt-12-3"), Some((12, 3)));
        assert!(key_of("evt-12-3") < key_of("evt-13-0"));
        assert_eq!(key_of("garbage"), None);
        assert_eq!(key_of("evt-x-1"), None);
    }

    #[test]
    fn atomic_groups_yield_every_event() {
        let m = Mutation::Atomic(vec![
            Mutation::DestroySandbox {
                id: "sb-00000001".into(),
                at: Ts(0),
            },
            Mutation::RevokeLease {
                resource_id: "sb-00000001".into(),
            },
        ]);
        let mut out = Vec::new();
        events_of(&m, &mut out);
        let kinds: Vec<&str> = out.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(kinds, ["sandbox.destroyed", "lease.revoked"]);
    }
}
