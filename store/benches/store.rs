//! Store throughput benchmark (`cargo bench -p stacyvm-store`), printed as a
//! table: Raft-style apply throughput (mutations/s) unbatched and in batches of
//! 64, and lease acquire/renew operations per second, on SQLite (temp file, WAL,
//! synchronous=NORMAL) and, when `STACYVM_POSTGRES_TEST_DSN` is set, on Postgres
//! (a fresh database on that server). These figures set the budget for the Raft
//! state machine. Not a test: nothing here asserts a speed.

use std::time::Instant;

use stacyvm_store::testing::TestDb;
use stacyvm_store::testing::cases::{T0, acquire};
use stacyvm_store::{
    AppliedLog, AuditStatus, Mutation, OperationAudit, RenewLease, StoreDriver, StoreExt, Ts,
};

const UNBATCHED: usize = 2_000;
const BATCHES: usize = 100;
const BATCH: usize = 64;
const LEASES: usize = 2_000;

fn audit(i: usize) -> Mutation {
    Mutation::AppendOperationAudit(OperationAudit {
        id: 0,
        actor: "bench".into(),
        action: "exec".into(),
        sandbox_id: format!("sb-{i:08x}"),
        resource: "echo hello".into(),
        runtime: "mock".into(),
        status: AuditStatus::Success,
        detail: "exit=0".into(),
        tenant_id: String::new(),
        created_at: T0.plus_millis(i as i64),
    })
}

fn rate(n: usize, started: Instant) -> f64 {
    n as f64 / started.elapsed().as_secs_f64()
}

async fn bench(driver: StoreDriver) -> Option<Vec<(String, f64)>> {
    let db = TestDb::fresh(driver, "store benchmark").await?;
    let s = &*db.store;
    let mut rows = Vec::new();
    let mut index = 0u64;

    let t = Instant::now();
    for i in 0..UNBATCHED {
        index += 1;
        s.apply_batch(
            &AppliedLog {
                index,
                log_id: index.to_string(),
            },
            &[audit(i)],
        )
        .await
        .expect("apply");
    }
    rows.push((
        "apply, 1 mutation per entry (mutations/s)".to_owned(),
        rate(UNBATCHED, t),
    ));

    let t = Instant::now();
    for b in 0..BATCHES {
        index += 1;
        let batch: Vec<_> = (0..BATCH).map(|i| audit(b * BATCH + i)).collect();
        s.apply_batch(
            &AppliedLog {
                index,
                log_id: index.to_string(),
            },
            &batch,
        )
        .await
        .expect("apply");
    }
    rows.push((
        "apply, 64 mutations per entry (mutations/s)".to_owned(),
        rate(BATCHES * BATCH, t),
    ));

    let t = Instant::now();
    for i in 0..LEASES {
        s.acquire_lease(acquire(&format!("res-{i}"), "w1", 30_000, T0))
            .await
            .expect("acquire");
    }
    rows.push(("lease acquire (ops/s)".to_owned(), rate(LEASES, t)));

    let t = Instant::now();
    for i in 0..LEASES {
        s.renew_lease(RenewLease {
            resource_id: format!("res-{i}"),
            holder_id: "w1".into(),
            generation: 1,
            ttl_ms: 30_000,
            now: Ts(T0.micros() + 1_000),
        })
        .await
        .expect("renew");
    }
    rows.push(("lease renew (ops/s)".to_owned(), rate(LEASES, t)));
    db.cleanup().await;
    Some(rows)
}

#[tokio::main]
async fn main() {
    let sqlite = bench(StoreDriver::Sqlite).await.unwrap_or_default();
    let postgres = bench(StoreDriver::Postgres).await;
    println!("| workload | SQLite | Postgres |");
    println!("|---|---:|---:|");
    for (i, (name, lite)) in sqlite.iter().enumerate() {
        let pg = postgres
            .as_ref()
            .map_or("skipped".to_owned(), |p| format!("{:.0}", p[i].1));
        println!("| {name} | {lite:.0} | {pg} |");
    }
}
