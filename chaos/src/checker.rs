//! The history checker: pure functions from what the run recorded (client
//! operations, the workers' evidence log, the final reads) to violations.
//! No I/O; every rule is table-tested below.
//!
//! Rules:
//! - `two_owners`: at no instant do two workers run the same sandbox. A
//!   sandbox is never moved in StacyVM (a worker that goes offline leaves
//!   its sandboxes `lost`), so any overlap of two workers' start..stop
//!   intervals for one sandbox is a violation, whatever either believed.
//! - `generation_order`: the lease generations a sandbox starts under only
//!   increase, and so do the generations of acknowledged lease grants of a
//!   resource in real-time order.
//! - `lease_exclusive`: no acknowledged grant to another holder lands
//!   inside an acknowledged lease's TTL unless its holder let go first.
//! - `acked_lost`: every acknowledged spawn is still on record after the
//!   faults heal (unless a destroy of it was attempted), and every
//!   acknowledged destroy is gone.
//! - `orphan`: once every recorded sandbox is destroyed and the reaper has
//!   run, no sandbox process is left running on any worker.
//! - `converged` and `log_error` are decided by the caller and only
//!   reported here.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    /// Definitely not applied (refused, or never sent).
    Failed,
    /// Maybe applied: a timeout, a lost connection after sending, a 504.
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    Spawn,
    Exec,
    Destroy,
    Acquire,
    Release,
}

impl OpKind {
    /// Operations that change the store (recovery is measured on these).
    pub fn is_write(self) -> bool {
        !matches!(self, OpKind::Exec)
    }
}

/// One client operation. Times are milliseconds since the run started.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Op {
    pub client: u32,
    pub kind: OpKind,
    pub invoke_ms: f64,
    pub complete_ms: f64,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Op {
    pub fn new(client: u32, kind: OpKind, invoke_ms: f64) -> Op {
        Op {
            client,
            kind,
            invoke_ms,
            complete_ms: invoke_ms,
            outcome: Outcome::Unknown,
            sandbox_id: None,
            resource: None,
            holder: None,
            generation: None,
            ttl_ms: None,
            error: None,
        }
    }
}

/// One line of the mock runtime's evidence log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    pub event: String,
    pub sandbox_id: String,
    pub worker_id: String,
    #[serde(default)]
    pub generation: i64,
    pub mono_ns: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    pub rule: String,
    pub detail: String,
}

fn violation(rule: &str, detail: String) -> Violation {
    Violation {
        rule: rule.to_string(),
        detail,
    }
}

/// A sandbox's life on one worker: `[start, stop)`; `stop = None` means
/// still running when the log was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interval {
    pub worker_id: String,
    pub generation: i64,
    pub start: u64,
    pub stop: Option<u64>,
}

/// Pairs each start with the next stop of the same sandbox on the same
/// worker. A repeated start without a stop in between (a restarted worker
/// starting it again) keeps the earlier start.
pub fn intervals(evidence: &[Evidence]) -> BTreeMap<String, Vec<Interval>> {
    let mut sorted: Vec<&Evidence> = evidence.iter().collect();
    sorted.sort_by_key(|e| e.mono_ns);
    let mut open: BTreeMap<(String, String), Interval> = BTreeMap::new();
    let mut out: BTreeMap<String, Vec<Interval>> = BTreeMap::new();
    for e in sorted {
        let key = (e.sandbox_id.clone(), e.worker_id.clone());
        match e.event.as_str() {
            "start" => {
                open.entry(key).or_insert(Interval {
                    worker_id: e.worker_id.clone(),
                    generation: e.generation,
                    start: e.mono_ns,
                    stop: None,
                });
            }
            "stop" => {
                if let Some(mut iv) = open.remove(&key) {
                    iv.stop = Some(e.mono_ns);
                    out.entry(e.sandbox_id.clone()).or_default().push(iv);
                }
            }
            _ => {}
        }
    }
    for ((sandbox, _), iv) in open {
        out.entry(sandbox).or_default().push(iv);
    }
    for ivs in out.values_mut() {
        ivs.sort_by_key(|i| i.start);
    }
    out
}

/// `two_owners` and the evidence half of `generation_order`.
pub fn check_evidence(evidence: &[Evidence]) -> Vec<Violation> {
    let mut v = Vec::new();
    for (sandbox, ivs) in intervals(evidence) {
        for (i, a) in ivs.iter().enumerate() {
            for b in &ivs[i + 1..] {
                if a.worker_id != b.worker_id && a.stop.is_none_or(|stop| b.start < stop) {
                    v.push(violation(
                        "two_owners",
                        format!(
                            "{sandbox} ran on {} (generation {}) and on {} (generation {}) at once",
                            a.worker_id, a.generation, b.worker_id, b.generation
                        ),
                    ));
                }
            }
        }
        for w in ivs.windows(2) {
            if w[1].generation < w[0].generation {
                v.push(violation(
                    "generation_order",
                    format!(
                        "{sandbox} started under generation {} after generation {}",
                        w[1].generation, w[0].generation
                    ),
                ));
            }
        }
    }
    v
}

