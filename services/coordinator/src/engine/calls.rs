//! The replica-call layer: every call the engine makes to a storage node of
//! its region or to a remote region's coordinator, each answering with one
//! typed error, [`Miss`] (unreachable or failed, timed out, overloaded, or
//! rejected with the geolog error), instead of a gRPC status every caller
//! would classify again.

use crate::replicas::{Replica, collect};
use geolog_core::ring::Placement;
use geolog_core::{AckTracker, ErrorCode, GeologError};
use geolog_proto::coordinator as cpb;
use geolog_proto::storage as pb;
use std::fmt;

/// Why a replica (or a remote region) did not do what it was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Miss {
    /// Unreachable, or failed for its own reasons (its database down, a
    /// transport error): another replica may succeed.
    Failed(String),
    /// No answer in time, or the connection broke mid-call: the call may
    /// have taken effect (a mint is then never made again elsewhere).
    TimedOut,
    /// Its queue was full: refused before anything was sent or stored.
    Overloaded(String),
    /// It refused the request itself (invalid input, idempotency
    /// conflict): the client's error, the same on any replica.
    Rejected(GeologError),
}

impl fmt::Display for Miss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Miss::Failed(why) => write!(f, "failed: {why}"),
            Miss::TimedOut => f.write_str("timed out"),
            Miss::Overloaded(why) => write!(f, "overloaded: {why}"),
            Miss::Rejected(err) => write!(f, "rejected: {err}"),
        }
    }
}

impl Miss {
    /// Classifies a call's status (the only place that reads statuses).
    pub fn of(status: &tonic::Status) -> Miss {
        if is_timeout(status) {
            return Miss::TimedOut;
        }
        // A connection that broke after the call was sent (the node killed
        // mid-call) reads as a bare UNKNOWN: it may have committed. A call
        // that never reached the node is a bare UNAVAILABLE (below).
        if status.details().is_empty() && status.code() == tonic::Code::Unknown {
            return Miss::TimedOut;
        }
        // A status without geolog details (a transport failure, or an
        // HTTP/2 peer calming its client with a bare RESOURCE_EXHAUSTED
        // after the call ran) is a failure, never an overload.
        if status.details().is_empty() {
            return Miss::Failed(status.message().to_string());
        }
        Miss::of_error(GeologError::from_status(status))
    }

    /// Classifies a geolog error a replica answered (for a whole call, or
    /// for one record of a batch).
    fn of_error(err: GeologError) -> Miss {
        if err.code == ErrorCode::Overloaded {
            Miss::Overloaded(err.message)
        } else if err.code.http_status().is_client_error() {
            Miss::Rejected(err)
        } else {
            Miss::Failed(err.message)
        }
    }

    /// How a remote region reported one of its replicas: `None` when it
    /// acknowledged.
    pub(super) fn of_remote(
        ok: bool,
        timed_out: bool,
        overloaded: bool,
        error: &str,
    ) -> Option<Miss> {
        match (ok, timed_out, overloaded) {
            (true, ..) => None,
            (false, true, _) => Some(Miss::TimedOut),
            (false, false, true) => Some(Miss::Overloaded(error.to_string())),
            (false, false, false) => Some(Miss::Failed(error.to_string())),
        }
    }

    /// How replica `node` of a remote region fared in a `Replicate` call:
    /// its own ack, or the whole call's miss (no ack for it: failed).
    pub(super) fn of_region(
        acks: Result<&[cpb::ReplicaAck], &Miss>,
        node: &str,
    ) -> Result<(), Miss> {
        match acks.map_err(Clone::clone)?.iter().find(|a| a.node == node) {
            Some(a) => {
                Miss::of_remote(a.ok, a.timed_out, a.overloaded, &a.error).map_or(Ok(()), Err)
            }
            None => Err(Miss::Failed(format!("its region did not report {node}"))),
        }
    }

