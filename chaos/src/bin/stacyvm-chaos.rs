//! `stacyvm-chaos`: runs a chaos profile against the built `stacyvm` binary
//! and writes `report.json` and `summary.md` under `--out` (default
//! `target/chaos/<seed>`). Exit code 0 = no violation, 1 = violations,
//! 2 = the harness itself failed.
//!
//!   stacyvm-chaos --profile ci                      # ≤ 10 min, ≥ 100 faults, every nemesis
//!   stacyvm-chaos --profile soak --duration 30m --nemeses kill-leader,partition-worker
//!   stacyvm-chaos --seed 1234                       # replays that seed's schedule

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use clap::Parser;
use stacyvm_chaos::checker::{self, Evidence, FinalReads, Outcome, Violation};
use stacyvm_chaos::cluster::{Cluster, Database, Options, find_binary};
use stacyvm_chaos::nemesis::{Fault, Kind, Nemesis, Schedule};
use stacyvm_chaos::proxy::{Links, Node};
use stacyvm_chaos::report::{self, Report};
use stacyvm_chaos::rng::Rng;
use stacyvm_chaos::workload::{self, History};

#[derive(Parser, Debug)]
struct Args {
    /// `ci` (bounded, every nemesis) or `soak` (duration and nemeses from the flags).
    #[arg(long, default_value = "ci", value_parser = ["ci", "soak"])]
    profile: String,
    /// Seed of the fault schedule and every random choice (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Soak: how long to inject faults (e.g. 30m); ci: at most this long.
    #[arg(long)]
    duration: Option<String>,
    /// Faults to inject at least (ci default 100).
    #[arg(long)]
    faults: Option<usize>,
    /// Comma-separated nemeses (default: all).
    #[arg(long, value_delimiter = ',')]
    nemeses: Vec<String>,
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(3..=5))]
    replicas: u64,
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=9))]
    workers: u32,
    /// Report directory (default target/chaos/<seed>, or
    /// target/chaos/<seed>-<database> off SQLite).
    #[arg(long)]
    out: Option<PathBuf>,
    /// System of record: `sqlite` (each replica's own file), `postgres` (a
    /// database per replica) or `postgres-shared` (one database for all);
    /// the Postgres profiles create their databases on the server that
    /// `STACYVM_POSTGRES_TEST_DSN` names and drop them afterwards.
    #[arg(long, default_value = "sqlite", value_parser = ["sqlite", "postgres", "postgres-shared"])]
    database: String,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("bad duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(v * mult))
}

/// Log lines at ERROR that a run may print: each names a fault the
/// harness caused on purpose. Anything else fails the run.
const EXPECTED_ERRORS: &[&str] = &[
    // openraft logs an unreachable peer at ERROR: every partition, kill
    // and pause makes some.
    "openraft::replication: RPCError err=Unreachable",
    "openraft::replication: RPCError err=Network",
    "openraft::replication: RPCError err=timeout",
    "openraft::core::raft_core: timeout error=timeout after",
    "timeout while confirming leadership for read request",
    "while requesting vote error=Unreachable",
    "while requesting vote error=Network",
];

fn error_lines(c: &Cluster) -> Vec<Violation> {
    let mut out = Vec::new();
    for (node, path) in c.logs() {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        for line in text.lines().filter(|l| l.contains(" ERROR ")) {
            if EXPECTED_ERRORS.iter().any(|e| line.contains(e)) {
                continue;
            }
            out.push(Violation {
                rule: "log_error".into(),
                detail: format!("{node:?}: {}", line.chars().take(300).collect::<String>()),
            });
        }
    }
    out
}

fn read_evidence(c: &Cluster) -> Vec<Evidence> {
    let mut out = Vec::new();
    for w in c.workers.keys() {
        let text = std::fs::read_to_string(c.evidence_path(*w)).unwrap_or_default();
        out.extend(
            text.lines()
                .filter_map(|l| serde_json::from_str::<Evidence>(l).ok()),
        );
    }
    out
}

async fn leader_url(c: &Cluster) -> Option<String> {
    c.leader().await.map(|l| c.api_url(l))
}

