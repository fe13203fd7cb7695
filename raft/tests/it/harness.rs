//! The in-process cluster harness every cluster test uses: replicas over real
//! QUIC on loopback, each with a store the test chooses (SQLite, its own
//! Postgres database, or a handle on a database other replicas share).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stacyvm_raft::certs::{NodeTls, TestCa};
use stacyvm_raft::codec::Command;
use stacyvm_raft::replica::{RaftTiming, Replica, ReplicaConfig};
use stacyvm_raft::types::{NodeId, NodeInfo, Response};
use stacyvm_store::testing::TestDb;
use stacyvm_store::{MutationOutput, RaftState, Store, StoreSnapshot};

/// One replica's durable parts, kept across restarts.
pub(crate) struct Slot {
    pub(crate) id: NodeId,
    tls: NodeTls,
    log_dir: tempfile::TempDir,
    /// The database this replica's store lives in (possibly shared).
    pub(crate) db: TestDb,
    /// The handle the next start uses; a restart opens a fresh one.
    store: Option<Arc<dyn Store>>,
    addr: Option<SocketAddr>,
    pub(crate) replica: Option<Replica>,
    /// The store is shared with other replicas (`ReplicaConfig::shared_store`).
    shared: bool,
}

impl Slot {
    /// A replica whose store is `store`, a handle on `db`.
    pub(crate) fn new(ca: &TestCa, id: NodeId, db: TestDb, store: Arc<dyn Store>) -> Slot {
        Slot {
            id,
            tls: ca.node_tls(id).expect("node tls"),
            log_dir: tempfile::tempdir().expect("tmp"),
            db,
            store: Some(store),
            addr: None,
            replica: None,
            shared: false,
        }
    }

    /// A replica whose store is `store`, a handle on `db` that other replicas share.
    pub(crate) fn shared(ca: &TestCa, id: NodeId, db: TestDb, store: Arc<dyn Store>) -> Slot {
        Slot {
            shared: true,
            ..Slot::new(ca, id, db, store)
        }
    }

    /// A replica with its own database: its main handle.
    pub(crate) fn own(ca: &TestCa, id: NodeId, db: TestDb) -> Slot {
        let store = db.store.clone();
        Slot::new(ca, id, db, store)
    }

    /// Starts (or restarts, on the same port, log and database) this replica.
    pub(crate) async fn start(&mut self, timing: &RaftTiming) {
        let bind = self
            .addr
            .unwrap_or_else(|| "127.0.0.1:0".parse().expect("addr"));
        let store = match self.store.take() {
            Some(s) => s,
            None => self.db.reopen().await,
        };
        let replica = Replica::start(ReplicaConfig {
            id: self.id,
            bind,
            advertise: NodeInfo {
                raft_addr: bind.to_string(),
                api_addr: String::new(),
            },
            tls: self.tls.clone(),
            log_dir: self.log_dir.path().to_path_buf(),
            store,
            shared_store: self.shared,
            timing: timing.clone(),
        })
        .await
        .expect("start replica");
        self.addr = replica.raft_addr();
        self.replica = Some(replica);
    }

    pub(crate) fn info(&self) -> NodeInfo {
        NodeInfo {
            raft_addr: self.addr.expect("started").to_string(),
            api_addr: format!("api-{}", self.id),
        }
    }

    pub(crate) fn r(&self) -> &Replica {
        self.replica.as_ref().expect("running")
    }

    /// The running replica's store.
    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        self.r().store()
    }

    pub(crate) async fn stop(&mut self) {
        if let Some(r) = self.replica.take() {
            r.shutdown().await;
        }
    }
}

/// Installs the crypto provider and makes a test CA.
pub(crate) fn init() -> TestCa {
    let _ = rustls::crypto::ring::default_provider().install_default();
    TestCa::new().expect("test CA")
}

/// Starts every slot and bootstraps them as one cluster.
pub(crate) async fn start_cluster(slots: &mut [Slot], timing: &RaftTiming) {
    for s in slots.iter_mut() {
        s.start(timing).await;
    }
    let members: BTreeMap<NodeId, NodeInfo> = slots.iter().map(|s| (s.id, s.info())).collect();
    slots[0].r().bootstrap(members).await.expect("bootstrap");
}

/// Waits until every running replica agrees on one leader; returns its index.
pub(crate) async fn wait_leader(slots: &[Slot]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let running: Vec<&Slot> = slots.iter().filter(|s| s.replica.is_some()).collect();
        let leaders: BTreeSet<Option<NodeId>> = running
            .iter()
            .map(|s| s.r().leader().map(|l| l.0))
            .collect();
        if leaders.len() == 1
            && let Some(Some(id)) = leaders.into_iter().next()
            && let Some(pos) = slots.iter().position(|s| s.id == id && s.replica.is_some())
        {
            return pos;
        }
        assert!(Instant::now() < deadline, "no agreed leader within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stops every running replica.
pub(crate) async fn stop_all(slots: &mut [Slot]) {
    for s in slots.iter_mut() {
        s.stop().await;
    }
}

/// Writes `cmd` through `r` and returns its outcomes, every one of which must
/// be `Ok`. A write the leader reports as applied by another replica sharing
/// its database (`AlreadyApplied`) fails here: tests that allow it match the
/// response themselves.
pub(crate) async fn write_ok(r: &Replica, what: &str, cmd: Command) -> Vec<MutationOutput> {
    match r.write(cmd).await {
        Ok(Response::Applied(results)) => results
            .into_iter()
            .map(|o| o.unwrap_or_else(|e| panic!("{what} through node {}: {e}", r.id())))
            .collect(),
        other => panic!("write {what} through node {}: {other:?}", r.id()),
    }
}

/// The tables of a snapshot without the Raft bookkeeping (which differs
/// between replicas only in when it was read).
pub(crate) fn tables(mut snap: StoreSnapshot) -> StoreSnapshot {
    snap.raft = RaftState::default();
    snap
}
