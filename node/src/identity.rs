//! The data directory's identity file, `<data_dir>/cluster.json`: which
//! cluster this directory belongs to and which node ID it was created for.
//!
//! It is written once (at bootstrap, or after a successful join) and checked at
//! every start, so a replica never starts in another cluster's directory or
//! under another node's ID. The checks are pure ([`check`]); the file I/O is
//! at the edges.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File name inside the data directory.
pub const FILE: &str = "cluster.json";

/// What the data directory is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub cluster_id: String,
    pub node_id: u64,
}

/// Why a start was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error(
        "data directory belongs to node {found}, not node {wanted}; use --id {found} or another --data-dir"
    )]
    WrongNode { found: u64, wanted: u64 },
    #[error(
        "data directory belongs to cluster {found}, but the cluster joined is {wanted}; \
         use a fresh --data-dir to join another cluster"
    )]
    WrongCluster { found: String, wanted: String },
    #[error(
        "data directory is empty: start with --bootstrap to create a cluster or --join HOST:PORT to join one"
    )]
    Uninitialised,
    #[error("cannot read or write {path}: {reason}")]
    Io { path: PathBuf, reason: String },
}

/// What a start should do, decided from the identity file and the flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartPlan {
    /// Known directory: restart as a member; no bootstrap, no join.
    Resume(Identity),
    /// Empty directory with `--bootstrap`: create a new cluster.
    Bootstrap,
    /// Empty directory with `--join`: ask a member to add us.
    Join,
}

/// Decides how to start node `wanted` given the identity found on disk.
pub fn check(
    found: Option<&Identity>,
    wanted: u64,
    bootstrap: bool,
    join: bool,
) -> Result<StartPlan, IdentityError> {
    match found {
        Some(id) if id.node_id != wanted => Err(IdentityError::WrongNode {
            found: id.node_id,
            wanted,
        }),
        Some(id) => Ok(StartPlan::Resume(id.clone())),
        None if bootstrap => Ok(StartPlan::Bootstrap),
        None if join => Ok(StartPlan::Join),
        None => Err(IdentityError::Uninitialised),
    }
}

/// Checks that the cluster a join reached is the one this directory is for.
pub fn check_joined(found: Option<&Identity>, joined_cluster: &str) -> Result<(), IdentityError> {
    match found {
        Some(id) if id.cluster_id != joined_cluster => Err(IdentityError::WrongCluster {
            found: id.cluster_id.clone(),
            wanted: joined_cluster.to_owned(),
        }),
        _ => Ok(()),
    }
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> IdentityError {
    IdentityError::Io {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

/// Reads the identity file, if any.
pub fn load(data_dir: &Path) -> Result<Option<Identity>, IdentityError> {
    let path = data_dir.join(FILE);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io_err(&path, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(&path, e)),
    }
}

/// Writes the identity file atomically (temp file, fsync, rename).
pub fn save(data_dir: &Path, identity: &Identity) -> Result<(), IdentityError> {
    fs::create_dir_all(data_dir).map_err(|e| io_err(data_dir, e))?;
    let path = data_dir.join(FILE);
    let tmp = data_dir.join(format!(".{FILE}.tmp"));
    let body = serde_json::to_vec_pretty(identity).map_err(|e| io_err(&path, e))?;
    fs::write(&tmp, body).map_err(|e| io_err(&tmp, e))?;
    fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err(&tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))?;
    fs::File::open(data_dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(data_dir, e))
}

/// A new random cluster ID.
pub fn new_cluster_id() -> String {
    format!("c-{:016x}", rand::random::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_plan_table() {
        let mine = Identity {
            cluster_id: "c-1".into(),
            node_id: 2,
        };
        let cases: Vec<(
            &str,
            Option<&Identity>,
            u64,
            bool,
            bool,
            Result<StartPlan, IdentityError>,
        )> = vec![
            (
                "restart resumes",
                Some(&mine),
                2,
                false,
                false,
                Ok(StartPlan::Resume(mine.clone())),
            ),
            (
                "restart ignores --bootstrap",
                Some(&mine),
                2,
                true,
                false,
                Ok(StartPlan::Resume(mine.clone())),
            ),
            (
                "another node's directory",
                Some(&mine),
                3,
                false,
                false,
                Err(IdentityError::WrongNode {
                    found: 2,
                    wanted: 3,
                }),
            ),
            (
                "fresh + bootstrap",
                None,
                1,
                true,
                false,
                Ok(StartPlan::Bootstrap),
            ),
            ("fresh + join", None, 1, false, true, Ok(StartPlan::Join)),
            (
                "fresh, no flag",
                None,
                1,
                false,
                false,
                Err(IdentityError::Uninitialised),
            ),
        ];
        for (name, found, wanted, bootstrap, join, want) in cases {
            assert_eq!(check(found, wanted, bootstrap, join), want, "{name}");
        }
        assert!(check_joined(Some(&mine), "c-1").is_ok());
        assert!(matches!(
            check_joined(Some(&mine), "c-9"),
            Err(IdentityError::WrongCluster { .. })
        ));
        assert!(check_joined(None, "c-9").is_ok());
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = tempfile::tempdir().expect("tmp");
        assert_eq!(load(dir.path()).expect("load"), None);
        let id = Identity {
            cluster_id: new_cluster_id(),
            node_id: 7,
        };
        save(dir.path(), &id).expect("save");
        assert_eq!(load(dir.path()).expect("load"), Some(id));
        fs::write(dir.path().join(FILE), b"{not json").expect("corrupt");
        assert!(matches!(load(dir.path()), Err(IdentityError::Io { .. })));
    }
}