/// Every sandbox on record (paged).
async fn all_sandboxes(
    http: &reqwest::Client,
    url: &str,
) -> Result<Vec<serde_json::Value>, String> {
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let v: serde_json::Value = http
            .get(format!("{url}/api/v1/sandboxes?limit=500&offset={offset}"))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        let page = v.get("sandboxes").cloned().unwrap_or(v);
        let page = page
            .as_array()
            .cloned()
            .ok_or("sandbox list is not a list")?;
        let n = page.len();
        out.extend(page);
        if n < 500 {
            return Ok(out);
        }
        offset += 500;
    }
}

struct Run {
    args: Args,
    seed: u64,
    out: PathBuf,
}

impl Run {
    async fn go(self) -> Result<Report, String> {
        let Run {
            args,
            seed,
            out: out_dir,
        } = self;
        let ci = args.profile == "ci";
        let budget = match &args.duration {
            Some(d) => parse_duration(d)?,
            None if ci => Duration::from_secs(420),
            None => Duration::from_secs(600),
        };
        let min_faults = args.faults.unwrap_or(if ci { 100 } else { 0 });
        let chosen: Vec<Kind> = if args.nemeses.is_empty() {
            Kind::REPLICA
                .iter()
                .chain(Kind::WORKER.iter())
                .copied()
                .collect()
        } else {
            args.nemeses
                .iter()
                .map(|n| Kind::parse(n).ok_or(format!("unknown nemesis {n:?}")))
                .collect::<Result<_, _>>()?
        };
        let mut rng = Rng::new(seed);
        let mut opts = Options::new(find_binary().map_err(|e| e.to_string())?);
        opts.replicas = args.replicas;
        opts.workers = args.workers;
        opts.database = match args.database.as_str() {
            "sqlite" => Database::Sqlite,
            mode => {
                let base = std::env::var("STACYVM_POSTGRES_TEST_DSN")
                    .ok()
                    .filter(|d| !d.is_empty())
                    .ok_or("--database postgres* needs STACYVM_POSTGRES_TEST_DSN (a server the harness may create databases on)")?;
                if mode == "postgres" {
                    Database::Postgres { base }
                } else {
                    Database::PostgresShared { base }
                }
            }
        };
        let links = Links::new(rng.next_u64());
        eprintln!(
            "chaos: seed {seed}, profile {}, database {}, nemeses {:?}",
            args.profile,
            args.database,
            chosen.iter().map(|k| k.name()).collect::<Vec<_>>()
        );
        let mut c = Cluster::start(opts, links)
            .await
            .map_err(|e| e.to_string())?;
        let origin = Instant::now();
        let history = History::new(origin);
        let targets: workload::Targets = Arc::new(RwLock::new(c.api_urls()));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut clients = Vec::new();
        for i in 0..3 {
            clients.push(tokio::spawn(workload::sandbox_client(
                i,
                targets.clone(),
                history.clone(),
                rng.fork(),
                stop_rx.clone(),
            )));
        }
        let resources: Vec<String> = (0..2).map(|i| format!("chaos-lease-{i}")).collect();
        for i in 10..12 {
            clients.push(tokio::spawn(workload::lease_client(
                i,
                targets.clone(),
                history.clone(),
                rng.fork(),
                resources.clone(),
                1500,
                stop_rx.clone(),
            )));
        }
        let mut nemesis = Nemesis::new(rng.fork(), args.replicas + 1, origin);
        let mut notes = Vec::new();
        let mut faults: Vec<Fault> = Vec::new();
        let result: Result<(), String> = async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            if chosen.contains(&Kind::StaleRestart) {
                nemesis.take_stale_copy(&mut c).await?;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let replica_kinds: Vec<Kind> = chosen
                .iter()
                .copied()
                .filter(|k| Kind::REPLICA.contains(k))
                .collect();
            let worker_kinds: Vec<Kind> = chosen
                .iter()
                .copied()
                .filter(|k| Kind::WORKER.contains(k))
                .collect();
            let mut schedule = Schedule::new(rng.fork(), replica_kinds, worker_kinds);
            let started = Instant::now();
            loop {
                let enough = faults.len() >= min_faults;
                if (ci && enough) || started.elapsed() >= budget {
                    break;
                }
                let (r, w) = schedule.next_round();
                let done = nemesis.round(&mut c, r, w).await?;
                for f in &done {
                    eprintln!(
                        "chaos: {:>7.1}s {:<16} {} {}",
                        f.start_ms / 1000.0,
                        f.kind.name(),
                        f.target,
                        f.note
                    );
                }
                faults.extend(done);
                *targets.write().unwrap_or_else(|p| p.into_inner()) = c.api_urls();
                // Let the workload show recovery before the next fault.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            if ci && faults.len() < min_faults {
                notes.push(format!(
                    "only {} faults in {:?} (wanted {min_faults})",
                    faults.len(),
                    budget
                ));
            }
            Ok(())
        }
        .await;
        let _ = stop_tx.send(true);
        for h in clients {
            let _ = tokio::time::timeout(Duration::from_secs(30), h).await;
        }
        let duration_s = origin.elapsed().as_secs_f64();
        let mut violations: Vec<Violation> = Vec::new();
        if let Err(e) = result {
            violations.push(Violation {
                rule: "harness".into(),
                detail: e,
            });
        }
        // Heal everything and bring every member back.
        c.links.heal();
        for i in c.members() {
            c.resume(Node::Replica(i));
            if !c.is_running(Node::Replica(i)) {
                c.kill(Node::Replica(i));
                c.start_replica(i, false).map_err(|e| e.to_string())?;
            }
        }
        for w in c.workers.keys().copied().collect::<Vec<_>>() {
            c.resume(Node::Worker(w));
            if !c.is_running(Node::Worker(w)) {
                c.kill(Node::Worker(w));
                c.start_worker(w).map_err(|e| e.to_string())?;
            }
        }
        let ops = history.ops();
        let check: Result<Vec<Violation>, String> = final_checks(&mut c, &ops).await;
        match check {
            Ok(v) => violations.extend(v),
            Err(e) => violations.push(Violation {
                rule: "converged".into(),
                detail: e,
            }),
        }
        let starts: Vec<f64> = faults.iter().map(|f| f.start_ms).collect();
        for (f, r) in faults.iter_mut().zip(checker::recovery_ms(&starts, &ops)) {
            f.recovery_ms = r;
        }
        violations.extend(error_lines(&c));
        // Keep every log and evidence file with the report.
        let logs = out_dir.join("logs");
        let _ = std::fs::create_dir_all(&logs);
        for (_, path) in c.logs() {
            if let Some(name) = path.file_name() {
                let _ = std::fs::copy(&path, logs.join(name));
            }
        }
        for w in c.workers.keys() {
            let p = c.evidence_path(*w);
            if let Some(name) = p.file_name() {
                let _ = std::fs::copy(&p, logs.join(name));
            }
        }
        if !violations.is_empty() {
            eprintln!("{}", c.tails(40));
        }
        Ok(Report {
            profile: args.profile.clone(),
            seed,
            replicas: args.replicas,
            workers: args.workers,
            database: args.database.clone(),
            duration_s,
            recovery_ms: report::recovery(&faults),
            faults,
            operations: report::count_ops(&ops),
            violations,
            notes,
        })
    }
}

