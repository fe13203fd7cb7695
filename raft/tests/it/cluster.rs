//! Three (or four) in-process replicas over real QUIC with mutual TLS on
//! loopback: election, replication, forwarding, linearizable reads, leader
//! loss, catch-up from the log and from a snapshot, join and leave.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use stacyvm_raft::certs::TestCa;
use stacyvm_raft::codec::Command;
use stacyvm_raft::replica::{RaftTiming, Replica};
use stacyvm_raft::types::Response;
use stacyvm_store::Mutation;
use stacyvm_store::testing::TestDb;
use stacyvm_store::testing::cases::sandbox;

use crate::harness::{Slot, init, start_cluster, wait_leader};

async fn cluster(ca: &TestCa, n: u64, timing: &RaftTiming) -> Vec<Slot> {
    let mut slots = Vec::new();
    for id in 1..=n {
        slots.push(Slot::own(ca, id, TestDb::sqlite().await));
    }
    start_cluster(&mut slots, timing).await;
    slots
}

fn create(id: &str) -> Command {
    Command::Store(vec![Mutation::CreateSandbox(sandbox(id, "alice", 0))])
}

async fn write_ok(r: &Replica, id: &str) {
    match r.write(create(id)).await {
        Ok(Response::Applied(results)) => {
            assert!(results.iter().all(Result::is_ok), "{id}: {results:?}")
        }
        other => panic!("write {id} through node {}: {other:?}", r.id()),
    }
}

