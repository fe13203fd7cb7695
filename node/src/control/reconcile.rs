//! Reconciliation decisions: what to do with one persisted sandbox given its
//! owner's health and, for live owners, what the owner reports. Pure and
//! table-tested; the control loop does the I/O.
//!
//! | owner | decision |
//! |---|---|
//! | online, reports it running | keep; correct the record to `running` if needed |
//! | online, reports it stopped | mark `error` (its process died), keep the lease until destroyed |
//! | online, does not have it | mark `lost`, close the lease |
//! | online, did not answer | wait (next pass) |
//! | stale | wait |
//! | draining | keep |
//! | offline, or no worker record | mark `lost`, close the lease |
//!
//! A sandbox still `creating` is left alone while its spawn may be in flight
//! (`settled` false: this replica is running the spawn, or it began less
//! than one spawn timeout ago). Once settled, the spawn ended without its
//! `running` record (a leader crashed between the worker RPC and that write,
//! or could not record it): no client was told it succeeded, so it is
//! abandoned (lease revoked, record destroyed; a worker that started it
//! stops it when its heartbeat learns). Such a record never holds a quota
//! slot and a lease forever.

use stacyvm_store::SandboxState;

use super::liveness::Health;

/// What the owning worker said about the sandbox (online owners only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Report {
    Running,
    Stopped,
    Missing,
    NoAnswer,
}

/// The owner as reconciliation sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// No worker record exists.
    Missing,
    Known(Health),
}

/// What to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Keep,
    /// Record a new state (the lease stays).
    SetState(SandboxState),
    /// Record `lost` and revoke the lease.
    MarkLost,
    /// Ask the owner (online owners need a status RPC first).
    AskOwner,
    /// A spawn that never completed: revoke the lease, destroy the record.
    Abandon,
}

/// Decides for one sandbox; `report` is `None` before the owner was asked;
/// `settled` says whether a `creating` sandbox's spawn can still be in flight
/// (ignored for other states).
pub fn decide(state: SandboxState, owner: Owner, report: Option<Report>, settled: bool) -> Action {
    use SandboxState as S;
    match state {
        S::Destroyed | S::Lost | S::Expired => return Action::Keep,
        S::Creating if settled => return Action::Abandon,
        S::Creating => return Action::Keep,
        _ => {}
    }
    match owner {
        Owner::Missing | Owner::Known(Health::Offline) => Action::MarkLost,
        Owner::Known(Health::Stale) | Owner::Known(Health::Draining) => Action::Keep,
        Owner::Known(Health::Online) => match report {
            None => Action::AskOwner,
            Some(Report::Running) if state == S::Running || state == S::Idle => Action::Keep,
            Some(Report::Running) => Action::SetState(S::Running),
            Some(Report::Stopped) if state == S::Error => Action::Keep,
            Some(Report::Stopped) => Action::SetState(S::Error),
            Some(Report::Missing) => Action::MarkLost,
            Some(Report::NoAnswer) => Action::Keep,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action::*;
    use Health::*;
    use SandboxState as S;

    #[test]
    fn decide_table() {
        #[rustfmt::skip]
        let cases: &[(S, Owner, Option<Report>, Action)] = &[
            (S::Creating, Owner::Known(Online), None, Abandon),
            (S::Creating, Owner::Known(Online), Some(Report::Running), Abandon),
            (S::Creating, Owner::Known(Online), Some(Report::Missing), Abandon),
            (S::Creating, Owner::Known(Stale), None, Abandon),
            (S::Creating, Owner::Known(Offline), None, Abandon),
            (S::Running, Owner::Known(Online), None, AskOwner),
            (S::Running, Owner::Known(Online), Some(Report::Running), Keep),
            (S::Unhealthy, Owner::Known(Online), Some(Report::Running), SetState(S::Running)),
            (S::Error, Owner::Known(Online), Some(Report::Running), SetState(S::Running)),
            (S::Running, Owner::Known(Online), Some(Report::Stopped), SetState(S::Error)),
            (S::Error, Owner::Known(Online), Some(Report::Stopped), Keep),
            (S::Running, Owner::Known(Online), Some(Report::Missing), MarkLost),
            (S::Running, Owner::Known(Online), Some(Report::NoAnswer), Keep),
            (S::Running, Owner::Known(Stale), None, Keep),
            (S::Running, Owner::Known(Draining), None, Keep),
            (S::Running, Owner::Known(Offline), None, MarkLost),
            (S::Running, Owner::Missing, None, MarkLost),
            (S::Idle, Owner::Missing, None, MarkLost),
            (S::Creating, Owner::Missing, None, Abandon),
            (S::Destroyed, Owner::Known(Offline), None, Keep),
            (S::Lost, Owner::Known(Offline), None, Keep),
        ];
        for (state, owner, report, want) in cases {
            assert_eq!(
                decide(*state, *owner, *report, true),
                *want,
                "{state:?} {owner:?} {report:?}"
            );
        }
    }

    #[test]
    fn a_spawn_in_flight_is_left_alone_whatever_its_owner() {
        for owner in [
            Owner::Missing,
            Owner::Known(Online),
            Owner::Known(Offline),
            Owner::Known(Stale),
        ] {
            for report in [None, Some(Report::Missing), Some(Report::Running)] {
                assert_eq!(decide(S::Creating, owner, report, false), Keep);
            }
        }
        // `settled` concerns only `creating`.
        assert_eq!(decide(S::Running, Owner::Missing, None, false), MarkLost);
    }
}
