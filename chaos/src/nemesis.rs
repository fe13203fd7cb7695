//! Faults: what each nemesis does to the cluster, how long it holds, and
//! how it heals. A run is a schedule of rounds drawn from the seed; each
//! round holds at most one replica-side and one worker-side fault at once.
//!
//! Replica side: SIGKILL and restart of the leader or a follower; SIGSTOP of
//! the leader past the lease TTL; the leader isolated; a minority split
//! off; a bridge (one follower sees both halves, the halves not each
//! other); one-way loss (the leader's datagrams to its followers dropped);
//! lossy links (30 % of datagrams); delay (60–160 ms per datagram, so they
//! reorder); a replica added then removed (fresh IDs; removed IDs are
//! refused for good); a follower restarted on a copy of its data directory
//! taken earlier (it must be refused or catch up, never lead with the old
//! log). Worker side: SIGKILL and restart, SIGSTOP past TTL + grace (the
//! leader declares it offline), and a partition from every replica as long.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cluster::Cluster;
use crate::proxy::{Node, Rule};
use crate::rng::Rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    KillLeader,
    KillFollower,
    PauseLeader,
    IsolateLeader,
    SplitMinority,
    Bridge,
    OneWayLoss,
    LossyLinks,
    Delay,
    AddReplica,
    RemoveReplica,
    StaleRestart,
    KillWorker,
    PauseWorker,
    PartitionWorker,
}

impl Kind {
    pub const REPLICA: [Kind; 11] = [
        Kind::KillLeader,
        Kind::KillFollower,
        Kind::PauseLeader,
        Kind::IsolateLeader,
        Kind::SplitMinority,
        Kind::Bridge,
        Kind::OneWayLoss,
        Kind::LossyLinks,
        Kind::Delay,
        Kind::AddReplica,
        Kind::StaleRestart,
    ];
    pub const WORKER: [Kind; 3] = [Kind::KillWorker, Kind::PauseWorker, Kind::PartitionWorker];

    pub fn name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    }

    pub fn parse(s: &str) -> Option<Kind> {
        serde_json::from_value(serde_json::Value::String(s.trim().to_string())).ok()
    }
}

/// One injected fault, as the report shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Fault {
    pub kind: Kind,
    pub target: String,
    pub start_ms: f64,
    pub healed_ms: f64,
    pub note: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovery_ms: Option<f64>,
}

/// A replica fault in progress (what healing must undo).
#[derive(Debug)]
enum Undo {
    Restart(u64),
    Resume(Node),
    Heal,
    Nothing,
}

/// Draws the round's faults: replica-side kinds cycle through a seeded
/// shuffle (so every kind comes up every cycle); a worker fault joins
/// every other round.
#[derive(Debug)]
pub struct Schedule {
    rng: Rng,
    replica: Vec<Kind>,
    worker: Vec<Kind>,
    round: u64,
    pending_remove: bool,
}

impl Schedule {
    pub fn new(rng: Rng, replica: Vec<Kind>, worker: Vec<Kind>) -> Schedule {
        Schedule {
            rng,
            replica,
            worker,
            round: 0,
            pending_remove: false,
        }
    }

    fn shuffled(rng: &mut Rng, kinds: &[Kind], round: u64) -> Option<Kind> {
        if kinds.is_empty() {
            return None;
        }
        let cycle = round / kinds.len() as u64;
        let mut order = kinds.to_vec();
        let mut r = Rng::new(rng.clone().next_u64() ^ cycle);
        for i in (1..order.len()).rev() {
            order.swap(i, r.range(0, i as u64 + 1) as usize);
        }
        order.get((round % kinds.len() as u64) as usize).copied()
    }

    /// The next round: `(replica fault, worker fault)`.
    pub fn next_round(&mut self) -> (Option<Kind>, Option<Kind>) {
        let r = self.round;
        self.round += 1;
        let replica = if self.pending_remove {
            self.pending_remove = false;
            Some(Kind::RemoveReplica)
        } else {
            let k = Self::shuffled(&mut self.rng, &self.replica, r);
            if k == Some(Kind::AddReplica) {
                self.pending_remove = true;
            }
            k
        };
        let worker = if r % 2 == 1 {
            let i = (r / 2) % self.worker.len().max(1) as u64;
            self.worker.get(i as usize).copied()
        } else {
            None
        };
        (replica, worker)
    }
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "cp -a {} {} failed",
            from.display(),
            to.display()
        )))
    }
}

