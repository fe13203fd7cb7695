//! The run's report: JSON (everything, for tools) and a Markdown summary
//! (faults by kind, operations, violations, recovery p50/p99/max).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::checker::{Op, Outcome, Violation, percentile};
use crate::nemesis::Fault;

#[derive(Debug, Serialize)]
pub struct Report {
    pub profile: String,
    pub seed: u64,
    pub replicas: u64,
    pub workers: u32,
    /// `sqlite`, `postgres` (one database per replica) or `postgres-shared`.
    pub database: String,
    pub duration_s: f64,
    pub faults: Vec<Fault>,
    pub operations: BTreeMap<String, BTreeMap<String, usize>>,
    pub violations: Vec<Violation>,
    pub recovery_ms: Recovery,
    pub notes: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Recovery {
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
    pub unrecovered: usize,
}

pub fn count_ops(ops: &[Op]) -> BTreeMap<String, BTreeMap<String, usize>> {
    let mut out: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for op in ops {
        let kind = serde_json::to_value(op.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let outcome = match op.outcome {
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
            Outcome::Unknown => "unknown",
        };
        *out.entry(kind)
            .or_default()
            .entry(outcome.into())
            .or_default() += 1;
    }
    out
}

pub fn recovery(faults: &[Fault]) -> Recovery {
    let xs: Vec<f64> = faults.iter().filter_map(|f| f.recovery_ms).collect();
    Recovery {
        p50: percentile(&xs, 0.5),
        p99: percentile(&xs, 0.99),
        max: xs.iter().copied().reduce(f64::max),
        unrecovered: faults.iter().filter(|f| f.recovery_ms.is_none()).count(),
    }
}

fn ms(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into())
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let verdict = if self.violations.is_empty() {
            "PASS"
        } else {
            "FAIL"
        };
        s.push_str(&format!("# Chaos run: {verdict}\n\n"));
        s.push_str(&format!(
            "Profile `{}`, seed `{}`, {} replicas, {} workers, database {}, {:.0} s, {} faults, {} violations.\n\n",
            self.profile,
            self.seed,
            self.replicas,
            self.workers,
            self.database,
            self.duration_s,
            self.faults.len(),
            self.violations.len()
        ));
        s.push_str("## Faults by kind\n\n| kind | count | recovery p50 (ms) | max (ms) |\n|---|---:|---:|---:|\n");
        let mut by: BTreeMap<String, Vec<&Fault>> = BTreeMap::new();
        for f in &self.faults {
            by.entry(f.kind.name()).or_default().push(f);
        }
        for (k, fs) in &by {
            let xs: Vec<f64> = fs.iter().filter_map(|f| f.recovery_ms).collect();
            s.push_str(&format!(
                "| {k} | {} | {} | {} |\n",
                fs.len(),
                ms(percentile(&xs, 0.5)),
                ms(xs.iter().copied().reduce(f64::max))
            ));
        }
        s.push_str(&format!(
            "\nRecovery (fault start to the next acknowledged write): p50 {} ms, p99 {} ms, max {} ms; {} faults with no acknowledged write after them.\n\n",
            ms(self.recovery_ms.p50),
            ms(self.recovery_ms.p99),
            ms(self.recovery_ms.max),
            self.recovery_ms.unrecovered
        ));
        s.push_str(
            "## Operations\n\n| operation | ok | failed | unknown |\n|---|---:|---:|---:|\n",
        );
        for (k, m) in &self.operations {
            let g = |o: &str| m.get(o).copied().unwrap_or(0);
            s.push_str(&format!(
                "| {k} | {} | {} | {} |\n",
                g("ok"),
                g("failed"),
                g("unknown")
            ));
        }
        s.push_str("\n## Violations\n\n");
        if self.violations.is_empty() {
            s.push_str("None.\n");
        }
        for v in &self.violations {
            s.push_str(&format!("- `{}`: {}\n", v.rule, v.detail));
        }
        if !self.notes.is_empty() {
            s.push_str("\n## Notes\n\n");
            for n in &self.notes {
                s.push_str(&format!("- {n}\n"));
            }
        }
        s
    }
}