/// Convergence, the history checks, then cleanup and the orphan check.
async fn final_checks(c: &mut Cluster, ops: &[checker::Op]) -> Result<Vec<Violation>, String> {
    let mut v = Vec::new();
    c.wait_ready(Duration::from_secs(60))
        .await
        .map_err(|e| e.to_string())?;
    c.wait_leader(Duration::from_secs(30))
        .await
        .map_err(|e| e.to_string())?;
    c.wait_workers_online(Duration::from_secs(30))
        .await
        .map_err(|e| e.to_string())?;
    // Converged: one leader, equal applied index, identical digests. Workers
    // are paused meanwhile so nothing new is written.
    for w in c.workers.keys().copied().collect::<Vec<_>>() {
        c.pause(Node::Worker(w));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let converged = loop {
        let mut digests = BTreeMap::new();
        for i in c.members() {
            if let Some(d) = c.digest(i).await {
                digests.insert(i, d);
            }
        }
        let indexes: std::collections::BTreeSet<u64> =
            digests.values().map(|d| d.applied_index).collect();
        if digests.len() == c.members().len() && indexes.len() == 1 {
            let sums: std::collections::BTreeSet<&str> =
                digests.values().map(|d| d.digest.as_str()).collect();
            if sums.len() != 1 {
                v.push(Violation {
                    rule: "converged".into(),
                    detail: format!(
                        "replicas at one applied index hold different stores: {:?}",
                        digests
                            .values()
                            .map(|d| (d.node_id, &d.digest[..12], d.sandboxes))
                            .collect::<Vec<_>>()
                    ),
                });
            }
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for w in c.workers.keys().copied().collect::<Vec<_>>() {
        c.resume(Node::Worker(w));
    }
    if !converged {
        v.push(Violation {
            rule: "converged".into(),
            detail: "replicas never reached one applied index within 30 s".into(),
        });
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let url = leader_url(c).await.ok_or("no leader for the final reads")?;
    let mut reads: FinalReads = BTreeMap::new();
    for id in ops
        .iter()
        .filter(|o| o.outcome == Outcome::Ok)
        .filter_map(|o| o.sandbox_id.clone())
    {
        if reads.contains_key(&id) {
            continue;
        }
        let r = http
            .get(format!("{url}/api/v1/sandboxes/{id}"))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let state = if r.status().as_u16() == 404 {
            None
        } else {
            let body: serde_json::Value = r.json().await.map_err(|e| e.to_string())?;
            Some(
                body.get("state")
                    .and_then(|s| s.as_str())
                    .unwrap_or("?")
                    .to_string(),
            )
        };
        reads.insert(id, state);
    }
    v.extend(checker::check_acked(ops, &reads));
    v.extend(checker::check_leases(ops, 50.0));
    v.extend(checker::check_evidence(&read_evidence(c)));
    // Destroy everything on record; then nothing may still run anywhere.
    for sb in all_sandboxes(&http, &url).await? {
        let (Some(id), Some(state)) = (
            sb.get("id").and_then(|x| x.as_str()),
            sb.get("state").and_then(|x| x.as_str()),
        ) else {
            continue;
        };
        if !matches!(state, "destroyed") {
            // Retried: a destroy refused now (worker busy, leader moving)
            // would otherwise show up as an orphan below.
            let mut last = String::new();
            let mut done = false;
            for _ in 0..10 {
                match http
                    .delete(format!("{url}/api/v1/sandboxes/{id}"))
                    .send()
                    .await
                {
                    Ok(r) if r.status().is_success() || r.status().as_u16() == 404 => {
                        done = true;
                        break;
                    }
                    Ok(r) => {
                        last = format!(
                            "HTTP {}: {}",
                            r.status(),
                            r.text().await.unwrap_or_default()
                        )
                    }
                    Err(e) => last = e.to_string(),
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            if !done {
                v.push(Violation {
                    rule: "destroy_failed".into(),
                    detail: format!(
                        "{id} ({state}) could not be destroyed after the faults healed: {last}"
                    ),
                });
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let orphans = checker::check_orphans(&read_evidence(c));
        if orphans.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            v.extend(orphans);
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(v)
}

fn main() {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let out = args.out.clone().unwrap_or_else(|| {
        let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
        let name = if args.database == "sqlite" {
            seed.to_string()
        } else {
            format!("{seed}-{}", args.database)
        };
        PathBuf::from(target).join("chaos").join(name)
    });
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chaos: cannot start a runtime: {e}");
            std::process::exit(2);
        }
    };
    let report = match rt.block_on(
        Run {
            args,
            seed,
            out: out.clone(),
        }
        .go(),
    ) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chaos: the harness failed (seed {seed}): {e}");
            std::process::exit(2);
        }
    };
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(&out)?;
        std::fs::write(
            out.join("report.json"),
            serde_json::to_vec_pretty(&report).unwrap_or_default(),
        )?;
        std::fs::write(out.join("summary.md"), report.markdown())
    };
    if let Err(e) = write() {
        eprintln!(
            "chaos: cannot write the report under {}: {e}",
            out.display()
        );
    }
    println!("{}", report.markdown());
    println!("report: {}", out.display());
    if !report.violations.is_empty() {
        eprintln!(
            "chaos: {} violations (replay with --seed {seed})",
            report.violations.len()
        );
        std::process::exit(1);
    }
}
