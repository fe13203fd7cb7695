//! The cluster on live Postgres, in both modes the store supports:
//!
//! - one database per replica: election, replication, forwarding, leader loss
//!   and catch-up, exactly as on SQLite;
//! - several replicas sharing one database (`database.shared = true`): every
//!   replica applies every committed entry to the same tables, and the store's
//!   exactly-once batch apply makes each entry take effect once.
//!
//! These need `STACYVM_POSTGRES_TEST_DSN` (scripts/test.sh starts a throwaway
//! server). Without it they print a loud SKIP, except under `CI=true`, where
//! they fail.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, EntryPayload, RaftSnapshotBuilder};
use stacyvm_raft::codec::Command;
use stacyvm_raft::replica::{RaftTiming, Replica};
use stacyvm_raft::state_machine::StoreStateMachine;
use stacyvm_raft::types::{Entry, LogId, Response, store_index};
use stacyvm_store::testing::TestDb;
use stacyvm_store::testing::cases::{T0, sandbox};
use stacyvm_store::{AdminAudit, Mutation, MutationOutput, Store, StoreError};

use crate::harness::{Slot, init, start_cluster, stop_all, tables, wait_leader, write_ok};

fn create(id: &str) -> Command {
    Command::Store(vec![Mutation::CreateSandbox(sandbox(id, "alice", 0))])
}

fn audit(n: usize) -> AdminAudit {
    AdminAudit {
        id: 0,
        actor: "raft-test".into(),
        method: "POST".into(),
        path: format!("/shared/{n:05}"),
        status: 200,
        duration_ms: 1,
        request_id: format!("req-{n}"),
        remote_addr: "127.0.0.1".into(),
        user_agent: "test".into(),
        tenant_id: String::new(),
        created_at: T0,
    }
}

