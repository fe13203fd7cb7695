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