/// Sandboxes still running according to the evidence (`orphan` once
/// every recorded sandbox was destroyed).
pub fn check_orphans(evidence: &[Evidence]) -> Vec<Violation> {
    intervals(evidence)
        .into_iter()
        .flat_map(|(sandbox, ivs)| {
            ivs.into_iter().filter(|i| i.stop.is_none()).map(move |i| {
                violation(
                    "orphan",
                    format!(
                        "{sandbox} still runs on {} with no owner record",
                        i.worker_id
                    ),
                )
            })
        })
        .collect()
}

/// The lease half of `generation_order`, and `lease_exclusive`.
/// `slack_ms` absorbs the time between a client's clock reading and the
/// leader's (same machine, so small).
pub fn check_leases(ops: &[Op], slack_ms: f64) -> Vec<Violation> {
    let mut v = Vec::new();
    let mut by_resource: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in ops {
        if let Some(r) = &op.resource {
            by_resource.entry(r.as_str()).or_default().push(op);
        }
    }
    for (resource, ops) in by_resource {
        let grants: Vec<&&Op> = ops
            .iter()
            .filter(|o| o.kind == OpKind::Acquire && o.outcome == Outcome::Ok)
            .collect();
        for a in &grants {
            for b in &grants {
                let (Some(ga), Some(gb)) = (a.generation, b.generation) else {
                    continue;
                };
                if a.complete_ms < b.invoke_ms && gb <= ga {
                    v.push(violation(
                        "generation_order",
                        format!(
                            "{resource}: grant at {:.0} ms has generation {gb}, not above {ga} granted before it",
                            b.complete_ms
                        ),
                    ));
                }
                // `b` came later in log order; one that completed before
                // `a` was even asked for is a `generation_order` anomaly,
                // reported above, not an overlap.
                if gb > ga && a.holder != b.holder && b.complete_ms > a.invoke_ms {
                    let ttl = a.ttl_ms.unwrap_or(0) as f64;
                    let expiry = a.invoke_ms + ttl - slack_ms;
                    let released = ops.iter().any(|r| {
                        r.kind == OpKind::Release
                            && r.holder == a.holder
                            && r.outcome != Outcome::Failed
                            && r.invoke_ms < b.complete_ms
                    });
                    if b.complete_ms < expiry && !released {
                        v.push(violation(
                            "lease_exclusive",
                            format!(
                                "{resource}: {:?} got generation {gb} at {:.0} ms while {:?}'s generation {ga} held until at least {:.0} ms",
                                b.holder, b.complete_ms, a.holder, expiry
                            ),
                        ));
                    }
                }
            }
        }
    }
    v
}

/// What a final read found for a sandbox: `None` = 404.
pub type FinalReads = BTreeMap<String, Option<String>>;

/// `acked_lost`: acknowledged spawns still on record, acknowledged
/// destroys gone. `reads` holds the final read of every sandbox named by
/// an acknowledged operation.
pub fn check_acked(ops: &[Op], reads: &FinalReads) -> Vec<Violation> {
    let mut v = Vec::new();
    let destroy_tried: BTreeSet<&str> = ops
        .iter()
        .filter(|o| o.kind == OpKind::Destroy)
        .filter_map(|o| o.sandbox_id.as_deref())
        .collect();
    for op in ops.iter().filter(|o| o.outcome == Outcome::Ok) {
        let Some(id) = op.sandbox_id.as_deref() else {
            continue;
        };
        let read = reads.get(id);
        match op.kind {
            OpKind::Spawn if !destroy_tried.contains(id) && !matches!(read, Some(Some(_))) => {
                v.push(violation(
                    "acked_lost",
                    format!("acknowledged spawn of {id} is not on record"),
                ));
            }
            OpKind::Destroy => {
                if let Some(Some(state)) = read
                    && state != "destroyed"
                {
                    v.push(violation(
                        "acked_lost",
                        format!("acknowledged destroy of {id}, but it is {state}"),
                    ));
                }
            }
            _ => {}
        }
    }
    v
}

