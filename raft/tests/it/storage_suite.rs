//! openraft's own storage test suite (`openraft::testing::Suite`) against our
//! sled log store and the store-backed state machine, on a fresh SQLite
//! database and a fresh sled directory per suite case.

use openraft::testing::{StoreBuilder, Suite};
use stacyvm_raft::log::SledLog;
use stacyvm_raft::log_store::RaftLogStore;
use stacyvm_raft::state_machine::StoreStateMachine;
use stacyvm_raft::types::{StorageError, TypeConfig};
use stacyvm_store::testing::TestDb;

/// Keeps a case's directories alive until the case ends.
struct Guard {
    _log_dir: tempfile::TempDir,
    _db: TestDb,
}

struct Builder;

impl StoreBuilder<TypeConfig, RaftLogStore, StoreStateMachine, Guard> for Builder {
    async fn build(&self) -> Result<(Guard, RaftLogStore, StoreStateMachine), StorageError> {
        let log_dir = tempfile::tempdir().expect("temp dir");
        let log = SledLog::open(log_dir.path()).expect("open sled log");
        let db = TestDb::sqlite().await;
        let sm = StoreStateMachine::new(db.store.clone());
        Ok((
            Guard {
                _log_dir: log_dir,
                _db: db,
            },
            RaftLogStore::new(log),
            sm,
        ))
    }
}

#[test]
fn openraft_storage_suite_passes_on_sled_log_and_sqlite_state_machine() {
    Suite::test_all(Builder).expect("openraft storage suite");
}

/// A snapshot whose bytes are garbage, or whose tables disagree with its
/// metadata, is refused and leaves the state machine untouched.
#[tokio::test]
async fn a_bad_snapshot_is_refused_and_changes_nothing() {
    use std::io::Cursor;

    use openraft::storage::{RaftStateMachine, SnapshotMeta};
    use openraft::{RaftSnapshotBuilder, StoredMembership};
    use stacyvm_store::testing::cases::sandbox;
    use stacyvm_store::{AppliedLog, Mutation};

    let leader_db = TestDb::sqlite().await;
    let mut leader = StoreStateMachine::new(leader_db.store.clone());
    let at = AppliedLog {
        index: 3,
        log_id: serde_json::to_string(&openraft::LogId::new(
            openraft::CommittedLeaderId::new(1, 1),
            2,
        ))
        .expect("json"),
    };
    leader_db
        .store
        .apply_batch(
            &at,
            &[Mutation::CreateSandbox(sandbox("sb-snap0001", "a", 0))],
        )
        .await
        .expect("apply");
    let good = leader.build_snapshot().await.expect("build");

    let follower_db = TestDb::sqlite().await;
    let mut follower = StoreStateMachine::new(follower_db.store.clone());
    let before = follower_db.store.export_snapshot().await.expect("export");

    // Garbage bytes.
    let garbage = Box::new(Cursor::new(b"\x01not a snapshot".to_vec()));
    assert!(
        follower
            .install_snapshot(&good.meta, garbage)
            .await
            .is_err()
    );
    // Valid tables, metadata claiming another log position.
    let lying = SnapshotMeta {
        last_log_id: Some(openraft::LogId::new(
            openraft::CommittedLeaderId::new(9, 1),
            99,
        )),
        last_membership: StoredMembership::default(),
        snapshot_id: "lying".into(),
    };
    let data = good.snapshot.clone();
    assert!(follower.install_snapshot(&lying, data).await.is_err());
    assert_eq!(
        follower_db.store.export_snapshot().await.expect("export"),
        before,
        "nothing changed"
    );

    // The genuine snapshot installs.
    follower
        .install_snapshot(&good.meta, good.snapshot)
        .await
        .expect("install");
    assert!(follower_db.store.get_sandbox("sb-snap0001").await.is_ok());
}
