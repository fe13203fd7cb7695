//! Admission: may a spawn go ahead? Pure and table-tested; the leader calls
//! it with its own counts (one process decides for the whole cluster).

use std::time::Duration;

/// Limits in force for one request (0 / None = unlimited).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub max_sandboxes: i64,
    pub max_per_owner: i64,
    pub max_ttl: Option<Duration>,
}

/// Counts the decision uses (live sandboxes plus spawns in flight).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub total: i64,
    pub owner: i64,
}

/// Why a spawn was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    #[error("ttl {asked:?} is over the maximum {max:?}")]
    TtlOverMax { asked: Duration, max: Duration },
    #[error("the cluster runs {0} sandboxes, its limit")]
    ClusterFull(i64),
    #[error("owner runs {used} sandboxes; its limit is {max}")]
    OwnerFull { used: i64, max: i64 },
}

impl AdmissionError {
    /// Whether waiting (the queue) can help.
    pub fn queueable(&self) -> bool {
        !matches!(self, AdmissionError::TtlOverMax { .. })
    }
}

/// Decides one spawn. `has_owner` is false for anonymous spawns (no per-owner cap).
pub fn admit(
    ttl: Duration,
    has_owner: bool,
    usage: Usage,
    l: &Limits,
) -> Result<(), AdmissionError> {
    if let Some(max) = l.max_ttl
        && ttl > max
    {
        return Err(AdmissionError::TtlOverMax { asked: ttl, max });
    }
    if l.max_sandboxes > 0 && usage.total >= l.max_sandboxes {
        return Err(AdmissionError::ClusterFull(l.max_sandboxes));
    }
    if has_owner && l.max_per_owner > 0 && usage.owner >= l.max_per_owner {
        return Err(AdmissionError::OwnerFull {
            used: usage.owner,
            max: l.max_per_owner,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admit_table() {
        let m = |s: u64| Duration::from_secs(60 * s);
        let l = Limits {
            max_sandboxes: 10,
            max_per_owner: 2,
            max_ttl: Some(m(60)),
        };
        let u = |total, owner| Usage { total, owner };
        #[rustfmt::skip]
        let cases: &[(&str, Duration, bool, Usage, &Limits, Option<&str>)] = &[
            ("fits", m(5), true, u(0, 0), &l, None),
            ("ttl at max", m(60), true, u(0, 0), &l, None),
            ("ttl over max", m(61), true, u(0, 0), &l, Some("ttl")),
            ("cluster full", m(5), true, u(10, 0), &l, Some("cluster")),
            ("owner full", m(5), true, u(3, 2), &l, Some("owner")),
            ("anonymous has no owner cap", m(5), false, u(3, 2), &l, None),
            ("unlimited", m(9999), true, u(99999, 9999), &Limits::default(), None),
        ];
        for (name, ttl, has_owner, usage, limits, want) in cases {
            let got = admit(*ttl, *has_owner, *usage, limits);
            let kind = got.as_ref().err().map(|e| match e {
                AdmissionError::TtlOverMax { .. } => "ttl",
                AdmissionError::ClusterFull(_) => "cluster",
                AdmissionError::OwnerFull { .. } => "owner",
            });
            assert_eq!(kind, *want, "{name}: {got:?}");
        }
        assert!(
            !AdmissionError::TtlOverMax {
                asked: m(2),
                max: m(1)
            }
            .queueable()
        );
        assert!(AdmissionError::ClusterFull(1).queueable());
    }
}
