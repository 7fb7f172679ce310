//! Consistency levels and the quorum math of DESIGN §5, plus [`AckTracker`],
//! the one place that counts acknowledgements per region and produces the
//! descriptive `unavailable` / `timeout` errors.
//!
//! A level turns into a [`Requirement`]: a number of replicas from anywhere
//! plus a minimum per region. Everything else (fail-fast check, "is it met",
//! "can it still be met") is derived from that one shape.

use crate::error::{ErrorCode, GeologError, QuorumDetails, RegionDetails};
use crate::ring::Placement;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// `q(x) = floor(x/2) + 1`.
pub fn quorum(x: usize) -> usize {
    x / 2 + 1
}

/// What the client asks for, per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConsistencyLevel {
    Any,
    One,
    Two,
    Three,
    Quorum,
    All,
    LocalOne,
    LocalQuorum,
    EachQuorum,
}

/// Whether a level is used for a write or a read (`ANY` is write-only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Write,
    Read,
}

impl ConsistencyLevel {
    pub const ALL_LEVELS: [ConsistencyLevel; 9] = [
        ConsistencyLevel::Any,
        ConsistencyLevel::One,
        ConsistencyLevel::Two,
        ConsistencyLevel::Three,
        ConsistencyLevel::Quorum,
        ConsistencyLevel::All,
        ConsistencyLevel::LocalOne,
        ConsistencyLevel::LocalQuorum,
        ConsistencyLevel::EachQuorum,
    ];

    /// Canonical upper-case name, as accepted in `?consistency=`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConsistencyLevel::Any => "ANY",
            ConsistencyLevel::One => "ONE",
            ConsistencyLevel::Two => "TWO",
            ConsistencyLevel::Three => "THREE",
            ConsistencyLevel::Quorum => "QUORUM",
            ConsistencyLevel::All => "ALL",
            ConsistencyLevel::LocalOne => "LOCAL_ONE",
            ConsistencyLevel::LocalQuorum => "LOCAL_QUORUM",
            ConsistencyLevel::EachQuorum => "EACH_QUORUM",
        }
    }

    /// The replicas this level needs, given the replica count of every region
    /// (`regions`: name and `RF_r`) and the coordinator's own region.
    pub fn requirement(
        self,
        op: Operation,
        regions: &[(&str, usize)],
        local_region: &str,
    ) -> Result<Requirement, GeologError> {
        let n: usize = regions.iter().map(|(_, rf)| rf).sum();
        let local_rf = regions
            .iter()
            .find(|(name, _)| *name == local_region)
            .map(|(_, rf)| *rf)
            .unwrap_or(0);
        let anywhere = |total| Requirement {
            total,
            per_region: Vec::new(),
        };
        let local = |count| Requirement {
            total: count,
            per_region: vec![(local_region.to_string(), count)],
        };
        Ok(match self {
            ConsistencyLevel::Any if op == Operation::Read => {
                return Err(GeologError::new(
                    ErrorCode::InvalidConsistency,
                    "consistency ANY is only allowed for writes",
                ));
            }
            ConsistencyLevel::Any | ConsistencyLevel::One => anywhere(1),
            ConsistencyLevel::Two => anywhere(2),
            ConsistencyLevel::Three => anywhere(3),
            ConsistencyLevel::Quorum => anywhere(quorum(n)),
            ConsistencyLevel::All => anywhere(n),
            ConsistencyLevel::LocalOne => local(1),
            ConsistencyLevel::LocalQuorum => local(quorum(local_rf)),
            ConsistencyLevel::EachQuorum => {
                let per_region: Vec<(String, usize)> = regions
                    .iter()
                    .map(|(name, rf)| (name.to_string(), quorum(*rf)))
                    .collect();
                Requirement {
                    total: per_region.iter().map(|(_, c)| c).sum(),
                    per_region,
                }
            }
        })
    }
}

impl fmt::Display for ConsistencyLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ConsistencyLevel {
    type Err = GeologError;

    /// Case-insensitive; `-` is accepted for `_` (`local-quorum`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_uppercase().replace('-', "_");
        ConsistencyLevel::ALL_LEVELS
            .into_iter()
            .find(|level| level.as_str() == wanted)
            .ok_or_else(|| {
                let names: Vec<&str> = ConsistencyLevel::ALL_LEVELS
                    .iter()
                    .map(|l| l.as_str())
                    .collect();
                GeologError::new(
                    ErrorCode::InvalidConsistency,
                    format!(
                        "unknown consistency level {s:?}; expected one of {}",
                        names.join(", ")
                    ),
                )
            })
    }
}

