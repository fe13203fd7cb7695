//! `stacyvm dev`: a whole local HA cluster in one command.
//!
//! Owns: generating a cluster CA and node certificates, starting three
//! replicas (API on 127.0.0.1:7423, :7424, :7425; SQLite) and two workers as
//! child processes of this binary, printing the endpoints, following
//! leadership (printed, and written to `<dir>/leader.pid` so scripts can kill
//! the leader), and stopping every child on Ctrl-C. Everything binds
//! loopback; child logs go to `<dir>/*.log`.
//!
//! Does not own: anything the children do; it only starts, watches and stops them.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use clap::Args;
use tokio::process::{Child, Command};

use crate::cli::CliError;

#[derive(Debug, Clone, Args)]
pub struct DevArgs {
    /// Directory for data, certificates, logs and pid files (wiped at start
    /// when it was made by an earlier `stacyvm dev`).
    #[arg(long, default_value = "/tmp/stacyvm-dev")]
    pub dir: PathBuf,
    /// Runtime the workers offer. `auto` (default): `docker` when a dockerd
    /// answers and has the image `busybox` (no registry is assumed; `stacyvm
    /// image import ROOTFS.tar --tag busybox` adds it), `mock` otherwise, with
    /// the reason printed. `mock` needs nothing; `docker`, `gvisor` or `kata`
    /// need a dockerd with that OCI runtime and the images present locally.
    /// PRoot needs an image table: run `stacyvm worker --runtimes proot
    /// --proot-image ...`.
    #[arg(long, default_value = "auto")]
    pub runtime: String,
    /// First API port; replicas use it and the next two.
    #[arg(long, default_value_t = 7423)]
    pub api_port: u16,
    /// First Raft (QUIC) port; replicas use it and the next two.
    #[arg(long, default_value_t = 7001)]
    pub raft_port: u16,
    /// First worker RPC port; workers use it and the next one.
    #[arg(long, default_value_t = 7431)]
    pub worker_port: u16,
    /// Number of workers.
    #[arg(long, default_value_t = 2)]
    pub workers: u16,
}

const MARKER: &str = ".stacyvm-dev";

struct Proc {
    name: String,
    child: Child,
}

fn spawn_child(
    exe: &std::path::Path,
    dir: &std::path::Path,
    name: &str,
    args: &[String],
) -> Result<Proc, CliError> {
    let log = std::fs::File::create(dir.join(format!("{name}.log")))
        .map_err(|e| CliError::Failed(format!("{name}.log: {e}")))?;
    let log2 = log
        .try_clone()
        .map_err(|e| CliError::Failed(e.to_string()))?;
    let child = Command::new(exe)
        .args(args)
        .env(
            "STACYVM_LOG",
            std::env::var("STACYVM_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|e| CliError::Failed(format!("cannot start {name}: {e}")))?;
    if let Some(pid) = child.id() {
        let _ = std::fs::write(dir.join(format!("{name}.pid")), pid.to_string());
    }
    Ok(Proc {
        name: name.to_string(),
        child,
    })
}

fn signal(p: &Proc, sig: i32) {
    if let Some(pid) = p.child.id()
        && let Ok(pid) = i32::try_from(pid)
    {
        // A child this process started and has not reaped: the PID is ours.
        stacyvm_runtimes::sys::kill(pid, sig);
    }
}

async fn stop_all(procs: &mut [Proc]) {
    // Workers first (they destroy their sandboxes on SIGINT with --destroy-on-exit),
    // then replicas.
    for p in procs.iter().filter(|p| p.name.starts_with("worker")) {
        signal(p, libc::SIGINT);
    }
    for p in procs.iter_mut().filter(|p| p.name.starts_with("worker")) {
        let _ = tokio::time::timeout(Duration::from_secs(10), p.child.wait()).await;
    }
    for p in procs.iter() {
        signal(p, libc::SIGTERM);
    }
    for p in procs.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(5), p.child.wait())
            .await
            .is_err()
        {
            let _ = p.child.kill().await;
        }
    }
}

/// The image `stacyvm spawn` uses when none is given.
const DEFAULT_IMAGE: &str = "busybox";

/// What `--runtime auto` found on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
enum DockerProbe {
    Ready,
    NoImage,
    NoDaemon(String),
}

