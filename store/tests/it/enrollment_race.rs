//! Racing consumers of one enrollment secret on separate connections: exactly
//! one gets the credential, every other gets `Conflict` "already used" (never
//! another error). Runs on live Postgres (separate server connections, the row
//! lock is what decides) and on SQLite (separate pools).

use std::sync::Arc;

use stacyvm_store::testing::TestDb;
use stacyvm_store::testing::cases::{T0, consume, enrollment, secret_hash};
use stacyvm_store::{Mutation, MutationOutput, Store, StoreDriver, StoreError};
use tokio::sync::Barrier;

const RACERS: usize = 16;

async fn enrollment_race(driver: StoreDriver) {
    let Some(db) = TestDb::fresh(driver, "live enrollment race").await else {
        return;
    };
    db.store
        .execute(&Mutation::CreateEnrollment(enrollment(
            "race-secret",
            "w-race",
            60_000,
        )))
        .await
        .expect("create enrollment");
    let mut stores: Vec<Arc<dyn Store>> = Vec::new();
    for _ in 0..RACERS {
        stores.push(db.reopen_with(1).await);
    }
    let barrier = Arc::new(Barrier::new(RACERS));
    let tasks: Vec<_> = stores
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let (s, b) = (s.clone(), barrier.clone());
            let m = consume("race-secret", "w-race", &format!("cred-{i}"), T0);
            tokio::spawn(async move {
                b.wait().await;
                (i, s.execute(&m).await)
            })
        })
        .collect();
    let (mut winners, mut conflicts) = (Vec::new(), 0);
    for t in tasks {
        match t.await.expect("join") {
            (i, Ok(MutationOutput::Done)) => winners.push(i),
            (_, Err(StoreError::Conflict { reason, .. })) if reason == "already used" => {
                conflicts += 1
            }
            (_, other) => panic!("a loser must get Conflict \"already used\", got {other:?}"),
        }
    }
    assert_eq!(
        (winners.len(), conflicts),
        (1, RACERS - 1),
        "exactly one consumer wins"
    );
    let winner = winners[0];
    eprintln!("{driver}: enrollment consumed by racer {winner}");
    let cred = db
        .store
        .get_worker_credential("w-race")
        .await
        .expect("credential");
    assert_eq!(
        cred.token_hash,
        secret_hash(&format!("cred-{winner}")),
        "the credential is the winner's"
    );
    assert_eq!(
        db.store
            .get_enrollment(&secret_hash("race-secret"))
            .await
            .expect("enrollment")
            .used_at,
        Some(T0)
    );
    for s in stores {
        s.close().await;
    }
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_sixteen_connections_consume_one_enrollment_once() {
    enrollment_race(StoreDriver::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_sixteen_connections_consume_one_enrollment_once() {
    enrollment_race(StoreDriver::Sqlite).await;
}