/// How many acknowledgements a request needs: `total` from anywhere, and at
/// least the given count from each listed region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    pub total: usize,
    pub per_region: Vec<(String, usize)>,
}

impl Requirement {
    /// True when `ok` answers (one region name per answer) satisfy this.
    fn met_by<'a>(&self, ok: impl Iterator<Item = &'a str> + Clone) -> bool {
        ok.clone().count() >= self.total
            && self
                .per_region
                .iter()
                .all(|(region, need)| ok.clone().filter(|r| r == region).count() >= *need)
    }

    /// Fails fast, before anything is sent, when the replicas believed alive
    /// (one region name per alive replica) cannot meet the requirement.
    pub fn check_alive<'a>(
        &self,
        alive: impl Iterator<Item = &'a str> + Clone,
    ) -> Result<(), GeologError> {
        if self.met_by(alive.clone()) {
            return Ok(());
        }
        let alive_total = alive.clone().count() as u32;
        let regions: Vec<RegionDetails> = self
            .per_region
            .iter()
            .map(|(region, need)| RegionDetails {
                region: region.clone(),
                required: *need as u32,
                alive: Some(alive.clone().filter(|r| r == region).count() as u32),
                received: None,
            })
            .collect();
        let mut message = format!(
            "not enough replicas alive: {} required, {} alive",
            self.total, alive_total
        );
        for r in &regions {
            message.push_str(&format!(
                "; region {}: {} required, {} alive",
                r.region,
                r.required,
                r.alive.unwrap_or(0)
            ));
        }
        Err(
            GeologError::new(ErrorCode::Unavailable, message).with_quorum(QuorumDetails {
                required: self.total as u32,
                alive: Some(alive_total),
                received: None,
                regions,
            }),
        )
    }
}

/// The state of one replica within a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Pending,
    Ok,
    Failed,
    TimedOut,
    /// Refused at once: its queue was full.
    Overloaded,
}

/// Counts answers of the replicas contacted for one request, per region, and
/// tells when the requirement is met or can no longer be met.
/// The requirement and the placement are shared, not copied: a batch's
/// records each have a tracker.
#[derive(Debug, Clone)]
pub struct AckTracker {
    requirement: Arc<Requirement>,
    placement: Arc<Vec<Placement>>,
    answers: Vec<Answer>,
}

impl AckTracker {
    /// Replica `i` is `placement[i]`; all start pending.
    pub fn new(requirement: Arc<Requirement>, placement: Arc<Vec<Placement>>) -> Self {
        let answers = vec![Answer::Pending; placement.len()];
        AckTracker {
            requirement,
            placement,
            answers,
        }
    }

    pub fn record_ok(&mut self, replica: usize) {
        self.answers[replica] = Answer::Ok;
    }

    pub fn record_failure(&mut self, replica: usize) {
        self.answers[replica] = Answer::Failed;
    }

    /// The replica's queue was full: it will not count, and a request that
    /// cannot be met without it ends as `overloaded` (retry later).
    pub fn record_overloaded(&mut self, replica: usize) {
        self.answers[replica] = Answer::Overloaded;
    }

    /// The replica's own deadline passed: it will not count, and the request
    /// ends as a timeout rather than as unavailable.
    pub fn record_timeout(&mut self, replica: usize) {
        self.answers[replica] = Answer::TimedOut;
    }

    fn regions_where(
        &self,
        pred: impl Fn(Answer) -> bool + Clone,
    ) -> impl Iterator<Item = &str> + Clone {
        self.placement
            .iter()
            .zip(self.answers.iter())
            .filter(move |(_, a)| pred(**a))
            .map(|(p, _)| p.region.as_str())
    }

    /// True once replica `replica` answered, either way.
    pub fn answered(&self, replica: usize) -> bool {
        self.answers[replica] != Answer::Pending
    }

    /// Regions whose own minimum is not met yet by acknowledgements.
    pub fn regions_short(&self) -> Vec<&str> {
        self.requirement
            .per_region
            .iter()
            .filter(|(region, need)| {
                self.regions_where(|a| a == Answer::Ok)
                    .filter(|r| r == region)
                    .count()
                    < *need
            })
            .map(|(region, _)| region.as_str())
            .collect()
    }