/// Every sandbox in `ids` is readable on `slot` after a linearizable barrier.
async fn assert_has_all(slot: &Slot, ids: &[String]) {
    slot.r().read_barrier().await.expect("read barrier");
    for id in ids {
        slot.store()
            .get_sandbox(id)
            .await
            .unwrap_or_else(|e| panic!("node {} lacks {id}: {e}", slot.id));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_each_on_its_own_postgres_database_replicate_and_survive_leader_loss() {
    let what = "raft cluster with a Postgres database per replica";
    let mut dbs = Vec::new();
    for _ in 0..3 {
        match TestDb::postgres(what).await {
            Some(db) => dbs.push(db),
            None => return,
        }
    }
    let ca = init();
    let timing = RaftTiming::default();
    let mut slots: Vec<Slot> = dbs
        .iter()
        .zip(1..)
        .map(|(db, id)| Slot::own(&ca, id, db.clone()))
        .collect();
    start_cluster(&mut slots, &timing).await;
    let leader = wait_leader(&slots).await;
    let followers: Vec<usize> = (0..3).filter(|&i| i != leader).collect();

    // Writes through the leader and through both followers (forwarded).
    let mut acked = Vec::new();
    for i in 0..30 {
        let id = format!("sb-pg{i:06}");
        write_ok(slots[i % 3].r(), &id, create(&id)).await;
        acked.push(id);
    }
    for s in &slots {
        assert_has_all(s, &acked).await;
    }
    // A deterministic refusal is an outcome on every replica alike.
    match slots[followers[0]].r().write(create("sb-pg000000")).await {
        Ok(Response::Applied(r)) => {
            assert!(matches!(r[..], [Err(StoreError::Conflict { .. })]), "{r:?}")
        }
        other => panic!("duplicate create: {other:?}"),
    }

    // Kill the leader: a new one takes over and nothing acknowledged is lost.
    slots[leader].stop().await;
    let new_leader = wait_leader(&slots).await;
    assert_ne!(new_leader, leader);
    for i in 30..45 {
        let id = format!("sb-pg{i:06}");
        write_ok(slots[followers[i % 2]].r(), &id, create(&id)).await;
        acked.push(id);
    }
    for &f in &followers {
        assert_has_all(&slots[f], &acked).await;
    }
    let a = slots[followers[0]].store().export_snapshot().await;
    let b = slots[followers[1]].store().export_snapshot().await;
    let (a, b) = (a.expect("export"), b.expect("export"));
    assert_eq!(a.sandboxes.len(), acked.len());
    assert!(tables(a) == tables(b), "survivors hold identical tables");

    // The old leader comes back on a fresh handle and catches up from the log.
    slots[leader].start(&timing).await;
    assert_has_all(&slots[leader], &acked).await;
    let back = slots[leader].store().export_snapshot().await;
    let want = slots[new_leader].store().export_snapshot().await;
    assert!(
        tables(back.expect("export")) == tables(want.expect("export")),
        "the restarted replica holds the same tables"
    );
    stop_all(&mut slots).await;
    for db in dbs {
        db.cleanup().await;
    }
}

/// Counts what the leader reported for each write.
#[derive(Debug, Default)]
struct Outcomes {
    applied: usize,
    already_applied: usize,
}

/// Appends admin-audit row `n` through `r`; returns the row ID when the
/// leader applied the entry itself.
async fn append_audit(r: &Replica, n: usize, seen: &mut Outcomes) -> Option<i64> {
    let cmd = Command::Store(vec![Mutation::AppendAdminAudit(audit(n))]);
    match r.write(cmd).await {
        Ok(Response::Applied(out)) => match &out[..] {
            [Ok(MutationOutput::Id(id))] => {
                seen.applied += 1;
                Some(*id)
            }
            other => panic!("audit {n}: {other:?}"),
        },
        Ok(Response::AlreadyApplied) => {
            seen.already_applied += 1;
            None
        }
        other => panic!("audit {n} through node {}: {other:?}", r.id()),
    }
}

/// Row counts and Raft bookkeeping of the shared database, read through
/// `store`.
async fn shared_state(store: &Arc<dyn Store>) -> (usize, BTreeSet<String>, u64) {
    let snap = store.export_snapshot().await.expect("export");
    let paths: BTreeSet<String> = snap.admin_audit.iter().map(|a| a.path.clone()).collect();
    (snap.admin_audit.len(), paths, snap.raft.applied_index)
}

/// Every running replica has applied the same log index, and the shared
/// database records exactly that index (raft index + 1).
async fn assert_applied_consistent(slots: &[Slot]) {
    let mut applied = BTreeMap::new();
    for s in slots.iter().filter(|s| s.replica.is_some()) {
        s.r().read_barrier().await.expect("read barrier");
    }
    for s in slots.iter().filter(|s| s.replica.is_some()) {
        let at = s.r().applied().expect("applied").index;
        let db = s.store().raft_state().await.expect("raft state");
        applied.insert(s.id, (at, db.applied_index));
    }
    let distinct: BTreeSet<(u64, u64)> = applied.values().copied().collect();
    assert_eq!(
        distinct.len(),
        1,
        "applied (raft, store) per node: {applied:?}"
    );
    let (raft, store) = distinct.into_iter().next().expect("one value");
    assert_eq!(store, store_index(raft), "per node: {applied:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_sharing_one_postgres_database_apply_every_entry_exactly_once() {
    let what = "raft cluster of replicas sharing one Postgres database";
    let Some(db) = TestDb::postgres(what).await else {
        return;
    };
    let ca = init();
    let timing = RaftTiming::default();
    // Three independent handles (pools) on one database, as three processes
    // configured with the same DSN would have.
    let mut slots = vec![
        Slot::shared(&ca, 1, db.clone(), db.store.clone()),
        Slot::shared(&ca, 2, db.clone(), db.reopen().await),
        Slot::shared(&ca, 3, db.clone(), db.reopen().await),
    ];
    start_cluster(&mut slots, &timing).await;
    let leader = wait_leader(&slots).await;

    // N appends through every replica in turn.
    let mut seen = Outcomes::default();
    let mut ids = BTreeSet::new();
    let mut n = 0;
    for _ in 0..60 {
        if let Some(id) = append_audit(slots[n % 3].r(), n, &mut seen).await {
            assert!(ids.insert(id), "row ID {id} handed out twice");
        }
        n += 1;
    }
    assert_applied_consistent(&slots).await;
    let (rows, paths, _) = shared_state(&db.store).await;
    assert_eq!(
        (rows, paths.len()),
        (n, n),
        "one row per acknowledged write"
    );

    // A create takes effect once: the leader answers Ok (or AlreadyApplied if
    // another replica applied the entry first), a second create conflicts,
    // and the table holds one row.
    let sb = "sb-shared0001";
    let created = slots[(leader + 1) % 3].r().write(create(sb)).await;
    match created {
        Ok(Response::Applied(r)) => {
            assert!(matches!(r[..], [Ok(_)]), "{r:?}");
            seen.applied += 1;
        }
        Ok(Response::AlreadyApplied) => seen.already_applied += 1,
        other => panic!("create {sb}: {other:?}"),
    }
    match slots[(leader + 2) % 3].r().write(create(sb)).await {
        Ok(Response::Applied(r)) => {
            assert!(
                matches!(r[..], [Err(StoreError::Conflict { .. })]),
                "the second create must conflict: {r:?}"
            );
            seen.applied += 1;
        }
        Ok(Response::AlreadyApplied) => seen.already_applied += 1,
        other => panic!("second create {sb}: {other:?}"),
    }
    let snap = db.store.export_snapshot().await.expect("export");
    assert_eq!(snap.sandboxes.iter().filter(|s| s.id == sb).count(), 1);

    // Kill the leader: the two survivors keep applying to the shared tables,
    // each entry once.
    slots[leader].stop().await;
    let new_leader = wait_leader(&slots).await;
    assert_ne!(new_leader, leader);
    for _ in 0..30 {
        let via = [(leader + 1) % 3, (leader + 2) % 3][n % 2];
        if let Some(id) = append_audit(slots[via].r(), n, &mut seen).await {
            assert!(ids.insert(id), "row ID {id} handed out twice");
        }
        n += 1;
    }
    assert_applied_consistent(&slots).await;
    let (rows, paths, _) = shared_state(slots[new_leader].store()).await;
    assert_eq!(
        (rows, paths.len()),
        (n, n),
        "one row per acknowledged write"
    );

    let (.., applied) = shared_state(&db.store).await;
    eprintln!(
        "shared database: {n} audit writes and 2 creates; the leader answered {} Applied and \
         {} AlreadyApplied (another replica applied the entry first); store applied index {applied}",
        seen.applied, seen.already_applied
    );
    stop_all(&mut slots).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_sharing_a_postgres_database_restarts_after_missing_entries() {
    let what = "restart of a replica sharing one Postgres database";
    let Some(db) = TestDb::postgres(what).await else {
        return;
    };
    let ca = init();
    let timing = RaftTiming::default();
    let mut slots = vec![
        Slot::shared(&ca, 1, db.clone(), db.store.clone()),
        Slot::shared(&ca, 2, db.clone(), db.reopen().await),
        Slot::shared(&ca, 3, db.clone(), db.reopen().await),
    ];
    start_cluster(&mut slots, &timing).await;
    let leader = wait_leader(&slots).await;
    let down = (leader + 1) % 3;
    let mut seen = Outcomes::default();
    let mut n = 0;
    for _ in 0..10 {
        append_audit(slots[leader].r(), n, &mut seen).await;
        n += 1;
    }
    // While it is down the others apply more entries to the shared tables,
    // so its own log ends before the database's applied index.
    slots[down].stop().await;
    for _ in 0..20 {
        append_audit(slots[leader].r(), n, &mut seen).await;
        n += 1;
    }
    slots[down].start(&timing).await;
    for _ in 0..10 {
        append_audit(slots[n % 3].r(), n, &mut seen).await;
        n += 1;
    }
    assert_applied_consistent(&slots).await;
    let (rows, paths, _) = shared_state(slots[down].store()).await;
    assert_eq!(
        (rows, paths.len()),
        (n, n),
        "one row per acknowledged write"
    );
    stop_all(&mut slots).await;
    db.cleanup().await;
}

fn log_id(index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(1, 1), index)
}

fn audit_entry(index: u64) -> Entry {
    Entry {
        log_id: log_id(index),
        payload: EntryPayload::Normal(Command::Store(vec![Mutation::AppendAdminAudit(audit(
            index as usize,
        ))])),
    }
}

/// Two state machines over one shared database. A replica that lags (say, it
/// was partitioned off while the leader purged its log) is sent the leader's
/// snapshot, which is older than what the shared tables already hold.
/// Installing it must not roll those tables back: the other replicas have
/// moved on and would never apply the lost entries again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_database_snapshot_install_never_rolls_back() {
    let Some(db) = TestDb::postgres("shared-database snapshot install").await else {
        return;
    };
    let mut ahead = StoreStateMachine::new(db.store.clone());
    let mut lagging = StoreStateMachine::new(db.reopen().await);
    ahead
        .apply((0..5).map(audit_entry).collect::<Vec<_>>())
        .await
        .expect("apply 0..5");
    let mut builder = ahead.get_snapshot_builder().await;
    let snap = builder.build_snapshot().await.expect("snapshot at 4");
    ahead
        .apply((5..10).map(audit_entry).collect::<Vec<_>>())
        .await
        .expect("apply 5..10");
    let data: Box<Cursor<Vec<u8>>> = snap.snapshot;
    lagging
        .install_snapshot(&snap.meta, data)
        .await
        .expect("install the older snapshot");
    let (rows, _, applied) = shared_state(&db.store).await;
    assert_eq!(
        (rows, applied),
        (10, store_index(9)),
        "the shared tables kept every applied entry"
    );
    db.cleanup().await;
}
