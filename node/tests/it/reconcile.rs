//! Reconciliation, one case per owner situation, with several workers and
//! persisted sandboxes, on SQLite and on live Postgres.

use std::time::Duration;

use stacyvm_api::SpawnRequest;
use stacyvm_node::control::{ControlConfig, SANDBOX_LEASE};
use stacyvm_store::testing::cases;
use stacyvm_store::{Mutation, SandboxState, StoreDriver, StoreError, Ts, WorkerStatus};

use crate::plane::{Plane, W, eventually, fast, workers_online};

fn cfg() -> ControlConfig {
    // Long leases: a worker that stops heartbeating stays `stale` for the
    // whole test instead of going offline.
    ControlConfig {
        lease_ttl: Duration::from_secs(20),
        offline_grace: Duration::from_secs(10),
        // `creating` records older than this are settled spawns.
        spawn_timeout: SPAWN_TIMEOUT,
        ..fast()
    }
}

const SPAWN_TIMEOUT: Duration = Duration::from_secs(3);

async fn run(driver: StoreDriver) {
    let Some(plane) = Plane::start(1, driver, cfg()).await else {
        return;
    };
    let cp = plane.leader().await;
    let r = cp.r().clone();
    let c = plane.client();
    let a = W::start("worker-a", plane.apis(), Duration::from_secs(2)).await;
    workers_online(&c, 1).await;
    let spawn = || SpawnRequest {
        image: "busybox".into(),
        ..Default::default()
    };
    let a1 = c.spawn(&spawn()).await.expect("a1").id; // online, running: kept
    let a3 = c.spawn(&spawn()).await.expect("a3").id; // online, record says unhealthy: corrected
    let a4 = c.spawn(&spawn()).await.expect("a4").id; // online, its process died: error
    // online, runs it, but its `running` write was lost (leader crash): no
    // client was told it exists, so it is abandoned
    let a5 = c.spawn(&spawn()).await.expect("a5").id;
    let a5_spawned = std::time::Instant::now();

    // Workers the leader knows only from the store.
    let now = Ts::now();
    let rec = |id: &str, status: WorkerStatus| {
        let mut w = cases::worker(id);
        w.status = status;
        w.rpc_url = "http://127.0.0.1:9".into();
        w.last_heartbeat = now;
        Mutation::PutWorker(w)
    };
    let muts = vec![
        rec("worker-b", WorkerStatus::Online), // never heartbeats: stale
        rec("worker-c", WorkerStatus::Draining),
        rec("worker-d", WorkerStatus::Offline),
    ];
    for out in r.write_revoking(&[], muts).await.expect("workers") {
        out.expect("worker written");
    }
    cp.control.step_down(); // reload leader memory with the new worker records
    // Persisted sandboxes, each under a lease held by its worker.
    let persisted = [
        ("sb-a20000000001", "worker-a"),
        ("sb-a30000000001", "worker-a"), // creating, settled, never started: abandoned
        ("sb-e20000000001", "worker-e"), // creating, settled, owner unknown: abandoned
        ("sb-b10000000001", "worker-b"),
        ("sb-c10000000001", "worker-c"),
        ("sb-d10000000001", "worker-d"),
        ("sb-e10000000001", "worker-e"),
    ];
    for (id, worker) in persisted {
        let mut sb = cases::sandbox(id, "", 0);
        sb.state = SandboxState::Running;
        sb.worker_id = worker.into();
        sb.created_at = now;
        if id.starts_with("sb-a3") || id.starts_with("sb-e2") {
            sb.state = SandboxState::Creating;
            sb.created_at = now.plus_millis(-(SPAWN_TIMEOUT.as_millis() as i64) - 1_000);
        }
        sb.updated_at = now;
        sb.expires_at = now.plus_millis(3_600_000);
        let (_, extra) = r
            .acquire_lease_with(
                id,
                SANDBOX_LEASE,
                worker,
                60_000,
                vec![Mutation::CreateSandbox(sb)],
            )
            .await
            .expect("lease + record");
        extra.into_iter().for_each(|e| {
            e.expect("record written");
        });
    }
    // An orphan lease guarding no sandbox at all.
    r.acquire_lease_with("sb-0f0000000001", SANDBOX_LEASE, "worker-a", 60_000, vec![])
        .await
        .expect("orphan lease");
    // a3's record drifted; a5's `running` write never happened; a4's process
    // died behind the runtime's back.
    r.write_revoking(
        &[],
        vec![
            Mutation::SetSandboxState {
                id: a3.clone(),
                state: SandboxState::Unhealthy,
                at: Ts::now(),
            },
            Mutation::SetSandboxState {
                id: a5.clone(),
                state: SandboxState::Creating,
                at: Ts::now(),
            },
        ],
    )
    .await
    .expect("drift");
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(a.state.path().join("mock").join(&a4).join("meta.json")).expect("meta"),
    )
    .expect("json");
    let keeper = meta["keeper_pid"].as_i64().expect("keeper pid") as i32;
    stacyvm_runtimes::sys::kill_group(keeper, 9);

    eventually(Duration::from_secs(5), "worker-b stale", || async {
        c.workers()
            .await
            .is_ok_and(|ws| ws.iter().any(|w| w.id == "worker-b" && w.status == "stale"))
    })
    .await;
    // a5 must be older than a spawn timeout before its `creating` record counts as settled.
    tokio::time::sleep(
        (SPAWN_TIMEOUT + Duration::from_millis(200)).saturating_sub(a5_spawned.elapsed()),
    )
    .await;
    // Creating, young: its spawn may still be in flight (written last, so the wait above does not age it).
    let mut young = cases::sandbox("sb-a40000000001", "", 0);
    young.state = SandboxState::Creating;
    young.worker_id = "worker-a".into();
    young.created_at = Ts::now();
    young.updated_at = young.created_at;
    young.expires_at = young.created_at.plus_millis(3_600_000);
    let (_, extra) = r
        .acquire_lease_with(
            "sb-a40000000001",
            SANDBOX_LEASE,
            "worker-a",
            60_000,
            vec![Mutation::CreateSandbox(young)],
        )
        .await
        .expect("young lease + record");
    extra.into_iter().for_each(|e| {
        e.expect("young record written");
    });
    cp.control.reconcile_pass().await.expect("reconcile");

    let store = cp.r().store();
    let state = |id: String| async move { store.get_sandbox(&id).await.expect("sandbox").state };
    let has_lease = |id: &'static str| async move {
        !matches!(store.get_lease(id).await, Err(StoreError::NotFound { .. }))
    };
    assert_eq!(
        state(a1.clone()).await,
        SandboxState::Running,
        "online worker runs it: kept"
    );
    assert_eq!(
        state(a3.clone()).await,
        SandboxState::Running,
        "online worker runs it: record corrected"
    );
    assert_eq!(
        state(a4.clone()).await,
        SandboxState::Error,
        "online worker reports it stopped"
    );
    assert_eq!(
        state("sb-a20000000001".into()).await,
        SandboxState::Lost,
        "online worker does not have it"
    );
    assert!(!has_lease("sb-a20000000001").await);
    assert_eq!(
        state("sb-b10000000001".into()).await,
        SandboxState::Running,
        "stale owner: wait"
    );
    assert!(has_lease("sb-b10000000001").await);
    assert_eq!(
        state("sb-c10000000001".into()).await,
        SandboxState::Running,
        "draining owner: kept"
    );
    assert!(has_lease("sb-c10000000001").await);
    assert_eq!(
        state("sb-d10000000001".into()).await,
        SandboxState::Lost,
        "offline owner: lost"
    );
    assert!(!has_lease("sb-d10000000001").await);
    assert_eq!(
        state("sb-e10000000001".into()).await,
        SandboxState::Lost,
        "missing owner: lost"
    );
    assert!(!has_lease("sb-e10000000001").await);
    assert_eq!(
        state(a5.clone()).await,
        SandboxState::Destroyed,
        "settled creating, online worker runs it: abandoned"
    );
    assert!(matches!(
        store.get_lease(&a5).await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(
        state("sb-a30000000001".into()).await,
        SandboxState::Destroyed,
        "settled creating, online worker never started it: abandoned"
    );
    assert!(!has_lease("sb-a30000000001").await);
    assert_eq!(
        state("sb-e20000000001".into()).await,
        SandboxState::Destroyed,
        "settled creating, no such worker: abandoned"
    );
    assert!(!has_lease("sb-e20000000001").await);
    assert_eq!(
        state("sb-a40000000001".into()).await,
        SandboxState::Creating,
        "young creating: its spawn may still be in flight"
    );
    assert!(has_lease("sb-a40000000001").await);
    assert!(!has_lease("sb-0f0000000001").await, "orphan lease closed");
    // A second pass changes nothing (idempotent).
    let again = cp.control.reconcile_pass().await.expect("reconcile again");
    assert!(again.is_empty(), "second pass acted: {again:?}");
    // The lost sandbox's worker is told at its next heartbeat; nothing of it runs.
    let running = a.running_here().await;
    assert!(
        running.contains(&a1)
            && running.contains(&a3)
            && !running.contains(&"sb-a20000000001".to_string())
    );
    // The abandoned spawn's worker stops it once its heartbeat learns the lease is gone.
    eventually(
        Duration::from_secs(10),
        "abandoned sandbox stopped",
        || async { !a.running_here().await.contains(&a5) },
    )
    .await;
    a.cleanup().await;
    plane.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reconcile_every_owner_case_sqlite() {
    run(StoreDriver::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reconcile_every_owner_case_postgres() {
    run(StoreDriver::Postgres).await;
}

/// Reconciliation and the offline declaration see every sandbox, not only the
/// store's first page (a regression: the first 100 were kept and every other
/// lease was revoked as an orphan).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn passes_cover_more_than_one_page() {
    // Heartbeats a little slower than the other tests: 130 spawns on a
    // loaded two-core machine must not make the only worker look stale.
    let cfg = ControlConfig {
        heartbeat: Duration::from_millis(300),
        lease_ttl: Duration::from_secs(3),
        ..fast()
    };
    let plane = Plane::start(1, StoreDriver::Sqlite, cfg)
        .await
        .expect("plane");
    let a = W::start("worker-a", plane.apis(), Duration::from_millis(500)).await;
    let c = std::sync::Arc::new(plane.client());
    workers_online(&c, 1).await;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..13 {
                let sb = c
                    .spawn(&SpawnRequest {
                        image: "busybox".into(),
                        ..Default::default()
                    })
                    .await
                    .expect("spawn");
                ids.push(sb.id);
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.expect("join"));
    }
    assert_eq!(ids.len(), 130);
    let cp = plane.leader().await;
    let acted = cp.control.reconcile_pass().await.expect("reconcile");
    assert!(acted.is_empty(), "nothing to correct: {acted:?}");
    let store = cp.r().store();
    for id in &ids {
        assert!(store.get_lease(id).await.is_ok(), "{id} lost its lease");
    }
    assert_eq!(a.running_here().await.len(), 130);
    // The worker dies: every one of its sandboxes becomes lost.
    a.crash();
    eventually(Duration::from_secs(10), "all lost", || async {
        let mut lost = 0;
        for id in &ids {
            if store
                .get_sandbox(id)
                .await
                .is_ok_and(|s| s.state == SandboxState::Lost)
            {
                lost += 1;
            }
        }
        lost == ids.len()
    })
    .await;
    a.cleanup().await;
    plane.shutdown().await;
}

/// A spawn still running on this replica (here: a template setup step that
/// outlasts the spawn timeout) is left alone by reconciliation, and it
/// completes as `running`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spawn_in_flight_is_not_abandoned() {
    let cfg = ControlConfig {
        spawn_timeout: Duration::from_millis(500),
        ..cfg()
    };
    let plane = Plane::start(1, StoreDriver::Sqlite, cfg)
        .await
        .expect("plane");
    let cp = plane.leader().await;
    let a = W::start("worker-a", plane.apis(), Duration::from_secs(2)).await;
    let c = std::sync::Arc::new(plane.client());
    workers_online(&c, 1).await;
    let t = serde_json::json!({"name": "slow", "image": "busybox", "setup": ["sleep 2"]});
    let r = reqwest::Client::new()
        .post(format!("http://{}/api/v1/templates", plane.apis()[0]))
        .json(&t)
        .send()
        .await
        .expect("create template");
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    let spawn = {
        let c = c.clone();
        tokio::spawn(async move {
            c.spawn(&SpawnRequest {
                template: "slow".into(),
                ..Default::default()
            })
            .await
        })
    };
    let store = cp.r().store().clone();
    let creating = || async {
        store
            .list_sandboxes(&Default::default())
            .await
            .expect("list")
            .into_iter()
            .find(|s| s.state == SandboxState::Creating)
    };
    eventually(Duration::from_secs(5), "a creating record", || async {
        creating().await.is_some()
    })
    .await;
    // Older than the spawn timeout, but this replica is still running its spawn.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let sb = creating().await.expect("still creating");
    let taken = cp.control.reconcile_pass().await.expect("reconcile");
    assert!(
        taken.is_empty(),
        "reconcile acted on a spawn in flight: {taken:?}"
    );
    let done = spawn.await.expect("join").expect("the spawn succeeds");
    assert_eq!(done.id, sb.id);
    assert_eq!(
        store.get_sandbox(&sb.id).await.expect("record").state,
        SandboxState::Running
    );
    a.cleanup().await;
    plane.shutdown().await;
}