/// `auto` → `docker` or `mock`, with the reason for a fallback. Pure.
fn resolve_runtime(requested: &str, probe: &DockerProbe) -> (String, Option<String>) {
    if requested != "auto" {
        return (requested.to_string(), None);
    }
    match probe {
        DockerProbe::Ready => ("docker".into(), None),
        DockerProbe::NoImage => (
            "mock".into(),
            Some(format!(
                "dockerd answers but has no image {DEFAULT_IMAGE:?} and no registry is assumed; \
                 `stacyvm image import ROOTFS.tar --tag {DEFAULT_IMAGE}` adds one"
            )),
        ),
        DockerProbe::NoDaemon(why) => ("mock".into(), Some(format!("no Docker: {why}"))),
    }
}

async fn probe_docker(dir: &std::path::Path) -> DockerProbe {
    let Some(opts) = stacyvm_runtimes::docker::DockerOptions::new("docker", dir.join("probe"))
    else {
        return DockerProbe::NoDaemon("docker runtime unavailable".into());
    };
    let rt = match stacyvm_runtimes::docker::DockerRuntime::connect(opts).await {
        Ok(rt) => rt,
        Err(e) => return DockerProbe::NoDaemon(e.to_string()),
    };
    if let Err(e) = stacyvm_runtimes::Runtime::health(&rt).await {
        return DockerProbe::NoDaemon(e.to_string());
    }
    match rt.has_image(DEFAULT_IMAGE).await {
        Ok(true) => DockerProbe::Ready,
        Ok(false) => DockerProbe::NoImage,
        Err(e) => DockerProbe::NoDaemon(e.to_string()),
    }
}