/// Runs the harness's nemeses against `c`.
#[derive(Debug)]
pub struct Nemesis {
    pub rng: Rng,
    next_replica_id: u64,
    /// `(replica, copy)` of a data directory taken earlier.
    stale_copy: Option<(u64, std::path::PathBuf)>,
    pub origin: Instant,
}

impl Nemesis {
    pub fn new(rng: Rng, first_free_id: u64, origin: Instant) -> Nemesis {
        Nemesis {
            rng,
            next_replica_id: first_free_id,
            stale_copy: None,
            origin,
        }
    }

    fn now(&self) -> f64 {
        self.origin.elapsed().as_secs_f64() * 1000.0
    }

    async fn followers(c: &Cluster, leader: u64) -> Vec<u64> {
        c.live_replicas()
            .into_iter()
            .filter(|i| *i != leader)
            .collect()
    }

    /// Takes the copy `StaleRestart` will restart from: the follower is
    /// stopped for the copy (a live sled directory is not a snapshot).
    pub async fn take_stale_copy(&mut self, c: &mut Cluster) -> Result<(), String> {
        let leader = c
            .wait_leader(Duration::from_secs(20))
            .await
            .map_err(|e| e.to_string())?;
        let Some(&f) = Self::followers(c, leader).await.first() else {
            return Err("no follower to copy".into());
        };
        c.kill(Node::Replica(f));
        let copy = c.dir.path().join(format!("node-{f}.stale"));
        copy_dir(&c.data_dir(f), &copy).map_err(|e| e.to_string())?;
        c.start_replica(f, false).map_err(|e| e.to_string())?;
        self.stale_copy = Some((f, copy));
        Ok(())
    }

