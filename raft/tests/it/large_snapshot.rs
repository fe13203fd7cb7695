//! A logical snapshot of more than 50 MB reaches a new replica over QUIC:
//! three SQLite replicas take in 52 MiB of exec output, snapshot and purge
//! their logs, and a fourth replica joins. It can only catch up by receiving
//! the leader's snapshot (1 MiB chunks, each with its own timeout), and must
//! end with exactly the leader's tables.
//!
//! The output goes in 256 KiB entries, one per write, with a 300 ms heartbeat
//! and a 2–4 s election timeout: openraft 0.9 bounds every AppendEntries RPC
//! by the heartbeat interval, and with the default 50 ms a debug build loses
//! followers to RPC timeouts under this load (a follower that falls behind
//! gets ever larger batches and never catches up). That is a separate
//! finding; this test is about the snapshot, and the long election timeout
//! keeps a busy two-core machine from restarting the transfer with needless
//! elections.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use stacyvm_raft::codec::Command;
use stacyvm_raft::replica::RaftTiming;
use stacyvm_store::testing::TestDb;
use stacyvm_store::testing::cases::{T0, sandbox};
use stacyvm_store::{ExecLog, Mutation};

use crate::harness::{Slot, init, start_cluster, stop_all, tables, wait_leader, write_ok};

/// Bytes of stdout per exec-log row, one row per Raft entry.
const ROW_BYTES: usize = 256 * 1024;
/// Exec-log rows: 208 × 256 KiB = 52 MiB.
const ROWS: usize = 208;
/// Rows per sandbox (exec logs need their sandbox to exist).
const ROWS_PER_SANDBOX: usize = 16;
/// The snapshot the new replica receives must be at least this large.
const MIN_SNAPSHOT_BYTES: usize = 50 * 1024 * 1024;

/// `ROW_BYTES` of printable, row-specific text (no two rows alike, nothing
/// trivially repetitive).
fn output(base: &str, row: usize) -> String {
    let cut = (row * 7_919) % base.len();
    let mut s = format!("row-{row:06}:");
    s.push_str(&base[cut..]);
    s.push_str(&base[..cut]);
    s.truncate(ROW_BYTES);
    s
}

fn base_text() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n";
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..ROW_BYTES)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(ALPHABET[(x % ALPHABET.len() as u64) as usize])
        })
        .collect()
}

