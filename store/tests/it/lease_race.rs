//! Racing lease acquirers on separate connections: exactly one winner, every
//! loser gets `Conflict` (never another error); after expiry, exactly one new
//! winner with a higher generation. Runs on live Postgres (the case that
//! matters: separate server connections) and on SQLite (separate pools).

use std::sync::Arc;

use stacyvm_store::testing::TestDb;
use stacyvm_store::testing::cases::{T0, acquire};
use stacyvm_store::{Lease, Store, StoreDriver, StoreError, StoreExt, Ts};
use tokio::sync::Barrier;

const RACERS: usize = 16;

/// Every racer acquires `lease-race` at `now` on its own connection at once.
async fn race(stores: &[Arc<dyn Store>], round: &str, now: Ts) -> (Vec<Lease>, usize) {
    let barrier = Arc::new(Barrier::new(stores.len()));
    let tasks: Vec<_> = stores
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let (s, b) = (s.clone(), barrier.clone());
            let holder = format!("{round}-holder-{i}");
            tokio::spawn(async move {
                b.wait().await;
                s.acquire_lease(acquire("lease-race", &holder, 1_000, now))
                    .await
            })
        })
        .collect();
    let (mut wins, mut conflicts) = (Vec::new(), 0);
    for t in tasks {
        match t.await.expect("join") {
            Ok(l) => wins.push(l),
            Err(StoreError::Conflict { .. }) => conflicts += 1,
            Err(other) => panic!("a loser must get Conflict, got {other:?}"),
        }
    }
    (wins, conflicts)
}

async fn lease_race(driver: StoreDriver) {
    let Some(db) = TestDb::fresh(driver, "live lease race").await else {
        return;
    };
    let mut stores = Vec::new();
    for _ in 0..RACERS {
        stores.push(db.reopen_with(1).await);
    }
    let (wins, conflicts) = race(&stores, "first", T0).await;
    assert_eq!(
        (wins.len(), conflicts),
        (1, RACERS - 1),
        "exactly one winner"
    );
    let first = &wins[0];
    eprintln!(
        "{driver}: first race won by {} at generation {}",
        first.holder_id, first.generation
    );

    // After expiry, a new crowd races to take over.
    let (wins, conflicts) = race(&stores, "second", T0.plus_millis(1_000)).await;
    assert_eq!(
        (wins.len(), conflicts),
        (1, RACERS - 1),
        "exactly one takeover winner"
    );
    let second = &wins[0];
    assert_ne!(second.holder_id, first.holder_id);
    assert!(
        second.generation > first.generation,
        "takeover generation {} must exceed {}",
        second.generation,
        first.generation
    );
    assert_eq!(
        db.store.get_lease("lease-race").await.expect("lease"),
        *second
    );
    for s in stores {
        s.close().await;
    }
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_sixteen_connections_one_winner_then_one_takeover() {
    lease_race(StoreDriver::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_sixteen_connections_one_winner_then_one_takeover() {
    lease_race(StoreDriver::Sqlite).await;
}
