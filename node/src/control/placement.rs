//! Placement: which worker runs a new sandbox. Pure and table-tested.
//!
//! Eligible: online (not stale, draining or offline), offers the runtime, and
//! below its `max_sandboxes` capacity (0 = unlimited). Choice: fewest active
//! sandboxes, ties broken by worker ID, so every leader given the same view
//! picks the same worker.

use super::liveness::Health;

/// What placement knows about one worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    pub health: Health,
    pub runtimes: Vec<String>,
    /// 0 = unlimited.
    pub max_sandboxes: i64,
    pub active: i64,
}

/// Why no worker was chosen.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// No worker in the cluster (whatever its health) offers the runtime.
    #[error("no worker offers runtime {0:?}")]
    UnknownRuntime(String),
    /// Some worker offers it, but none is online with free capacity.
    #[error("no online worker with free capacity offers runtime {runtime:?} ({why})")]
    NoEligibleWorker { runtime: String, why: String },
}

/// Picks the worker for a sandbox of `runtime`.
pub fn place(candidates: &[Candidate], runtime: &str) -> Result<String, PlacementError> {
    let offering: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.runtimes.iter().any(|r| r.eq_ignore_ascii_case(runtime)))
        .collect();
    if offering.is_empty() {
        return Err(PlacementError::UnknownRuntime(runtime.to_string()));
    }
    let best = offering
        .iter()
        .filter(|c| c.health == Health::Online)
        .filter(|c| c.max_sandboxes <= 0 || c.active < c.max_sandboxes)
        .min_by(|a, b| a.active.cmp(&b.active).then_with(|| a.id.cmp(&b.id)));
    match best {
        Some(c) => Ok(c.id.clone()),
        None => {
            let mut why: Vec<String> = offering
                .iter()
                .map(|c| {
                    if c.health != Health::Online {
                        format!("{} is {}", c.id, c.health.as_str())
                    } else {
                        format!("{} is full ({}/{})", c.id, c.active, c.max_sandboxes)
                    }
                })
                .collect();
            why.sort();
            Err(PlacementError::NoEligibleWorker {
                runtime: runtime.to_string(),
                why: why.join(", "),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: &str, health: Health, runtimes: &[&str], max: i64, active: i64) -> Candidate {
        Candidate {
            id: id.into(),
            health,
            runtimes: runtimes.iter().map(|s| s.to_string()).collect(),
            max_sandboxes: max,
            active,
        }
    }

    #[test]
    fn placement_table() {
        use Health::*;
        let cases: Vec<(&str, Vec<Candidate>, &str, Result<&str, &str>)> = vec![
            (
                "least loaded wins",
                vec![
                    c("w-a", Online, &["mock"], 0, 3),
                    c("w-b", Online, &["mock"], 0, 1),
                ],
                "mock",
                Ok("w-b"),
            ),
            (
                "tie broken by id",
                vec![
                    c("w-b", Online, &["mock"], 0, 1),
                    c("w-a", Online, &["mock"], 0, 1),
                ],
                "mock",
                Ok("w-a"),
            ),
            (
                "runtime must be offered",
                vec![
                    c("w-a", Online, &["docker"], 0, 0),
                    c("w-b", Online, &["mock"], 0, 5),
                ],
                "mock",
                Ok("w-b"),
            ),
            (
                "runtime match ignores case",
                vec![c("w-a", Online, &["Mock"], 0, 0)],
                "mock",
                Ok("w-a"),
            ),
            (
                "stale skipped",
                vec![
                    c("w-a", Stale, &["mock"], 0, 0),
                    c("w-b", Online, &["mock"], 0, 9),
                ],
                "mock",
                Ok("w-b"),
            ),
            (
                "draining skipped",
                vec![
                    c("w-a", Draining, &["mock"], 0, 0),
                    c("w-b", Online, &["mock"], 0, 9),
                ],
                "mock",
                Ok("w-b"),
            ),
            (
                "full skipped",
                vec![
                    c("w-a", Online, &["mock"], 2, 2),
                    c("w-b", Online, &["mock"], 0, 9),
                ],
                "mock",
                Ok("w-b"),
            ),
            (
                "unknown runtime",
                vec![c("w-a", Online, &["mock"], 0, 0)],
                "gvisor",
                Err("unknown"),
            ),
            ("no workers at all", vec![], "mock", Err("unknown")),
            (
                "offered only by offline",
                vec![c("w-a", Offline, &["mock"], 0, 0)],
                "mock",
                Err("no-eligible"),
            ),
            (
                "all full",
                vec![c("w-a", Online, &["mock"], 1, 1)],
                "mock",
                Err("no-eligible"),
            ),
        ];
        for (name, cands, rt, want) in cases {
            let got = place(&cands, rt);
            match (want, &got) {
                (Ok(id), Ok(g)) => assert_eq!(g, id, "{name}"),
                (Err("unknown"), Err(PlacementError::UnknownRuntime(_))) => {}
                (Err("no-eligible"), Err(PlacementError::NoEligibleWorker { .. })) => {}
                _ => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }
}