fn sandbox_of(row: usize) -> String {
    format!("sb-big{:05}", row / ROWS_PER_SANDBOX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_50_mb_snapshot_reaches_a_new_replica_over_quic() {
    let started = Instant::now();
    let ca = init();
    // Snapshot every 64 entries, keep 4 behind it: the joiner finds the log
    // purged far past the first rows and must take the snapshot.
    let timing = RaftTiming {
        heartbeat_ms: 300,
        election_min_ms: 2_000,
        election_max_ms: 4_000,
        snapshot_every: 64,
        keep_logs: 4,
        ..RaftTiming::default()
    };
    let mut slots = Vec::new();
    for id in 1..=3 {
        slots.push(Slot::own(&ca, id, TestDb::sqlite().await));
    }
    start_cluster(&mut slots, &timing).await;
    let leader = wait_leader(&slots).await;
    let via = (leader + 1) % 3;

    let base = base_text();
    let write_started = Instant::now();
    let sandboxes: Vec<Mutation> = (0..ROWS.div_ceil(ROWS_PER_SANDBOX))
        .map(|i| Mutation::CreateSandbox(sandbox(&sandbox_of(i * ROWS_PER_SANDBOX), "alice", 0)))
        .collect();
    write_ok(slots[leader].r(), "sandboxes", Command::Store(sandboxes)).await;
    for row in 0..ROWS {
        let log = ExecLog {
            id: 0,
            sandbox_id: sandbox_of(row),
            command: format!("cat /data/{row}"),
            exit_code: 0,
            stdout: output(&base, row),
            stderr: String::new(),
            duration_ms: 1,
            created_at: T0,
        };
        let cmd = Command::Store(vec![Mutation::AppendExecLog(log)]);
        write_ok(slots[leader].r(), &format!("row {row}"), cmd).await;
    }
    let big_last = slots[leader].r().applied().expect("applied").index;
    eprintln!(
        "wrote {ROWS} rows of {ROW_BYTES} bytes, one per entry, in {:?}",
        write_started.elapsed()
    );

    // The policy has built snapshots along the way; build one now that holds
    // every row, and wait for the leader to purge its log behind it.
    let lr = slots[leader].r().raft().clone();
    lr.trigger().snapshot().await.expect("trigger snapshot");
    lr.wait(Some(Duration::from_secs(30)))
        .metrics(
            |m| {
                m.snapshot.is_some_and(|s| s.index >= big_last)
                    && m.purged
                        .is_some_and(|p| p.index + timing.keep_logs >= big_last)
            },
            "leader snapshot past the big entries, log purged",
        )
        .await
        .expect("leader snapshots and purges");
    // Both followers hold every row before the join, so the joiner is the only
    // replica catching up. (One that fell behind during the writes may need
    // the snapshot itself; see the module comment.)
    let voters: Vec<u64> = slots.iter().map(|s| s.id).collect();
    let waited = Instant::now();
    lr.wait(Some(Duration::from_secs(90)))
        .metrics(
            |m| {
                m.replication.as_ref().is_some_and(|r| {
                    voters.iter().all(|id| {
                        r.get(id)
                            .is_some_and(|l| l.is_some_and(|l| l.index >= big_last))
                    })
                })
            },
            "every follower holds every row",
        )
        .await
        .expect("followers catch up");
    if waited.elapsed() > Duration::from_secs(1) {
        eprintln!(
            "NOTE: a follower fell behind during the writes and caught up {:?} later",
            waited.elapsed()
        );
    }
    let sent = lr
        .get_snapshot()
        .await
        .expect("get leader snapshot")
        .expect("leader has a snapshot");
    let snapshot_bytes = sent.snapshot.get_ref().len();
    assert!(
        snapshot_bytes >= MIN_SNAPSHOT_BYTES,
        "leader snapshot is {snapshot_bytes} bytes, wanted at least {MIN_SNAPSHOT_BYTES}"
    );

    // A new replica joins (through a follower, as `serve --join` may) and can
    // only catch up from the snapshot.
    let mut fourth = Slot::own(&ca, 4, TestDb::sqlite().await);
    fourth.start(&timing).await;
    let fr = fourth.r().raft().clone();
    let t0 = Instant::now();
    let installed = async {
        fr.wait(Some(Duration::from_secs(90)))
            .metrics(|m| m.snapshot.is_some(), "snapshot installed on the joiner")
            .await
            .expect("joiner installs a snapshot");
        t0.elapsed()
    };
    let joined = async {
        let r = tokio::time::timeout(
            Duration::from_secs(90),
            slots[via].r().join(4, fourth.info()),
        )
        .await;
        // What the joiner had applied when the leader promoted it to voter.
        (r, t0.elapsed(), fr.metrics().borrow().last_applied)
    };
    let (install_time, (join_result, join_time, applied_at_join)) = tokio::join!(installed, joined);
    join_result
        .expect("join finished within 90 s")
        .expect("join node 4");
    let received = fr
        .get_snapshot()
        .await
        .expect("get joiner snapshot")
        .expect("joiner has a snapshot");
    eprintln!(
        "snapshot {} of {snapshot_bytes} bytes ({:.1} MiB): received and installed in {install_time:?} \
         ({:.1} MiB/s); join returned after {join_time:?}",
        sent.meta.snapshot_id,
        snapshot_bytes as f64 / 1048576.0,
        snapshot_bytes as f64 / 1048576.0 / install_time.as_secs_f64(),
    );
    if applied_at_join.is_none_or(|l| l.index < big_last) {
        eprintln!(
            "NOTE: join returned (node 4 promoted to voter) when node 4 had applied only \
             {applied_at_join:?}, before the snapshot was installed"
        );
    }
    assert_eq!(
        received.meta.snapshot_id, sent.meta.snapshot_id,
        "the joiner holds the leader's snapshot, not one it built itself"
    );
    assert_eq!(received.snapshot.get_ref().len(), snapshot_bytes);
    slots.push(fourth);
    let members = slots[via].r().members().await.expect("members");
    assert_eq!(members.voters, BTreeSet::from([1, 2, 3, 4]), "{members:?}");

    // The joiner serves linearizable reads with every row, byte for byte.
    slots[3].r().read_barrier().await.expect("read barrier");
    let got = slots[3].store().export_snapshot().await.expect("export");
    assert_eq!(got.exec_logs.len(), ROWS, "every exec-log row arrived");
    assert_eq!(got.sandboxes.len(), ROWS.div_ceil(ROWS_PER_SANDBOX));
    let logs = slots[3]
        .store()
        .list_exec_logs("sb-big00000", None)
        .await
        .expect("exec logs");
    assert_eq!(logs.len(), ROWS_PER_SANDBOX);
    assert!(
        logs.iter()
            .any(|l| l.stdout == output(&base, 0) && l.command == "cat /data/0"),
        "first row intact on the joiner"
    );
    slots[leader]
        .r()
        .read_barrier()
        .await
        .expect("read barrier");
    let want = slots[leader]
        .store()
        .export_snapshot()
        .await
        .expect("export");
    assert!(
        tables(got) == tables(want),
        "the joiner's tables equal the leader's"
    );

    // And it keeps up with new writes as a voter.
    let cmd = Command::Store(vec![Mutation::CreateSandbox(sandbox(
        "sb-after-join",
        "carol",
        2,
    ))]);
    write_ok(slots[3].r(), "sb-after-join", cmd).await;
    slots[3].r().read_barrier().await.expect("read barrier");
    slots[3]
        .store()
        .get_sandbox("sb-after-join")
        .await
        .expect("write after join");
    stop_all(&mut slots).await;
    eprintln!("large snapshot test took {:?}", started.elapsed());
}