/// Milliseconds from each fault's start to the next acknowledged write
/// that was completed after it (`None`: no write was acknowledged again).
pub fn recovery_ms(fault_starts: &[f64], ops: &[Op]) -> Vec<Option<f64>> {
    let mut acked: Vec<f64> = ops
        .iter()
        .filter(|o| o.kind.is_write() && o.outcome == Outcome::Ok)
        .map(|o| o.complete_ms)
        .collect();
    acked.sort_by(f64::total_cmp);
    fault_starts
        .iter()
        .map(|start| {
            let i = acked.partition_point(|t| t < start);
            acked.get(i).map(|t| t - start)
        })
        .collect()
}

/// Nearest-rank percentile of `xs` (`q` in 0..=1).
pub fn percentile(xs: &[f64], q: f64) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let mut s = xs.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    Some(s[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(event: &str, sandbox: &str, worker: &str, generation: i64, t: u64) -> Evidence {
        Evidence {
            event: event.into(),
            sandbox_id: sandbox.into(),
            worker_id: worker.into(),
            generation,
            mono_ns: t,
        }
    }

    fn rules(v: &[Violation]) -> Vec<&str> {
        v.iter().map(|x| x.rule.as_str()).collect()
    }

    #[test]
    fn evidence_rules() {
        let cases: Vec<(&str, Vec<Evidence>, Vec<&str>)> = vec![
            (
                "one worker, start and stop",
                vec![ev("start", "a", "w1", 1, 1), ev("stop", "a", "w1", 1, 5)],
                vec![],
            ),
            (
                "two workers one after the other",
                vec![
                    ev("start", "a", "w1", 1, 1),
                    ev("stop", "a", "w1", 1, 5),
                    ev("start", "a", "w2", 2, 6),
                ],
                vec![],
            ),
            (
                "two workers overlapping",
                vec![
                    ev("start", "a", "w1", 1, 1),
                    ev("start", "a", "w2", 2, 3),
                    ev("stop", "a", "w1", 1, 5),
                ],
                vec!["two_owners"],
            ),
            (
                "second start while the first never stopped",
                vec![ev("start", "a", "w1", 1, 1), ev("start", "a", "w2", 2, 9)],
                vec!["two_owners"],
            ),
            (
                "generation going back",
                vec![
                    ev("start", "a", "w1", 5, 1),
                    ev("stop", "a", "w1", 5, 2),
                    ev("start", "a", "w2", 4, 3),
                    ev("stop", "a", "w2", 4, 4),
                ],
                vec!["generation_order"],
            ),
            (
                "same worker restarts it (adoption keeps one interval)",
                vec![
                    ev("start", "a", "w1", 1, 1),
                    ev("start", "a", "w1", 1, 2),
                    ev("stop", "a", "w1", 1, 3),
                ],
                vec![],
            ),
            (
                "a stop written twice (at-least-once stop evidence)",
                vec![
                    ev("start", "a", "w1", 1, 1),
                    ev("stop", "a", "w1", 1, 2),
                    ev("stop", "a", "w1", 1, 3),
                    ev("start", "a", "w2", 2, 4),
                    ev("stop", "a", "w2", 2, 5),
                ],
                vec![],
            ),
            (
                "different sandboxes never conflict",
                vec![ev("start", "a", "w1", 1, 1), ev("start", "b", "w2", 1, 2)],
                vec![],
            ),
        ];
        for (name, evidence, want) in cases {
            assert_eq!(rules(&check_evidence(&evidence)), want, "{name}");
        }
        let open = vec![
            ev("start", "a", "w1", 1, 1),
            ev("start", "b", "w1", 1, 2),
            ev("stop", "b", "w1", 1, 3),
        ];
        assert_eq!(rules(&check_orphans(&open)), vec!["orphan"]);
        let stopped_twice = vec![
            ev("start", "a", "w1", 1, 1),
            ev("stop", "a", "w1", 1, 2),
            ev("stop", "a", "w1", 1, 3),
        ];
        assert_eq!(rules(&check_orphans(&stopped_twice)), Vec::<&str>::new());
    }

    fn lease(
        kind: OpKind,
        holder: &str,
        generation: Option<i64>,
        invoke: f64,
        complete: f64,
        outcome: Outcome,
    ) -> Op {
        let mut o = Op::new(0, kind, invoke);
        o.complete_ms = complete;
        o.outcome = outcome;
        o.resource = Some("r".into());
        o.holder = Some(holder.into());
        o.generation = generation;
        o.ttl_ms = Some(1000);
        o
    }

    #[test]
    fn lease_rules() {
        use OpKind::{Acquire, Release};
        use Outcome::{Failed, Ok, Unknown};
        let cases: Vec<(&str, Vec<Op>, Vec<&str>)> = vec![
            (
                "after expiry",
                vec![
                    lease(Acquire, "h1", Some(1), 0.0, 5.0, Ok),
                    lease(Acquire, "h2", Some(2), 1500.0, 1510.0, Ok),
                ],
                vec![],
            ),
            (
                "inside the TTL",
                vec![
                    lease(Acquire, "h1", Some(1), 0.0, 5.0, Ok),
                    lease(Acquire, "h2", Some(2), 300.0, 310.0, Ok),
                ],
                vec!["lease_exclusive"],
            ),
            (
                "inside the TTL after a release",
                vec![
                    lease(Acquire, "h1", Some(1), 0.0, 5.0, Ok),
                    lease(Release, "h1", None, 100.0, 110.0, Ok),
                    lease(Acquire, "h2", Some(2), 300.0, 310.0, Ok),
                ],
                vec![],
            ),
            (
                "a release of unknown fate counts as let go",
                vec![
                    lease(Acquire, "h1", Some(1), 0.0, 5.0, Ok),
                    lease(Release, "h1", None, 100.0, 900.0, Unknown),
                    lease(Acquire, "h2", Some(2), 300.0, 310.0, Ok),
                ],
                vec![],
            ),
            (
                "a failed release does not",
                vec![
                    lease(Acquire, "h1", Some(1), 0.0, 5.0, Ok),
                    lease(Release, "h1", None, 100.0, 110.0, Failed),
                    lease(Acquire, "h2", Some(2), 300.0, 310.0, Ok),
                ],
                vec!["lease_exclusive"],
            ),
            (
                "generation not increasing in real time",
                vec![
                    lease(Acquire, "h1", Some(3), 0.0, 5.0, Ok),
                    lease(Acquire, "h2", Some(2), 2000.0, 2010.0, Ok),
                ],
                vec!["generation_order"],
            ),
            (
                "concurrent grants may come in either order",
                vec![
                    lease(Acquire, "h1", Some(3), 0.0, 50.0, Ok),
                    lease(Acquire, "h1", Some(2), 10.0, 40.0, Ok),
                ],
                vec![],
            ),
            (
                "unacknowledged grants prove nothing",
                vec![
                    lease(Acquire, "h1", Some(1), 0.0, 5.0, Ok),
                    lease(Acquire, "h2", Some(2), 300.0, 310.0, Unknown),
                ],
                vec![],
            ),
        ];
        for (name, ops, want) in cases {
            assert_eq!(rules(&check_leases(&ops, 20.0)), want, "{name}");
        }
    }

    fn sb(kind: OpKind, id: &str, outcome: Outcome) -> Op {
        let mut o = Op::new(0, kind, 0.0);
        o.outcome = outcome;
        o.sandbox_id = Some(id.into());
        o
    }

    #[test]
    fn acked_rules() {
        use OpKind::{Destroy, Spawn};
        use Outcome::{Ok, Unknown};
        let reads = |pairs: &[(&str, Option<&str>)]| -> FinalReads {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
                .collect()
        };
        let cases: Vec<(&str, Vec<Op>, FinalReads, Vec<&str>)> = vec![
            (
                "spawn on record",
                vec![sb(Spawn, "a", Ok)],
                reads(&[("a", Some("running"))]),
                vec![],
            ),
            (
                "lost still counts as on record",
                vec![sb(Spawn, "a", Ok)],
                reads(&[("a", Some("lost"))]),
                vec![],
            ),
            (
                "spawn missing",
                vec![sb(Spawn, "a", Ok)],
                reads(&[("a", None)]),
                vec!["acked_lost"],
            ),
            (
                "spawn missing, destroy of unknown fate",
                vec![sb(Spawn, "a", Ok), sb(Destroy, "a", Unknown)],
                reads(&[("a", None)]),
                vec![],
            ),
            (
                "destroy gone",
                vec![sb(Spawn, "a", Ok), sb(Destroy, "a", Ok)],
                reads(&[("a", None)]),
                vec![],
            ),
            (
                "destroy still running",
                vec![sb(Spawn, "a", Ok), sb(Destroy, "a", Ok)],
                reads(&[("a", Some("running"))]),
                vec!["acked_lost"],
            ),
        ];
        for (name, ops, reads, want) in cases {
            assert_eq!(rules(&check_acked(&ops, &reads)), want, "{name}");
        }
    }

    #[test]
    fn recovery_and_percentiles() {
        let mut ops = vec![
            sb(OpKind::Spawn, "a", Outcome::Ok),
            sb(OpKind::Exec, "a", Outcome::Ok),
        ];
        ops[0].complete_ms = 150.0;
        ops[1].complete_ms = 120.0;
        assert_eq!(recovery_ms(&[100.0, 200.0], &ops), vec![Some(50.0), None]);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 0.5), Some(2.0));
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 0.99), Some(3.0));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
