//! Worker liveness, fencing and re-attachment, with real agents.

use std::time::{Duration, Instant};

use stacyvm_api::{SpawnRequest, codes};
use stacyvm_store::StoreDriver;

use crate::plane::{Plane, W, eventually, fast, workers_online};

fn spawn_req() -> SpawnRequest {
    SpawnRequest {
        image: "busybox".into(),
        ..Default::default()
    }
}

async fn status_of(c: &stacyvm_client::Client, id: &str) -> String {
    c.workers()
        .await
        .ok()
        .and_then(|ws| ws.into_iter().find(|w| w.id == id))
        .map(|w| w.status)
        .unwrap_or_default()
}

/// A worker that stops heartbeating: stale after three missed beats (no new
/// placements), it stops its own sandboxes before its leases could expire
/// (fencing), then the leader declares it offline, revokes its leases and
/// marks its sandboxes lost; destroying a lost sandbox succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn silent_worker_goes_stale_then_offline_and_fences_itself() {
    let plane = Plane::start(1, StoreDriver::Sqlite, fast())
        .await
        .expect("plane");
    let a = W::start("worker-a", plane.apis(), Duration::from_millis(500)).await;
    let b = W::start("worker-b", plane.apis(), Duration::from_millis(500)).await;
    let c = plane.client();
    workers_online(&c, 2).await;
    let mut on_a = Vec::new();
    for _ in 0..4 {
        let sb = c.spawn(&spawn_req()).await.expect("spawn");
        if sb.worker_id == "worker-a" {
            on_a.push(sb.id);
        }
    }
    assert_eq!(on_a.len(), 2);

    a.stop_heartbeats();
    let silent_since = Instant::now();
    eventually(Duration::from_secs(3), "worker-a stale", || async {
        status_of(&c, "worker-a").await == "stale"
    })
    .await;
    // While stale, every new sandbox goes to worker-b.
    let sb = c.spawn(&spawn_req()).await.expect("spawn while a is stale");
    assert_eq!(sb.worker_id, "worker-b");

    // Fencing: worker-a stops its sandboxes once lease_ttl - margin passed
    // without a renewal, before the leader may declare it offline.
    eventually(
        Duration::from_secs(5),
        "worker-a fenced its sandboxes",
        || async { a.running_here().await.is_empty() },
    )
    .await;
    let fenced_after = silent_since.elapsed();
    eventually(Duration::from_secs(5), "worker-a offline", || async {
        status_of(&c, "worker-a").await == "offline"
    })
    .await;
    let offline_after = silent_since.elapsed();
    eventually(Duration::from_secs(3), "its sandboxes lost", || async {
        c.get(&on_a[0]).await.is_ok_and(|s| s.state == "lost")
    })
    .await;
    assert!(
        fenced_after < offline_after,
        "fenced at {fenced_after:?}, offline at {offline_after:?}"
    );
    assert!(
        fenced_after >= Duration::from_millis(900),
        "fenced too early: {fenced_after:?}"
    );

    for id in &on_a {
        let s = c.get(id).await.expect("get");
        assert_eq!(s.state, "lost", "{id}");
        assert_eq!(s.generation, 0, "its lease is revoked");
    }
    // Destroying a sandbox whose worker is gone succeeds.
    c.destroy(&on_a[0]).await.expect("destroy lost sandbox");
    assert_eq!(
        c.get(&on_a[0])
            .await
            .err()
            .and_then(|e| e.code().map(str::to_owned))
            .as_deref(),
        Some(codes::NOT_FOUND)
    );
    a.cleanup().await;
    b.cleanup().await;
    plane.shutdown().await;
}