    /// Injects `kind`; returns the fault record (heal time still open) and
    /// what healing must do.
    async fn inject(&mut self, c: &mut Cluster, kind: Kind) -> Result<(Fault, Undo), String> {
        let leader = c
            .wait_leader(Duration::from_secs(20))
            .await
            .map_err(|e| e.to_string())?;
        let followers = Self::followers(c, leader).await;
        let start_ms = self.now();
        let mut fault = Fault {
            kind,
            target: String::new(),
            start_ms,
            healed_ms: start_ms,
            note: String::new(),
            recovery_ms: None,
        };
        let follower = self.rng.pick(&followers).copied().unwrap_or(leader);
        let replicas: Vec<Node> = c.live_replicas().into_iter().map(Node::Replica).collect();
        let others: Vec<Node> = replicas
            .iter()
            .copied()
            .filter(|n| *n != Node::Replica(leader))
            .collect();
        let worker = Node::Worker(self.rng.range(1, u64::from(c.opts.workers) + 1) as u32);
        let undo = match kind {
            Kind::KillLeader => {
                fault.target = format!("replica {leader}");
                c.kill(Node::Replica(leader));
                Undo::Restart(leader)
            }
            Kind::KillFollower => {
                fault.target = format!("replica {follower}");
                c.kill(Node::Replica(follower));
                Undo::Restart(follower)
            }
            Kind::PauseLeader => {
                fault.target = format!("replica {leader}");
                c.pause(Node::Replica(leader));
                Undo::Resume(Node::Replica(leader))
            }
            Kind::IsolateLeader => {
                fault.target = format!("replica {leader}");
                c.links.partition(&[Node::Replica(leader)], &others);
                Undo::Heal
            }
            Kind::SplitMinority => {
                fault.target = format!("replica {follower} | rest");
                let rest: Vec<Node> = replicas
                    .iter()
                    .copied()
                    .filter(|n| *n != Node::Replica(follower))
                    .collect();
                c.links.partition(&[Node::Replica(follower)], &rest);
                Undo::Heal
            }
            Kind::Bridge => {
                // `follower` sees everyone; the leader's side and the rest
                // do not see each other.
                let far: Vec<Node> = others
                    .iter()
                    .copied()
                    .filter(|n| *n != Node::Replica(follower))
                    .collect();
                fault.target = format!("bridge {follower}: {leader} x {far:?}");
                c.links.partition(&[Node::Replica(leader)], &far);
                Undo::Heal
            }
            Kind::OneWayLoss => {
                fault.target = format!("replica {leader} -> followers");
                for o in &others {
                    c.links.set(
                        Node::Replica(leader),
                        *o,
                        Rule {
                            cut: true,
                            ..Rule::default()
                        },
                    );
                }
                Undo::Heal
            }
            Kind::LossyLinks => {
                fault.target = "all replica links, 30% loss".into();
                for a in &replicas {
                    for b in &replicas {
                        if a != b {
                            c.links.set(
                                *a,
                                *b,
                                Rule {
                                    loss: 0.3,
                                    ..Rule::default()
                                },
                            );
                        }
                    }
                }
                Undo::Heal
            }
            Kind::Delay => {
                let ms = self.rng.range(60, 160);
                fault.target = format!("all replica links, {ms} ms");
                for a in &replicas {
                    for b in &replicas {
                        if a != b {
                            c.links.set(
                                *a,
                                *b,
                                Rule {
                                    delay_ms: ms,
                                    ..Rule::default()
                                },
                            );
                        }
                    }
                }
                Undo::Heal
            }
            Kind::AddReplica => {
                let id = self.next_replica_id;
                self.next_replica_id += 1;
                fault.target = format!("replica {id} joins");
                c.add_replica(id).await.map_err(|e| e.to_string())?;
                // The schedule's next round removes it again.
                Undo::Nothing
            }
            Kind::RemoveReplica => {
                let extra = c
                    .members()
                    .into_iter()
                    .filter(|i| *i > c.opts.replicas)
                    .max();
                let Some(id) = extra else {
                    fault.note = "no extra replica to remove".into();
                    return Ok((fault, Undo::Nothing));
                };
                fault.target = format!("replica {id} leaves");
                c.remove_replica(id).await.map_err(|e| e.to_string())?;
                Undo::Nothing
            }
            Kind::StaleRestart => {
                let Some((f, copy)) = self.stale_copy.clone() else {
                    fault.note = "no stale copy".into();
                    return Ok((fault, Undo::Nothing));
                };
                fault.target = format!("replica {f} on an old copy of its data");
                fault.note = self.stale_restart(c, f, &copy).await?;
                Undo::Nothing
            }
            Kind::KillWorker => {
                fault.target = format!("{worker:?}");
                c.kill(worker);
                Undo::Nothing
            }
            Kind::PauseWorker => {
                fault.target = format!("{worker:?}");
                c.pause(worker);
                Undo::Resume(worker)
            }
            Kind::PartitionWorker => {
                fault.target = format!("{worker:?} | replicas");
                c.links.partition(&[worker], &replicas);
                Undo::Heal
            }
        };
        if matches!(kind, Kind::KillWorker) {
            // Restarted on the same state directory: it adopts its sandboxes.
            tokio::time::sleep(Duration::from_millis(800)).await;
            if let Node::Worker(w) = worker {
                c.start_worker(w).map_err(|e| e.to_string())?;
            }
        }
        Ok((fault, undo))
    }