/// Runs the dev cluster until Ctrl-C.
pub async fn run(mut a: DevArgs) -> Result<(), CliError> {
    if !matches!(
        a.runtime.as_str(),
        "auto" | "mock" | "docker" | "gvisor" | "kata"
    ) {
        return Err(CliError::Usage(format!(
            "--runtime {:?}: stacyvm dev offers auto, mock, docker, gvisor or kata",
            a.runtime
        )));
    }
    if a.dir.exists() {
        if !a.dir.join(MARKER).exists() {
            return Err(CliError::Refused(format!(
                "{} exists and was not made by `stacyvm dev`; pass another --dir",
                a.dir.display()
            )));
        }
        std::fs::remove_dir_all(&a.dir)
            .map_err(|e| CliError::Failed(format!("cannot clear {}: {e}", a.dir.display())))?;
    }
    std::fs::create_dir_all(&a.dir).map_err(|e| CliError::Failed(e.to_string()))?;
    std::fs::write(a.dir.join(MARKER), "").map_err(|e| CliError::Failed(e.to_string()))?;
    if a.runtime == "auto" {
        let probe = probe_docker(&a.dir).await;
        let _ = std::fs::remove_dir_all(a.dir.join("probe"));
        let (rt, why) = resolve_runtime(&a.runtime, &probe);
        if let Some(why) = why {
            println!("runtime: {rt} ({why})");
        } else {
            println!("runtime: {rt} (dockerd answers and has image {DEFAULT_IMAGE:?})");
        }
        a.runtime = rt;
    }
    let exe = std::env::current_exe().map_err(|e| CliError::Failed(e.to_string()))?;
    let certs = a.dir.join("certs");
    stacyvm_raft::certs::init_ca(&certs).map_err(|e| CliError::Failed(e.to_string()))?;
    for i in 1..=3u64 {
        stacyvm_raft::certs::issue_node(&certs, i, &certs)
            .map_err(|e| CliError::Failed(e.to_string()))?;
    }
    let api = |i: u16| format!("127.0.0.1:{}", a.api_port + i - 1);
    let raft = |i: u16| format!("127.0.0.1:{}", a.raft_port + i - 1);
    let mut peers = Vec::new();
    for i in 1..=3u16 {
        peers.push("--peer".to_string());
        peers.push(format!("{i}={}={}", raft(i), api(i)));
    }
    let mut procs = Vec::new();
    for i in 1..=3u16 {
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--id".into(),
            i.to_string(),
            "--data-dir".into(),
            a.dir.join(format!("node-{i}")).display().to_string(),
            "--certs".into(),
            certs.display().to_string(),
            "--raft-addr".into(),
            raft(i),
            "--api-addr".into(),
            api(i),
            // A spawn that names no runtime gets the one the workers offer.
            "--default-runtime".into(),
            a.runtime.clone(),
            "--bootstrap".into(),
        ];
        args.extend(peers.iter().cloned());
        procs.push(spawn_child(&exe, &a.dir, &format!("node-{i}"), &args)?);
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .map_err(|e| CliError::Failed(e.to_string()))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    'ready: loop {
        for i in 1..=3u16 {
            let ok = http
                .get(format!("http://{}/ready", api(i)))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                break 'ready;
            }
        }
        if Instant::now() > deadline {
            stop_all(&mut procs).await;
            return Err(CliError::Failed(format!(
                "the replicas did not become ready; see {}/node-*.log",
                a.dir.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let bootstrap = (1..=3u16).map(api).collect::<Vec<_>>().join(",");
    for w in 1..=a.workers {
        let args: Vec<String> = vec![
            "worker".into(),
            "--id".into(),
            format!("worker-{w}"),
            "--bootstrap".into(),
            bootstrap.clone(),
            "--rpc-addr".into(),
            format!("127.0.0.1:{}", a.worker_port + w - 1),
            "--runtimes".into(),
            a.runtime.clone(),
            "--state-dir".into(),
            a.dir.join(format!("worker-{w}")).display().to_string(),
            "--destroy-on-exit".into(),
        ];
        procs.push(spawn_child(&exe, &a.dir, &format!("worker-{w}"), &args)?);
    }
    println!("StacyVM dev cluster in {}", a.dir.display());
    for i in 1..=3u16 {
        println!(
            "  replica {i}: http://{}  (raft {}, log {}/node-{i}.log)",
            api(i),
            raft(i),
            a.dir.display()
        );
    }
    for w in 1..=a.workers {
        println!(
            "  worker-{w}: rpc http://127.0.0.1:{}  runtime {}",
            a.worker_port + w - 1,
            a.runtime
        );
    }
    println!(
        "  clients: export STACYVM_SERVER={}",
        (1..=3u16)
            .map(|i| format!("http://{}", api(i)))
            .collect::<Vec<_>>()
            .join(",")
    );
    println!(
        "  the leader's pid is kept in {}/leader.pid; Ctrl-C stops everything",
        a.dir.display()
    );

    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| CliError::Failed(e.to_string()))?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| CliError::Failed(e.to_string()))?;
    let mut leader: Option<u64> = None;
    let mut reported_exit = std::collections::HashSet::new();
    loop {
        tokio::select! {
            _ = int.recv() => break,
            _ = term.recv() => break,
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
        let mut now_leader = None;
        for i in 1..=3u16 {
            if let Ok(r) = http
                .get(format!(
                    "http://{}/api/v1/cluster/status?consistency=stale",
                    api(i)
                ))
                .send()
                .await
                && let Ok(v) = r.json::<serde_json::Value>().await
                && let Some(l) = v.get("leader_id").and_then(|l| l.as_u64())
            {
                now_leader = Some(l);
                break;
            }
        }
        if now_leader != leader && now_leader.is_some() {
            let l = now_leader.unwrap_or(0);
            println!(
                "leader: replica {l} (http://{})",
                api(u16::try_from(l).unwrap_or(1))
            );
            if let Ok(pid) = std::fs::read_to_string(a.dir.join(format!("node-{l}.pid"))) {
                let _ = std::fs::write(a.dir.join("leader.pid"), pid);
            }
            leader = now_leader;
        }
        for p in procs.iter_mut() {
            if !reported_exit.contains(&p.name)
                && let Ok(Some(status)) = p.child.try_wait()
            {
                println!(
                    "{} exited ({status}); see {}/{}.log",
                    p.name,
                    a.dir.display(),
                    p.name
                );
                reported_exit.insert(p.name.clone());
            }
        }
    }
    println!("stopping...");
    stop_all(&mut procs).await;
    println!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_docker_only_when_it_can_run_the_default_image() {
        let cases = [
            ("auto", DockerProbe::Ready, "docker", false),
            ("auto", DockerProbe::NoImage, "mock", true),
            (
                "auto",
                DockerProbe::NoDaemon("refused".into()),
                "mock",
                true,
            ),
            ("mock", DockerProbe::Ready, "mock", false),
            ("gvisor", DockerProbe::NoDaemon("x".into()), "gvisor", false),
        ];
        for (req, probe, want, has_reason) in cases {
            let (got, why) = resolve_runtime(req, &probe);
            assert_eq!(got, want, "{req} with {probe:?}");
            assert_eq!(why.is_some(), has_reason, "{req} with {probe:?}");
        }
    }
}