/// A worker that crashes and comes back on the same host adopts what still
/// runs, and the leader tells it which sandboxes it no longer owns: it
/// destroys them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn returning_worker_stops_what_it_no_longer_owns() {
    let plane = Plane::start(1, StoreDriver::Sqlite, fast())
        .await
        .expect("plane");
    let a = W::start("worker-a", plane.apis(), Duration::from_millis(500)).await;
    let c = plane.client();
    workers_online(&c, 1).await;
    let s1 = c.spawn(&spawn_req()).await.expect("spawn 1");
    let s2 = c.spawn(&spawn_req()).await.expect("spawn 2");
    let rpc_addr: std::net::SocketAddr = a
        .rpc_url
        .trim_start_matches("http://")
        .parse()
        .expect("addr");

    // Crash: the sandboxes keep running on the host; nobody renews them.
    a.crash();
    assert_eq!(a.running_here().await.len(), 2);
    eventually(Duration::from_secs(5), "its sandboxes lost", || async {
        c.get(&s2.id).await.is_ok_and(|s| s.state == "lost")
    })
    .await;
    // Destroy one while the worker is gone: it succeeds at once.
    c.destroy(&s1.id)
        .await
        .expect("destroy while the worker is down");
    assert_eq!(c.get(&s2.id).await.expect("get").state, "lost");

    // Restart on the same state directory: adoption claims both, the leader
    // answers "lost" for both, and the worker stops them.
    let state = a.crash_keep_state();
    let a2 = W::start_in(
        "worker-a",
        plane.apis(),
        Duration::from_millis(500),
        state,
        Some(rpc_addr),
    )
    .await;
    eventually(Duration::from_secs(5), "worker-a online again", || async {
        status_of(&c, "worker-a").await == "online"
    })
    .await;
    eventually(
        Duration::from_secs(5),
        "stale sandboxes stopped",
        || async { a2.running_here().await.is_empty() },
    )
    .await;
    // And it takes new work.
    let s3 = c.spawn(&spawn_req()).await.expect("spawn after return");
    assert_eq!(s3.worker_id, "worker-a");
    assert_eq!(a2.running_here().await, vec![s3.id.clone()]);
    a2.cleanup().await;
    plane.shutdown().await;
}

/// Destroy whose RPC cannot reach the worker still succeeds; the worker
/// learns at its next heartbeat and stops the sandbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn destroy_reaches_a_worker_through_its_heartbeat() {
    let plane = Plane::start(1, StoreDriver::Sqlite, fast())
        .await
        .expect("plane");
    let a = W::start("worker-a", plane.apis(), Duration::from_millis(500)).await;
    let c = plane.client();
    workers_online(&c, 1).await;
    let sb = c.spawn(&spawn_req()).await.expect("spawn");
    a.stop_rpc();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let probe = reqwest::Client::new()
        .get(format!("{}/health", a.rpc_url))
        .send()
        .await;
    assert!(probe.is_err(), "the worker's RPC server is down");
    assert_eq!(a.running_here().await, vec![sb.id.clone()]);
    c.destroy(&sb.id)
        .await
        .expect("destroy succeeds without the worker's RPC");
    eventually(Duration::from_secs(3), "sandbox stopped", || async {
        a.running_here().await.is_empty()
    })
    .await;
    a.cleanup().await;
    plane.shutdown().await;
}

/// Operator drain and worker drain (SIGTERM) keep a worker out of placement
/// without touching its sandboxes; undrain brings it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_and_undrain() {
    let plane = Plane::start(1, StoreDriver::Sqlite, fast())
        .await
        .expect("plane");
    let a = W::start("worker-a", plane.apis(), Duration::from_millis(500)).await;
    let b = W::start("worker-b", plane.apis(), Duration::from_millis(500)).await;
    let c = plane.client();
    workers_online(&c, 2).await;
    let first = c.spawn(&spawn_req()).await.expect("spawn");
    let drained = if first.worker_id == "worker-a" {
        "worker-a"
    } else {
        "worker-b"
    };
    let other = if drained == "worker-a" {
        "worker-b"
    } else {
        "worker-a"
    };
    let w = c.worker_action(drained, "drain").await.expect("drain");
    assert_eq!(w.status, "draining");
    for _ in 0..3 {
        assert_eq!(c.spawn(&spawn_req()).await.expect("spawn").worker_id, other);
    }
    // Its sandbox keeps running and answering.
    let r = c
        .exec(
            &first.id,
            &stacyvm_api::ExecRequest {
                command: "echo still".into(),
                ..Default::default()
            },
        )
        .await
        .expect("exec");
    assert_eq!(r.stdout, "still\n");
    // A heartbeat from the worker does not undo an operator drain.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(status_of(&c, drained).await, "draining");
    c.worker_action(drained, "undrain").await.expect("undrain");
    assert_eq!(status_of(&c, drained).await, "online");

    // Worker-initiated drain (what SIGTERM does).
    let wb = if other == "worker-b" { &b } else { &a };
    wb.drain();
    eventually(
        Duration::from_secs(3),
        "worker reports draining",
        || async { status_of(&c, other).await == "draining" },
    )
    .await;
    assert_eq!(
        c.spawn(&spawn_req()).await.expect("spawn").worker_id,
        drained
    );
    a.cleanup().await;
    b.cleanup().await;
    plane.shutdown().await;
}