    /// Counts this miss for replica `idx`.
    pub(super) fn record(&self, tracker: &mut AckTracker, idx: usize) {
        match self {
            Miss::Failed(_) | Miss::Rejected(_) => tracker.record_failure(idx),
            Miss::TimedOut => tracker.record_timeout(idx),
            Miss::Overloaded(_) => tracker.record_overloaded(idx),
        }
    }

    /// The fields a remote region's report of a replica carries:
    /// (timed out, overloaded, error).
    pub(super) fn report(&self) -> (bool, bool, String) {
        (
            *self == Miss::TimedOut,
            matches!(self, Miss::Overloaded(_)),
            self.to_string(),
        )
    }
}

/// Mints one record on a local replica (in one transaction with the
/// concurrent records bound for it). The record is queued before this
/// returns — records queued one after the other are minted in that order —
/// and the returned future waits for the answer. A record refused alone
/// (idempotency conflict, invalid value) comes back `Rejected`.
pub fn mint(
    replica: &Replica,
    request: pb::MintRequest,
) -> impl Future<Output = Result<pb::MintResponse, Miss>> + Send + 'static {
    let answer = replica.batches.mint.enqueue(request);
    async move { minted(answer.await) }
}

/// [`mint`] for the records of one client batch bound for one replica:
/// queued together, in order, or refused together when its queue cannot
/// hold them all.
pub fn mint_together(
    replica: &Replica,
    requests: Vec<pb::MintRequest>,
) -> Vec<impl Future<Output = Result<pb::MintResponse, Miss>> + Send + 'static> {
    replica
        .batches
        .mint
        .enqueue_all(requests)
        .into_iter()
        .map(|answer| async move { minted(answer.await) })
        .collect()
}

/// A record's mint result as its version, or its own error.
fn minted(result: Result<pb::MintResult, tonic::Status>) -> Result<pb::MintResponse, Miss> {
    let result = result.map_err(|status| Miss::of(&status))?;
    geolog_proto::item_outcome(result.minted, result.error).map_err(Miss::of_error)
}

/// Applies versions to one local replica (batched with concurrent calls).
pub async fn apply(replica: &Replica, versions: Vec<pb::Version>) -> Result<(), Miss> {
    replica
        .batches
        .apply
        .call(versions)
        .await
        .map_err(|status| {
            tracing::debug!(replica = %replica.node, error = %status.message(), "apply failed");
            Miss::of(&status)
        })
}

/// Reports versions delivered to a remote region to the node that minted
/// them (entries as its mint or pending answer gave them); failures only
/// mean the replay worker sends them once more.
pub async fn outbox_done(replica: &Replica, entries: Vec<pb::OutboxEntry>) {
    if let Err(status) = replica.batches.outbox_done.call(entries).await {
        tracing::debug!(replica = %replica.node, error = %status.message(), "outbox cleanup failed; replay will resend");
    }
}

/// Records on `holder` (the node that minted `version`) that `target`
/// missed it; returns whether it is stored. A failure is logged:
/// anti-entropy is then the safety net.
pub async fn store_hint(holder: &Replica, target: &str, version: pb::Version) -> bool {
    store_hints(holder, target, vec![version]).await > 0
}

/// [`store_hint`] for many versions held on `holder`; returns how many
/// were stored.
pub async fn store_hints(holder: &Replica, target: &str, versions: Vec<pb::Version>) -> u32 {
    let mut client = holder.client.clone();
    let count = versions.len();
    let request = pb::StoreHintsRequest {
        target: target.to_string(),
        versions,
    };
    match client.store_hints(request).await {
        Ok(answer) => {
            let stored = answer.get_ref().stored;
            metrics::counter!("hints_stored_total").increment(u64::from(stored));
            if (stored as usize) < count {
                tracing::warn!(holder = %holder.node, target, stored, count, "hints not stored: the holder lacks the versions");
            }
            stored
        }
        Err(status) => {
            tracing::warn!(holder = %holder.node, target, error = %status.message(), "cannot store hints");
            0
        }
    }
}

