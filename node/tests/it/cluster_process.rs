//! Three `stacyvm serve` processes on loopback: bootstrap, forwarding,
//! linearizable reads, SIGKILL of the leader and restart, a fourth replica
//! joining, and refusals of wrong data directories. Drives the built binary.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_stacyvm")
}

/// A loopback port free for both TCP and UDP right now.
fn free_port() -> u16 {
    loop {
        let tcp = TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        let port = tcp.local_addr().expect("addr").port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

struct Proc {
    id: u64,
    args: Vec<String>,
    log: PathBuf,
    api: SocketAddr,
    child: Option<Child>,
}

impl Proc {
    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(bin())
            .args(&self.args)
            .env("STACYVM_LOG", "info")
            .stdout(Stdio::from(log.try_clone().expect("dup")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn stacyvm serve");
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

struct Cluster {
    _dir: tempfile::TempDir,
    root: PathBuf,
    procs: Vec<Proc>,
    http: reqwest::Client,
}

impl Cluster {
    fn dump_logs(&self) -> String {
        self.procs
            .iter()
            .map(|p| format!("--- node {} ---\n{}", p.id, p.tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn run_ok(args: &[&str]) {
    let out = Command::new(bin())
        .args(args)
        .output()
        .expect("run stacyvm");
    assert!(
        out.status.success(),
        "stacyvm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn serve_args(
    root: &Path,
    id: u64,
    raft: SocketAddr,
    api: SocketAddr,
    extra: &[String],
) -> Vec<String> {
    let mut a = vec![
        "serve".into(),
        "--id".into(),
        id.to_string(),
        "--data-dir".into(),
        root.join(format!("data-{id}")).display().to_string(),
        "--raft-addr".into(),
        raft.to_string(),
        "--api-addr".into(),
        api.to_string(),
        "--certs".into(),
        root.join("certs").display().to_string(),
        // Slower than the LAN default: debug builds share two cores with
        // other tests here, and a missed heartbeat must not start an election.
        "--heartbeat-ms".into(),
        "80".into(),
    ];
    a.extend(extra.iter().cloned());
    a
}

async fn start_cluster() -> Cluster {
    let dir = tempfile::tempdir().expect("tmp");
    let root = dir.path().to_path_buf();
    let certs = root.join("certs");
    run_ok(&["certs", "init", "--out", certs.to_str().expect("utf8")]);
    for id in 1..=4 {
        run_ok(&[
            "certs",
            "issue",
            "node",
            "--id",
            &id.to_string(),
            "--ca",
            certs.to_str().expect("utf8"),
            "--out",
            certs.to_str().expect("utf8"),
        ]);
    }
    let addrs: Vec<(SocketAddr, SocketAddr)> = (0..3)
        .map(|_| {
            let raft: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
            let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
            (raft, api)
        })
        .collect();
    let peers: Vec<String> = addrs
        .iter()
        .enumerate()
        .flat_map(|(i, (r, a))| ["--peer".to_string(), format!("{}={r}={a}", i + 1)])
        .collect();
    let mut procs = Vec::new();
    for (i, (raft, api)) in addrs.iter().enumerate() {
        let id = i as u64 + 1;
        let mut extra = vec!["--bootstrap".to_string()];
        extra.extend(peers.iter().cloned());
        let mut p = Proc {
            id,
            args: serve_args(&root, id, *raft, *api, &extra),
            log: root.join(format!("node-{id}.log")),
            api: *api,
            child: None,
        };
        p.start();
        procs.push(p);
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .expect("client");
    let c = Cluster {
        _dir: dir,
        root,
        procs,
        http,
    };
    for p in &c.procs {
        wait_ready(&c, p.api).await;
    }
    c
}

async fn wait_ready(c: &Cluster, api: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = c.http.get(format!("http://{api}/ready")).send().await
            && r.status().is_success()
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{api} not ready in 30 s\n{}",
            c.dump_logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn status(c: &Cluster, api: SocketAddr) -> Option<Value> {
    let r = c
        .http
        .get(format!("http://{api}/api/v1/cluster/status"))
        .send()
        .await
        .ok()?;
    r.json().await.ok()
}

/// Creates a tenant through `api`, retrying while there is no leader.
async fn create_tenant(c: &Cluster, api: SocketAddr, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = c
            .http
            .post(format!("http://{api}/api/v1/admin/tenants"))
            .json(&json!({ "id": id, "name": format!("tenant {id}") }))
            .send()
            .await;
        match r {
            Ok(resp) if resp.status().as_u16() == 201 => {
                assert!(
                    resp.headers().contains_key("x-stacyvm-leader"),
                    "leader hint on every response"
                );
                return;
            }
            // A retry after an unknown outcome may find it already created.
            Ok(resp) if resp.status().as_u16() == 409 => return,
            Ok(resp) if resp.status().as_u16() == 503 => {
                assert_eq!(
                    resp.headers().get("retry-after").map(|v| v.as_bytes()),
                    Some(&b"1"[..])
                );
            }
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "write {id} through {api} never succeeded\n{}",
            c.dump_logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn get_tenant(
    c: &Cluster,
    api: SocketAddr,
    id: &str,
    consistency: &str,
) -> reqwest::StatusCode {
    c.http
        .get(format!(
            "http://{api}/api/v1/admin/tenants/{id}?consistency={consistency}"
        ))
        .send()
        .await
        .map(|r| r.status())
        .unwrap_or(reqwest::StatusCode::SERVICE_UNAVAILABLE)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_serve_processes_survive_sigkill_of_the_leader_and_a_fourth_joins() {
    let mut c = start_cluster().await;
    let apis: Vec<SocketAddr> = c.procs.iter().map(|p| p.api).collect();

    // All three agree on one cluster and one leader.
    let s1 = status(&c, apis[0]).await.expect("status");
    let cluster_id = s1["cluster_id"].as_str().expect("cluster id").to_owned();
    let leader = s1["leader_id"].as_u64().expect("leader");
    for &api in &apis[1..] {
        let s = status(&c, api).await.expect("status");
        assert_eq!(
            s["cluster_id"].as_str(),
            Some(cluster_id.as_str()),
            "one cluster id"
        );
    }

    // Writes through any replica; linearizable reads on any other.
    let mut acked = Vec::new();
    for i in 0..9 {
        let id = format!("t-{i}");
        create_tenant(&c, apis[i % 3], &id).await;
        assert_eq!(
            get_tenant(&c, apis[(i + 1) % 3], &id, "linearizable").await,
            200,
            "read {id}"
        );
        acked.push(id);
    }
    let bad = c
        .http
        .get(format!(
            "http://{}/api/v1/admin/tenants/t-0?consistency=eventual",
            apis[0]
        ))
        .send()
        .await
        .expect("req");
    assert_eq!(bad.status(), 400);
    let err: Value = bad.json().await.expect("json");
    assert_eq!(err["code"], "BAD_REQUEST");
    assert!(err["request_id"].as_str().is_some_and(|r| !r.is_empty()));

    // SIGKILL the leader; the survivors elect a new one and keep every write.
    let li = c
        .procs
        .iter()
        .position(|p| p.id == leader)
        .expect("leader proc");
    c.procs[li].kill9();
    let survivors: Vec<SocketAddr> = apis
        .iter()
        .copied()
        .enumerate()
        .filter(|(i, _)| *i != li)
        .map(|(_, a)| a)
        .collect();
    for i in 9..15 {
        let id = format!("t-{i}");
        create_tenant(&c, survivors[i % 2], &id).await;
        acked.push(id);
    }
    for id in &acked {
        assert_eq!(
            get_tenant(&c, survivors[0], id, "linearizable").await,
            200,
            "{id} after failover"
        );
    }

    // The killed replica restarts from its data directory and catches up.
    c.procs[li].start();
    wait_ready(&c, apis[li]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    for id in &acked {
        while get_tenant(&c, apis[li], id, "stale").await != 200 {
            assert!(
                Instant::now() < deadline,
                "restarted node lacks {id}\n{}",
                c.dump_logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // A fourth replica joins through any member and becomes a voter.
    let raft4: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let api4: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let join = vec!["--join".to_string(), apis[(li + 1) % 3].to_string()];
    let mut p4 = Proc {
        id: 4,
        args: serve_args(&c.root, 4, raft4, api4, &join),
        log: c.root.join("node-4.log"),
        api: api4,
        child: None,
    };
    p4.start();
    c.procs.push(p4);
    wait_ready(&c, api4).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status(&c, api4).await;
        if let Some(s) = &s
            && s["voters"].as_array().is_some_and(|v| v.len() == 4)
            && s["cluster_id"].as_str() == Some(cluster_id.as_str())
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 4 never became a voter: {s:?}\n{}",
            c.dump_logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(get_tenant(&c, api4, "t-14", "linearizable").await, 200);

    // Transfer leadership to node 4 and see every replica agree.
    let out = Command::new(bin())
        .args([
            "cluster",
            "transfer-leader",
            "4",
            "--server",
            &api4.to_string(),
        ])
        .output()
        .expect("cli");
    assert!(
        out.status.success(),
        "transfer-leader: {}{}",
        String::from_utf8_lossy(&out.stderr),
        c.dump_logs()
    );
    // The CLI returns once node 4 leads; the others learn it from its
    // first heartbeat of the new term, so give them a moment.
    for api in apis.iter().chain([&api4]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = status(&c, *api).await;
            if s.as_ref().and_then(|s| s["leader_id"].as_u64()) == Some(4) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{api} never named node 4 as leader: {s:?}\n{}",
                c.dump_logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // Operator CLI: status and members through any replica.
    let out = Command::new(bin())
        .args([
            "cluster",
            "members",
            "--server",
            &apis[0].to_string(),
            "--output",
            "json",
        ])
        .output()
        .expect("cli");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let members: Value = serde_json::from_slice(&out.stdout).expect("members json");
    assert_eq!(
        members["voters"].as_array().map(Vec::len),
        Some(4),
        "{members}"
    );

    // Without a quorum a write waits a bounded time, then answers 503
    // NO_LEADER with Retry-After, or 504 TIMEOUT if the survivor still thinks
    // it leads and the outcome is unknown; never a hang or a 500.
    let last = c.procs.len() - 1;
    for p in &mut c.procs[..last] {
        p.kill9();
    }
    let started = Instant::now();
    let resp = c
        .http
        .post(format!("http://{}/api/v1/admin/tenants", c.procs[last].api))
        .json(&json!({ "id": "t-no-quorum", "name": "no quorum" }))
        .send()
        .await
        .expect("answered");
    let status = resp.status().as_u16();
    let retry_after = resp.headers().get("retry-after").cloned();
    let body: Value = resp.json().await.expect("json error body");
    let no_leader = status == 503 && body["code"] == "NO_LEADER" && retry_after.is_some();
    let unknown = status == 504 && body["code"] == "TIMEOUT";
    assert!(no_leader || unknown, "no quorum: {status} {body}");
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "bounded wait: {:?}",
        started.elapsed()
    );
}

/// Starts a one-replica cluster (generated certificates) in `data`; returns
/// the process once it is ready, and its arguments.
async fn single_node(root: &Path, name: &str) -> (Proc, Vec<String>) {
    let raft: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let args: Vec<String> = vec![
        "serve".into(),
        "--id".into(),
        "1".into(),
        "--data-dir".into(),
        root.join(name).display().to_string(),
        "--raft-addr".into(),
        raft.to_string(),
        "--api-addr".into(),
        api.to_string(),
    ];
    let mut p = Proc {
        id: 1,
        args: args.clone(),
        log: root.join(format!("{name}.log")),
        api,
        child: None,
    };
    p.start();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http
        .get(format!("http://{api}/ready"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(
            Instant::now() < deadline,
            "single node not ready:\n{}",
            p.tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (p, args)
}

#[tokio::test]
async fn a_data_directory_refuses_another_cluster() {
    let dir = tempfile::tempdir().expect("tmp");
    let (mut a, mut args) = single_node(dir.path(), "cluster-a").await;
    a.kill9();
    let (b, _) = single_node(dir.path(), "cluster-b").await;
    // Cluster A's directory, pointed at a member of cluster B: refused.
    args.extend(["--join".to_string(), b.api.to_string()]);
    let out = Command::new(bin()).args(&args).output().expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("belongs to cluster"), "{err}");
}

#[tokio::test]
async fn a_data_directory_refuses_another_node_id() {
    let dir = tempfile::tempdir().expect("tmp");
    let (mut p, mut args) = single_node(dir.path(), "data").await;
    p.kill9();
    // Same directory, another node ID: refused with exit code 3 and a clear reason.
    args[2] = "2".into();
    let out = Command::new(bin()).args(&args).output().expect("run");
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("belongs to node 1"));
}