/// A worker RPC carrying an older lease generation than the newest the
/// worker has seen for that sandbox is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_generation_rpc_is_refused() {
    let plane = Plane::start(1, StoreDriver::Sqlite, fast())
        .await
        .expect("plane");
    let a = W::start("worker-a", plane.apis(), Duration::from_millis(500)).await;
    let c = plane.client();
    workers_online(&c, 1).await;
    let sb = c.spawn(&spawn_req()).await.expect("spawn");
    let http = reqwest::Client::new();
    let call = |g: i64| {
        http.post(format!("{}/rpc/v1/sandboxes/{}/exec", a.rpc_url, sb.id))
            .header(stacyvm_api::WORKER_ID_HEADER, "worker-a")
            .header(stacyvm_api::GENERATION_HEADER, g.to_string())
            .json(&serde_json::json!({"command": "echo ok"}))
            .send()
    };
    let old = call(sb.generation - 1).await.expect("call");
    assert_eq!(old.status(), 409);
    let body: serde_json::Value = old.json().await.expect("json");
    assert_eq!(body["code"], codes::STALE_GENERATION);
    assert_eq!(call(sb.generation).await.expect("call").status(), 200);
    // Wrong worker ID is refused too.
    let wrong = http
        .post(format!("{}/rpc/v1/sandboxes/{}/exec", a.rpc_url, sb.id))
        .header(stacyvm_api::WORKER_ID_HEADER, "worker-z")
        .header(stacyvm_api::GENERATION_HEADER, sb.generation.to_string())
        .json(&serde_json::json!({"command": "echo ok"}))
        .send()
        .await
        .expect("call");
    assert_eq!(wrong.status(), 403);
    a.cleanup().await;
    plane.shutdown().await;
}

/// After the leader dies, the worker re-attaches to the new leader within
/// 2 s of its election, and sandboxes keep working throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_reattaches_after_leader_change() {
    let mut plane = Plane::start(
        3,
        StoreDriver::Sqlite,
        // Leases long enough to outlive a failover (as in production, where
        // they are 10 s against a ~1 s failover); the 1.5 s test default
        // would make the worker fence itself during the election.
        stacyvm_node::control::ControlConfig {
            lease_ttl: Duration::from_secs(6),
            ..fast()
        },
    )
    .await
    .expect("plane");
    let a = W::start("worker-a", plane.apis(), Duration::from_millis(500)).await;
    let c = plane.client();
    workers_online(&c, 1).await;
    let sb = c.spawn(&spawn_req()).await.expect("spawn");
    let old = plane.wait_leader().await;
    plane.stop(old).await;
    let new = plane.wait_leader().await;
    assert_ne!(new, old);
    let elected = Instant::now();
    let elected_wall = chrono::Utc::now();
    let leader = &plane.cps[new];
    let mut reattached = None;
    while elected.elapsed() < Duration::from_secs(5) {
        if let Ok(w) = leader.control.worker("worker-a").await
            && chrono::DateTime::parse_from_rfc3339(&w.last_heartbeat)
                .is_ok_and(|t| t >= elected_wall)
        {
            reattached = Some(elected.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = reattached.expect("worker re-attached");
    assert!(
        took <= Duration::from_secs(2),
        "re-attached {took:?} after the election"
    );
    // The sandbox lives on under its lease; exec and new spawns work.
    let r = c
        .exec(
            &sb.id,
            &stacyvm_api::ExecRequest {
                command: "echo alive".into(),
                ..Default::default()
            },
        )
        .await
        .expect("exec");
    assert_eq!(r.stdout, "alive\n");
    // Past a whole lease TTL: only renewals through the new leader keep it alive.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(
        a.running_here().await,
        vec![sb.id.clone()],
        "not fenced: renewals reached the new leader"
    );
    c.spawn(&spawn_req())
        .await
        .expect("spawn on the new leader");
    a.cleanup().await;
    plane.shutdown().await;
}