/// Sends key states to a remote region (batched with concurrent calls)
/// and collects every replica's ack.
pub async fn replicate(
    remote: &crate::replicas::RemoteRegion,
    versions: Vec<pb::Version>,
) -> Result<Vec<cpb::ReplicaAck>, Miss> {
    remote
        .replicate
        .call(versions)
        .await
        .map_err(|status| Miss::of(&status))
}

/// Reads from a remote region's replicas through its coordinator: each
/// replica's answer as it reported it.
pub(super) async fn region_read(
    remote: &crate::replicas::RemoteRegion,
    request: cpb::RegionReadRequest,
) -> Result<Vec<cpb::ReplicaVersions>, Miss> {
    let mut client = remote.client.clone();
    let answers = async { collect(client.region_read(request).await?.into_inner()).await };
    answers.await.map_err(|status| Miss::of(&status))
}

/// True when the replica did not answer in time: a deadline status, or the
/// per-replica tower timeout somewhere in the error's sources.
fn is_timeout(status: &tonic::Status) -> bool {
    if status.code() == tonic::Code::DeadlineExceeded {
        return true;
    }
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        if err.is::<tower::timeout::error::Elapsed>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// A remote region's answer to a read of `wanted` of its replicas
/// (`candidates`, placement indexes), as the gathering read counts it:
/// (replica, its answer, whether it settles one of the answers in flight).
/// A replica the region reports failed does not settle (the region asks
/// another in its place); every asked-for answer that did not come is a
/// miss that settles, named after a replica not reported — or `usize::MAX`
/// when none is left to name.
pub(super) fn region_replies(
    placement: &[Placement],
    candidates: Vec<usize>,
    wanted: usize,
    answers: Result<Vec<cpb::ReplicaVersions>, Miss>,
) -> Vec<(usize, Result<Vec<pb::Version>, Miss>, bool)> {
    let mut replies = Vec::with_capacity(wanted);
    let mut unused = candidates;
    let mut reported = 0;
    let miss = match answers {
        Ok(answers) => {
            for answer in answers {
                let Some(pos) = unused
                    .iter()
                    .position(|&i| placement[i].node == answer.node)
                else {
                    continue;
                };
                let idx = unused.remove(pos);
                let result = match Miss::of_remote(
                    answer.ok,
                    answer.timed_out,
                    answer.overloaded,
                    &answer.error,
                ) {
                    None => Ok(answer.versions),
                    Some(miss) => Err(miss),
                };
                let settles = result.is_ok();
                reported += usize::from(settles);
                replies.push((idx, result, settles));
            }
            Miss::Failed("its region did not report it".into())
        }
        Err(miss) => miss,
    };
    let missing = wanted.saturating_sub(reported);
    let mut named = unused.into_iter().chain(std::iter::repeat(usize::MAX));
    for _ in 0..missing {
        let idx = named.next().unwrap_or(usize::MAX);
        replies.push((idx, Err(miss.clone()), true));
    }
    replies
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_is_classified_once_full_queues_and_refusals_apart() {
        let full =
            GeologError::new(ErrorCode::Overloaded, "the mint queue to a1 is full").to_status();
        assert_eq!(
            Miss::of(&full),
            Miss::Overloaded("the mint queue to a1 is full".into())
        );
        // A bare RESOURCE_EXHAUSTED (an HTTP/2 peer calming its client) may
        // come after the call ran: not an overload that wrote nothing.
        let bare = tonic::Status::resource_exhausted("too many resets");
        assert_eq!(Miss::of(&bare), Miss::Failed("too many resets".into()));
        // A record too large is the client's error, on any replica.
        let too_large = GeologError::new(ErrorCode::PayloadTooLarge, "record over 1 MiB");
        assert_eq!(too_large.to_status().code(), tonic::Code::ResourceExhausted);
        assert_eq!(Miss::of(&too_large.to_status()), Miss::Rejected(too_large));
        let down = GeologError::new(ErrorCode::Unavailable, "database unavailable");
        assert_eq!(
            Miss::of(&down.to_status()),
            Miss::Failed("database unavailable".into())
        );
        assert_eq!(
            Miss::of(&tonic::Status::unavailable("down")),
            Miss::Failed("down".into())
        );
        assert_eq!(
            Miss::of(&tonic::Status::deadline_exceeded("slow")),
            Miss::TimedOut
        );
        // Broken mid-call: the outcome is unknown, as after a timeout.
        assert_eq!(
            Miss::of(&tonic::Status::unknown("transport error")),
            Miss::TimedOut
        );
    }

    #[test]
    fn a_remote_regions_report_keeps_why_a_replica_missed() {
        assert_eq!(Miss::of_remote(true, false, false, ""), None);
        assert_eq!(
            Miss::of_remote(false, true, true, "x"),
            Some(Miss::TimedOut)
        );
        assert_eq!(
            Miss::of_remote(false, false, true, "full"),
            Some(Miss::Overloaded("full".into()))
        );
        assert_eq!(
            Miss::of_remote(false, false, false, "down"),
            Some(Miss::Failed("down".into()))
        );
        let acks = [
            cpb::ReplicaAck {
                node: "b1".into(),
                ok: true,
                ..Default::default()
            },
            cpb::ReplicaAck {
                node: "b2".into(),
                overloaded: true,
                error: "full".into(),
                ..Default::default()
            },
        ];
        assert_eq!(Miss::of_region(Ok(&acks), "b1"), Ok(()));
        assert_eq!(
            Miss::of_region(Ok(&acks), "b2"),
            Err(Miss::Overloaded("full".into()))
        );
        assert!(matches!(
            Miss::of_region(Ok(&acks), "b3"),
            Err(Miss::Failed(_))
        ));
        assert_eq!(
            Miss::of_region(Err(&Miss::TimedOut), "b1"),
            Err(Miss::TimedOut)
        );
        // What a region reports of a replica reads back the same.
        for miss in [
            Miss::TimedOut,
            Miss::Overloaded("full".into()),
            Miss::Failed("down".into()),
        ] {
            let (timed_out, overloaded, error) = miss.report();
            let back = Miss::of_remote(false, timed_out, overloaded, &error).unwrap();
            assert_eq!(std::mem::discriminant(&back), std::mem::discriminant(&miss));
        }
    }

    #[test]
    fn a_remote_reads_replies_settle_exactly_what_was_asked() {
        let placement: Vec<Placement> = ["a1", "b1", "b2", "b3"]
            .iter()
            .map(|node| Placement {
                node: node.to_string(),
                region: node[..1].to_string(),
            })
            .collect();
        let version = pb::Version {
            key: "k".into(),
            ..Default::default()
        };
        let answer = |node: &str, ok: bool| cpb::ReplicaVersions {
            node: node.into(),
            ok,
            error: if ok { String::new() } else { "down".into() },
            versions: if ok {
                vec![version.clone()]
            } else {
                Vec::new()
            },
            ..Default::default()
        };
        // Two asked: b2 failed (the region then asked b3, which answered);
        // an unknown node is ignored.
        let replies = region_replies(
            &placement,
            vec![1, 2, 3],
            2,
            Ok(vec![
                answer("b2", false),
                answer("b3", true),
                answer("zz", true),
            ]),
        );
        assert_eq!(
            replies,
            vec![
                (2, Err(Miss::Failed("down".into())), false),
                (3, Ok(vec![version.clone()]), true),
                (
                    1,
                    Err(Miss::Failed("its region did not report it".into())),
                    true
                ),
            ]
        );
        // The call failed: every asked-for answer is that miss, and past
        // the region's replicas they are settled without a name.
        let replies = region_replies(&placement, vec![1], 2, Err(Miss::TimedOut));
        assert_eq!(
            replies,
            vec![
                (1, Err(Miss::TimedOut), true),
                (usize::MAX, Err(Miss::TimedOut), true)
            ]
        );
    }
}