    /// The replicas that acknowledged, by index.
    pub fn acked(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.answers.len()).filter(|&i| self.answers[i] == Answer::Ok)
    }

    /// Acknowledgements received so far.
    pub fn received(&self) -> usize {
        self.answers.iter().filter(|a| **a == Answer::Ok).count()
    }

    pub fn is_met(&self) -> bool {
        self.requirement
            .met_by(self.regions_where(|a| a == Answer::Ok))
    }

    /// True when even if every pending replica answered OK the requirement
    /// would not be met.
    pub fn is_impossible(&self) -> bool {
        !self
            .requirement
            .met_by(self.regions_where(|a| matches!(a, Answer::Ok | Answer::Pending)))
    }

    pub fn requirement(&self) -> &Requirement {
        &self.requirement
    }

    /// Required and received, in total and for every region that has replicas
    /// in this request.
    pub fn details(&self) -> QuorumDetails {
        let mut names: Vec<&str> = self.placement.iter().map(|p| p.region.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let regions = names
            .into_iter()
            .map(|region| RegionDetails {
                region: region.to_string(),
                required: self
                    .requirement
                    .per_region
                    .iter()
                    .find(|(r, _)| r == region)
                    .map(|(_, c)| *c as u32)
                    .unwrap_or(0),
                alive: None,
                received: Some(
                    self.regions_where(|a| a == Answer::Ok)
                        .filter(|r| *r == region)
                        .count() as u32,
                ),
            })
            .collect();
        QuorumDetails {
            required: self.requirement.total as u32,
            alive: None,
            received: Some(self.received() as u32),
            regions,
        }
    }

    /// The error for a request that ended without meeting its requirement:
    /// `unavailable` when replicas failed (errors, refused connections) so
    /// the level became impossible; `timeout` when the deadline passed or a
    /// replica timed out. `what` is "write" or "read".
    pub fn failure(&self, what: &str) -> GeologError {
        let details = self.details();
        let landed = if what == "write" && details.received.unwrap_or(0) > 0 {
            " The write may have landed on some replicas and will be repaired."
        } else if what == "write" {
            " The write may have landed on replicas that did not answer in time."
        } else {
            ""
        };
        let timed_out = self.answers.contains(&Answer::TimedOut);
        // Overloaded only when the refused replicas are what stands between
        // the request and its level (a retry could succeed); replicas that
        // failed outright make it unavailable whatever else was refused.
        let overloaded =
            self.answers.contains(&Answer::Overloaded)
                && self.requirement.met_by(self.regions_where(|a| {
                    matches!(a, Answer::Ok | Answer::Pending | Answer::Overloaded)
                }));
        let (code, reason) = if self.is_impossible() && !timed_out && overloaded {
            (
                ErrorCode::Overloaded,
                "not met: replicas are overloaded (their queues were full); retry later",
            )
        } else if self.is_impossible() && !timed_out {
            (ErrorCode::Unavailable, "replicas failed")
        } else {
            (ErrorCode::Timeout, "replicas did not answer in time")
        };
        let short: String = details
            .regions
            .iter()
            .filter(|r| r.received.unwrap_or(0) < r.required)
            .map(|r| {
                format!(
                    "; region {}: {} required, {} received",
                    r.region,
                    r.required,
                    r.received.unwrap_or(0)
                )
            })
            .collect();
        GeologError::new(
            code,
            format!(
                "{what} {reason}: {} acknowledgements required, {} received{short}.{landed}",
                details.required,
                details.received.unwrap_or(0)
            ),
        )
        .with_quorum(details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn regions3() -> Vec<(&'static str, usize)> {
        vec![("a", 3), ("b", 3), ("c", 3)]
    }

    #[test]
    fn levels_parse_case_insensitively() {
        assert_eq!(
            "quorum".parse::<ConsistencyLevel>().unwrap(),
            ConsistencyLevel::Quorum
        );
        assert_eq!(
            "Local_Quorum".parse::<ConsistencyLevel>().unwrap(),
            ConsistencyLevel::LocalQuorum
        );
        assert_eq!(
            "each-quorum".parse::<ConsistencyLevel>().unwrap(),
            ConsistencyLevel::EachQuorum
        );
        let err = "MOST".parse::<ConsistencyLevel>().unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidConsistency);
    }

    #[test]
    fn single_region_five_replicas() {
        let regions = [("a", 5)];
        let req = |l: ConsistencyLevel| {
            l.requirement(Operation::Write, &regions, "a")
                .unwrap()
                .total
        };
        assert_eq!(req(ConsistencyLevel::One), 1);
        assert_eq!(req(ConsistencyLevel::Quorum), 3);
        assert_eq!(req(ConsistencyLevel::All), 5);
        assert_eq!(req(ConsistencyLevel::LocalQuorum), 3);
    }

    #[test]
    fn any_is_write_only() {
        let err = ConsistencyLevel::Any
            .requirement(Operation::Read, &regions3(), "a")
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidConsistency);
    }

    #[test]
    fn each_quorum_needs_every_region() {
        let req = ConsistencyLevel::EachQuorum
            .requirement(Operation::Write, &regions3(), "a")
            .unwrap();
        assert_eq!(req.total, 6);
        let alive = ["a", "a", "b", "b", "c", "c", "c"];
        assert!(req.check_alive(alive.iter().copied()).is_ok());
        let alive = ["a", "a", "a", "b", "b", "b", "c"];
        let err = req.check_alive(alive.iter().copied()).unwrap_err();
        assert_eq!(err.code, ErrorCode::Unavailable);
        assert!(
            err.message.contains("region c: 2 required, 1 alive"),
            "{}",
            err.message
        );
    }

    /// Replicas in these regions (one node each).
    fn placed(regions: &[String]) -> Arc<Vec<Placement>> {
        Arc::new(
            regions
                .iter()
                .enumerate()
                .map(|(i, region)| Placement {
                    region: region.clone(),
                    node: format!("{region}{i}"),
                })
                .collect(),
        )
    }

    #[test]
    fn tracker_reports_timeout_vs_unavailable() {
        let req = ConsistencyLevel::All
            .requirement(Operation::Write, &[("a", 3)], "a")
            .unwrap();
        let mut t = AckTracker::new(Arc::new(req), placed(&["a".into(), "a".into(), "a".into()]));
        t.record_ok(0);
        assert!(!t.is_met());
        assert_eq!(t.failure("write").code, ErrorCode::Timeout);
        t.record_failure(1);
        assert!(t.is_impossible());
        let err = t.failure("write");
        assert_eq!(err.code, ErrorCode::Unavailable);
        assert_eq!(err.quorum.unwrap().received, Some(1));
        // A replica that timed out makes it a timeout, even if also impossible.
        t.record_timeout(2);
        assert_eq!(t.failure("write").code, ErrorCode::Timeout);
    }

    fn level() -> impl Strategy<Value = ConsistencyLevel> {
        proptest::sample::select(ConsistencyLevel::ALL_LEVELS.to_vec())
    }

    proptest! {
        /// With every replica alive and acknowledging, every level that needs
        /// no more replicas than exist is met; and a level is met exactly
        /// when the alive check would pass on the same set.
        #[test]
        fn met_iff_alive_check_passes(
            rfs in proptest::collection::vec(1usize..6, 1..4),
            level in level(),
            acks in proptest::collection::vec(any::<bool>(), 0..20),
        ) {
            let names = ["a", "b", "c"];
            let regions: Vec<(&str, usize)> = rfs.iter().enumerate().map(|(i, rf)| (names[i], *rf)).collect();
            let Ok(req) = level.requirement(Operation::Write, &regions, "a") else { return Ok(()); };
            let replica_regions: Vec<String> = regions.iter()
                .flat_map(|(name, rf)| std::iter::repeat_n(name.to_string(), *rf)).collect();
            let mut t = AckTracker::new(Arc::new(req.clone()), placed(&replica_regions));
            let mut ok_regions = Vec::new();
            for (i, ack) in acks.iter().enumerate().take(replica_regions.len()) {
                if *ack { t.record_ok(i); ok_regions.push(replica_regions[i].as_str()); } else { t.record_failure(i); }
            }
            prop_assert_eq!(t.is_met(), req.check_alive(ok_regions.iter().copied()).is_ok());
            // All acknowledged, nothing failed: met iff the level fits the topology.
            let mut all = AckTracker::new(Arc::new(req.clone()), placed(&replica_regions));
            for i in 0..replica_regions.len() { all.record_ok(i); }
            prop_assert_eq!(all.is_met(), req.total <= replica_regions.len());
            // met and impossible are never both true.
            prop_assert!(!(t.is_met() && t.is_impossible()));
        }

        /// Quorums of the same replica set always intersect.
        #[test]
        fn quorums_intersect(n in 1usize..50) {
            prop_assert!(2 * quorum(n) > n);
        }
    }
}