/// Every sandbox in `ids` is readable on `slot` after a linearizable barrier.
async fn assert_has_all(slot: &Slot, ids: &[String]) {
    slot.r().read_barrier().await.expect("read barrier");
    for id in ids {
        slot.r()
            .store()
            .get_sandbox(id)
            .await
            .unwrap_or_else(|e| panic!("node {} lacks {id}: {e}", slot.id));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_elect_replicate_forward_and_survive_leader_loss() {
    let ca = init();
    let timing = RaftTiming::default();
    let mut slots = cluster(&ca, 3, &timing).await;
    let leader = wait_leader(&slots).await;
    let followers: Vec<usize> = (0..3).filter(|&i| i != leader).collect();

    // A write on a follower is forwarded to the leader and acknowledged.
    let mut acked = Vec::new();
    for i in 0..30 {
        let id = format!("sb-{i:08x}");
        write_ok(slots[followers[i % 2]].r(), &id).await;
        acked.push(id);
    }
    // Linearizable read on the other follower sees every acknowledged write.
    assert_has_all(&slots[followers[1]], &acked).await;

    // A deterministic refusal comes back as an outcome, not a failure.
    match slots[followers[0]].r().write(create("sb-00000000")).await {
        Ok(Response::Applied(r)) => assert!(
            matches!(r[0], Err(stacyvm_store::StoreError::Conflict { .. })),
            "{r:?}"
        ),
        other => panic!("duplicate create: {other:?}"),
    }

    // Kill the leader: a new one takes over, and nothing acknowledged is lost.
    let killed_at = Instant::now();
    slots[leader].stop().await;
    let new_leader = wait_leader(&slots).await;
    let failover = killed_at.elapsed();
    assert_ne!(new_leader, leader);
    for i in 30..40 {
        let id = format!("sb-{i:08x}");
        write_ok(slots[followers[i % 2]].r(), &id).await;
        acked.push(id);
    }
    eprintln!(
        "failover: new leader after {failover:?}, first write after {:?}",
        killed_at.elapsed()
    );
    for &f in &followers {
        assert_has_all(&slots[f], &acked).await;
    }
    // The old leader comes back as a follower and catches up.
    slots[leader].start(&timing).await;
    assert_has_all(&slots[leader], &acked).await;
    for s in &mut slots {
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarted_follower_catches_up_from_the_log_and_after_purge_from_a_snapshot() {
    let ca = init();
    // Snapshot every 20 entries and keep only 5 behind it, so a follower that
    // misses 100 entries can only catch up from a snapshot.
    let timing = RaftTiming {
        snapshot_every: 20,
        keep_logs: 5,
        ..RaftTiming::default()
    };
    let mut slots = cluster(&ca, 3, &timing).await;
    let leader = wait_leader(&slots).await;
    let down = (leader + 1) % 3;

    // Short outage: catch up from the log.
    slots[down].stop().await;
    let mut acked = Vec::new();
    for i in 0..5 {
        let id = format!("sb-a{i:07x}");
        write_ok(slots[leader].r(), &id).await;
        acked.push(id);
    }
    slots[down].start(&timing).await;
    assert_has_all(&slots[down], &acked).await;

    // Long outage: the log it needs is purged; it must install a snapshot.
    slots[down].stop().await;
    for i in 0..100 {
        let id = format!("sb-b{i:07x}");
        write_ok(slots[leader].r(), &id).await;
        acked.push(id);
    }
    // Snapshots are built and the log purged in the background: wait for it.
    let mut purged = None;
    for _ in 0..200 {
        purged = slots[leader].r().raft().metrics().borrow().purged;
        if purged.is_some_and(|p| p.index > 50) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        purged.is_some_and(|p| p.index > 50),
        "leader purged its log: {purged:?}"
    );
    slots[down].start(&timing).await;
    assert_has_all(&slots[down], &acked).await;
    let snap = slots[down].r().raft().metrics().borrow().snapshot;
    assert!(snap.is_some(), "the follower caught up through a snapshot");
    for s in &mut slots {
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn join_and_leave_under_load() {
    let ca = init();
    let timing = RaftTiming::default();
    let mut slots = cluster(&ca, 3, &timing).await;
    let leader = wait_leader(&slots).await;

    // Writes keep flowing while membership changes.
    let writer_replica_ids: Vec<usize> = vec![leader];
    let mut acked = Vec::new();
    let mut fourth = Slot::own(&ca, 4, TestDb::sqlite().await);
    fourth.start(&timing).await;
    let joiner_info = fourth.info();
    let via = (leader + 1) % 3;
    let (join_result, writes) = tokio::join!(slots[via].r().join(4, joiner_info), async {
        let mut ids = Vec::new();
        for i in 0..20 {
            let id = format!("sb-j{i:07x}");
            write_ok(slots[writer_replica_ids[0]].r(), &id).await;
            ids.push(id);
        }
        ids
    });
    join_result.expect("join node 4");
    acked.extend(writes);
    slots.push(fourth);
    let members = slots[0].r().members().await.expect("members");
    assert_eq!(members.voters, BTreeSet::from([1, 2, 3, 4]), "{members:?}");
    assert_has_all(&slots[3], &acked).await;

    // Remove a follower that is not the leader; the rest keep serving.
    let leaving = slots
        .iter()
        .position(|s| s.id != members.leader.unwrap_or(0) && s.id != 4)
        .expect("a follower");
    let leaving_id = slots[leaving].id;
    slots[3].r().leave(leaving_id).await.expect("leave");
    slots[leaving].stop().await;
    assert_removed(&slots[3], leaving_id).await;
    let leader = wait_leader(&slots).await;
    write_ok(slots[leader].r(), "sb-after-leave").await;
    for s in &mut slots {
        s.stop().await;
    }
}

fn held(rid: &str, generation: i64) -> stacyvm_raft::leases::HeldLease {
    stacyvm_raft::leases::HeldLease {
        resource_id: rid.into(),
        generation,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_are_arbitrated_by_the_leader_with_batched_renewal_and_failover_grace() {
    use stacyvm_raft::rpc::LeaseError;
    use stacyvm_store::StoreError;
    let ca = init();
    let timing = RaftTiming::default();
    let mut slots = cluster(&ca, 3, &timing).await;
    let leader = wait_leader(&slots).await;
    let f = (leader + 1) % 3;

    // Grants go through any replica; a live lease refuses other holders.
    let l1 = slots[f]
        .r()
        .acquire_lease("sb-1", "sandbox", "w1", 600)
        .await
        .expect("grant");
    assert_eq!((l1.generation, l1.holder_id.as_str()), (1, "w1"));
    match slots[leader]
        .r()
        .acquire_lease("sb-1", "sandbox", "w2", 600)
        .await
    {
        Err(LeaseError::Store(StoreError::Conflict { reason, .. })) => {
            assert!(reason.contains("w1"), "{reason}")
        }
        other => panic!("second holder: {other:?}"),
    }
    let l2 = slots[f]
        .r()
        .acquire_lease("sb-2", "sandbox", "w1", 600)
        .await
        .expect("grant 2");

    // One call renews everything w1 holds; a stale generation is reported lost.
    let out = slots[f]
        .r()
        .renew_leases(
            "w1",
            vec![
                held("sb-1", 1),
                held("sb-2", l2.generation),
                held("sb-3", 1),
            ],
        )
        .await
        .expect("renew");
    assert_eq!(
        out.renewed,
        vec![held("sb-1", 1), held("sb-2", l2.generation)]
    );
    assert_eq!(out.lost, vec![held("sb-3", 1)]);

    // Renewal keeps sb-1 alive past its original TTL; sb-2, not renewed, expires.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let out = slots[f]
            .r()
            .renew_leases("w1", vec![held("sb-1", 1)])
            .await
            .expect("renew");
        assert_eq!(out.renewed.len(), 1, "{out:?}");
    }
    assert!(
        slots[f]
            .r()
            .acquire_lease("sb-1", "sandbox", "w2", 600)
            .await
            .is_err(),
        "renewed lease is still held"
    );
    let taken = slots[f]
        .r()
        .acquire_lease("sb-2", "sandbox", "w2", 600)
        .await
        .expect("expired lease is taken over");
    assert_eq!(
        (taken.holder_id.as_str(), taken.generation),
        ("w2", l2.generation + 1)
    );
    let out = slots[f]
        .r()
        .renew_leases("w1", vec![held("sb-2", l2.generation)])
        .await
        .expect("renew");
    assert_eq!(out.lost.len(), 1, "the old holder learns it lost sb-2");

    // Failover: the new leader honours leases for one full TTL after its election.
    let long = slots[f]
        .r()
        .acquire_lease("sb-long", "sandbox", "w1", 2_000)
        .await
        .expect("grant");
    slots[leader].stop().await;
    let new_leader = wait_leader(&slots).await;
    let elected = Instant::now();
    let r = slots[new_leader].r();
    assert!(
        r.acquire_lease("sb-long", "sandbox", "w2", 2_000)
            .await
            .is_err(),
        "no takeover right after election"
    );
    assert_eq!(
        r.renew_leases("w1", vec![held("sb-long", long.generation)])
            .await
            .expect("renew")
            .renewed
            .len(),
        1
    );
    // Now it is renewed under the new leader; stop renewing and wait it out.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let taken = r
        .acquire_lease("sb-long", "sandbox", "w2", 2_000)
        .await
        .expect("takeover after TTL");
    assert!(taken.generation > long.generation);
    assert!(elected.elapsed() >= Duration::from_millis(2_000));
    let released = r.release_lease("sb-long", "w2").await.expect("release");
    assert_eq!(released.generation, taken.generation);
    for s in &mut slots {
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removed_node_id_is_never_reused() {
    let ca = init();
    let timing = RaftTiming::default();
    let mut slots = cluster(&ca, 3, &timing).await;
    let leader = wait_leader(&slots).await;
    let gone = (leader + 1) % 3;
    let gone_id = slots[gone].id;
    slots[leader].r().leave(gone_id).await.expect("leave");
    let info = slots[gone].info();
    slots[gone].stop().await;
    match slots[leader].r().join(gone_id, info).await {
        Err(stacyvm_raft::rpc::WriteError::Refused(why)) => {
            assert!(why.contains("never reused"), "{why}")
        }
        other => panic!("re-joining a removed id: {other:?}"),
    }
    assert_removed(&slots[(leader + 2) % 3], gone_id).await;
    for s in &mut slots {
        s.stop().await;
    }
}

/// `gone` is out of the membership seen from `survivor` (neither voter nor
/// node) and recorded as removed in its store.
async fn assert_removed(survivor: &Slot, gone: u64) {
    // Its store holds every entry committed so far (the removal record too).
    survivor.r().read_barrier().await.expect("read barrier");
    let members = survivor.r().members().await.expect("members");
    assert!(
        !members.voters.contains(&gone) && !members.nodes.contains_key(&gone),
        "{members:?}"
    );
    assert!(
        survivor
            .r()
            .store()
            .is_node_removed(gone as i64)
            .await
            .expect("store"),
        "node {gone} not recorded as removed"
    );
}

/// Removing the leader itself (asked of the leader): leadership moves to
/// another voter first, which then removes it. (openraft 0.9 panicked when
/// a leader that had removed itself was handed the next membership step;
/// found by the chaos harness.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_can_be_removed() {
    let ca = init();
    let timing = RaftTiming::default();
    let mut slots = cluster(&ca, 3, &timing).await;
    let leader = wait_leader(&slots).await;
    let gone_id = slots[leader].id;
    write_ok(slots[leader].r(), "sb-before-leave").await;
    slots[leader].r().leave(gone_id).await.expect("leave");
    slots[leader].stop().await;
    assert_removed(&slots[(leader + 1) % 3], gone_id).await;
    let new_leader = wait_leader(&slots).await;
    assert_ne!(slots[new_leader].id, gone_id);
    write_ok(slots[new_leader].r(), "sb-after-leave").await;
    for s in &mut slots {
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leadership_transfers_to_the_chosen_voter() {
    let ca = init();
    let timing = RaftTiming::default();
    let mut slots = cluster(&ca, 3, &timing).await;
    let leader = wait_leader(&slots).await;
    for step in 1..=3 {
        let target = slots[(leader + step) % 3].id;
        // Ask through a replica that is neither the leader nor the target.
        let via = slots
            .iter()
            .position(|s| s.id != target && s.r().leader().map(|l| l.0) != Some(s.id))
            .unwrap_or(0);
        slots[via]
            .r()
            .transfer_leader(target)
            .await
            .unwrap_or_else(|e| panic!("transfer to {target}: {e}"));
        let now_leader = wait_leader(&slots).await;
        assert_eq!(slots[now_leader].id, target, "step {step}");
        write_ok(slots[now_leader].r(), &format!("sb-tr{step:06}")).await;
    }
    for s in &mut slots {
        s.stop().await;
    }
}