    /// Restarts follower `f` on `copy`: it must exit (refused) or catch up
    /// with the leader. A refused replica gets its current data back.
    async fn stale_restart(
        &mut self,
        c: &mut Cluster,
        f: u64,
        copy: &Path,
    ) -> Result<String, String> {
        c.kill(Node::Replica(f));
        let dir = c.data_dir(f);
        let current = c.dir.path().join(format!("node-{f}.current"));
        let _ = std::fs::remove_dir_all(&current);
        std::fs::rename(&dir, &current).map_err(|e| e.to_string())?;
        copy_dir(copy, &dir).map_err(|e| e.to_string())?;
        let target = match c.leader().await {
            Some(l) => c
                .status(l)
                .await
                .and_then(|s| s.last_applied_index)
                .unwrap_or(0),
            None => 0,
        };
        c.start_replica(f, false).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = c.exit_status(Node::Replica(f)) {
                // Refused: put its real data back.
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::rename(&current, &dir).map_err(|e| e.to_string())?;
                c.kill(Node::Replica(f));
                c.start_replica(f, false).map_err(|e| e.to_string())?;
                return Ok(format!("refused ({st})"));
            }
            if let Some(s) = c.status(f).await
                && s.last_applied_index.unwrap_or(0) >= target
            {
                let _ = std::fs::remove_dir_all(&current);
                return Ok(format!("caught up to index {target}"));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "replica {f} on a stale copy neither refused nor caught up in 20 s"
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn heal(&self, c: &mut Cluster, undo: &Undo) -> Result<(), String> {
        match undo {
            Undo::Restart(i) => c.start_replica(*i, false).map_err(|e| e.to_string()),
            Undo::Resume(n) => {
                c.resume(*n);
                Ok(())
            }
            Undo::Heal => {
                c.links.heal();
                Ok(())
            }
            Undo::Nothing => Ok(()),
        }
    }

    /// One round: injects the worker fault, then the replica fault, holds
    /// them, heals both, and waits for a leader again.
    pub async fn round(
        &mut self,
        c: &mut Cluster,
        replica: Option<Kind>,
        worker: Option<Kind>,
    ) -> Result<Vec<Fault>, String> {
        let mut active = Vec::new();
        if let Some(k) = worker {
            active.push(self.inject(c, k).await?);
        }
        if let Some(k) = replica {
            active.push(self.inject(c, k).await?);
        }
        // Past the lease TTL (pauses, partitions) or a few elections.
        let ttl = c.opts.lease_ttl_ms;
        let network_hold = self.rng.range(1500, 3000);
        let hold = active
            .iter()
            .map(|(f, _)| match f.kind {
                Kind::PauseWorker | Kind::PartitionWorker => ttl + c.opts.offline_grace_ms + 700,
                Kind::PauseLeader => ttl + 500,
                // Sometimes back before the others' leader lease runs out
                // (a restarted leader may resume its term), sometimes long
                // after (a real failover).
                Kind::KillLeader | Kind::KillFollower => self.rng.range(500, 2500),
                Kind::AddReplica | Kind::RemoveReplica | Kind::StaleRestart | Kind::KillWorker => {
                    200
                }
                _ => network_hold,
            })
            .max()
            .unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(hold)).await;
        let mut out = Vec::new();
        for (mut f, undo) in active.into_iter().rev() {
            self.heal(c, &undo)?;
            f.healed_ms = self.now();
            out.push(f);
        }
        c.wait_leader(Duration::from_secs(20)).await.map_err(|e| {
            format!(
                "after {:?}: {e}",
                out.iter().map(|f| f.kind).collect::<Vec<_>>()
            )
        })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_comes_up_each_cycle_and_removes_follow_adds() {
        let mut s = Schedule::new(Rng::new(42), Kind::REPLICA.to_vec(), Kind::WORKER.to_vec());
        let rounds: Vec<(Option<Kind>, Option<Kind>)> = (0..40).map(|_| s.next_round()).collect();
        for k in Kind::REPLICA.iter().chain(Kind::WORKER.iter()) {
            assert!(
                rounds.iter().any(|(r, w)| *r == Some(*k) || *w == Some(*k)),
                "{k:?}"
            );
        }
        for (i, (r, _)) in rounds.iter().enumerate() {
            if *r == Some(Kind::AddReplica) && i + 1 < rounds.len() {
                assert_eq!(rounds[i + 1].0, Some(Kind::RemoveReplica));
            }
        }
        let mut again = Schedule::new(Rng::new(42), Kind::REPLICA.to_vec(), Kind::WORKER.to_vec());
        let replay: Vec<(Option<Kind>, Option<Kind>)> =
            (0..40).map(|_| again.next_round()).collect();
        assert_eq!(rounds, replay, "a seed replays its schedule");
    }

    #[test]
    fn kind_names_round_trip() {
        for k in Kind::REPLICA.iter().chain(Kind::WORKER.iter()) {
            assert_eq!(Kind::parse(&k.name()), Some(*k));
        }
        assert_eq!(Kind::parse("nonsense"), None);
    }
}
