//! Protocol types and gRPC stubs generated from `proto/`, the one limit
//! every service puts on their messages, and the conversions between the
//! wire's enums and geolog-core's types (so no service writes its own).
//!
//! The module tree mirrors the proto package names because generated code
//! refers to types of other packages by relative paths.

#[allow(clippy::all, missing_docs)]
mod generated {
    pub mod geolog {
        pub mod storage {
            pub mod v1 {
                tonic::include_proto!("geolog.storage.v1");
            }
        }
        pub mod coordinator {
            pub mod v1 {
                tonic::include_proto!("geolog.coordinator.v1");
            }
        }
    }
}

/// Storage node API (`proto/storage.proto`).
pub use generated::geolog::storage::v1 as storage;

/// Coordinator API (`proto/coordinator.proto`).
pub use generated::geolog::coordinator::v1 as coordinator;

/// One item of a batch answer (a minted record, a written record, a read)
/// as a result: its answer, or the error it carries instead. An item with
/// neither is a peer's bug, reported as an internal error.
pub fn item_outcome<T>(
    answer: Option<T>,
    error: Option<geolog_core::error::wire::Error>,
) -> Result<T, geolog_core::GeologError> {
    match (answer, error) {
        (_, Some(error)) => Err(geolog_core::GeologError::from_wire(error)),
        (Some(answer), None) => Ok(answer),
        (None, None) => Err(geolog_core::GeologError::internal(
            "a batch answer's item carried neither its answer nor an error",
        )),
    }
}

/// Largest gRPC message any geolog service sends or accepts, on every hop
/// (gateway, coordinators, storage nodes, anti-entropy). Answers that could
/// outgrow it are paged (a quarter of it per page: `ReadMany`,
/// `BucketVersions`) and calls that carry versions are split by bytes.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Bytes of versions (value + 64 each) in one page of a key's history from
/// one storage node, past its first version: a quarter of the message
/// limit, so that a coordinator's merge of several replicas' pages fits.
pub const HISTORY_PAGE_BYTES: usize = MAX_MESSAGE_BYTES / 4;

/// Keys per `ReadMany` call to a storage node, at most.
pub const MAX_READ_MANY: usize = 10_000;

impl storage::VersionPosition {
    /// Where `version` stands in a `BucketVersions` answer (the `after` of
    /// the next page when it was the last of its page).
    pub fn of(version: &storage::Version) -> Self {
        let dot = version.dot.as_ref();
        storage::VersionPosition {
            key: version.key.clone(),
            hlc: version.timestamp.as_ref().map_or(0, |t| t.packed),
            node: dot.map(|d| d.node.clone()).unwrap_or_default(),
            seq: dot.map_or(0, |d| d.seq),
        }
    }
}

impl From<geolog_core::ConsistencyLevel> for coordinator::Consistency {
    fn from(level: geolog_core::ConsistencyLevel) -> Self {
        use coordinator::Consistency as C;
        use geolog_core::ConsistencyLevel as L;
        match level {
            L::Any => C::Any,
            L::One => C::One,
            L::Two => C::Two,
            L::Three => C::Three,
            L::Quorum => C::Quorum,
            L::All => C::All,
            L::LocalOne => C::LocalOne,
            L::LocalQuorum => C::LocalQuorum,
            L::EachQuorum => C::EachQuorum,
        }
    }
}

impl coordinator::Consistency {
    /// The level a request asked for: `Ok(None)` when unset (the
    /// default applies); an error for a number no level has.
    pub fn requested(
        wire: i32,
    ) -> Result<Option<geolog_core::ConsistencyLevel>, geolog_core::GeologError> {
        use coordinator::Consistency as C;
        use geolog_core::ConsistencyLevel as L;
        let unknown = || {
            geolog_core::GeologError::new(
                geolog_core::ErrorCode::InvalidConsistency,
                format!("unknown consistency level number {wire}"),
            )
        };
        Ok(Some(match C::try_from(wire).map_err(|_| unknown())? {
            C::Unset => return Ok(None),
            C::Any => L::Any,
            C::One => L::One,
            C::Two => L::Two,
            C::Three => L::Three,
            C::Quorum => L::Quorum,
            C::All => L::All,
            C::LocalOne => L::LocalOne,
            C::LocalQuorum => L::LocalQuorum,
            C::EachQuorum => L::EachQuorum,
        }))
    }
}

/// A version vector on the wire: one `Dot` per node.
pub fn dots(vector: geolog_core::causal::VersionVector) -> Vec<storage::Dot> {
    dots_of(&vector)
}

/// [`dots`] of a borrowed vector.
pub fn dots_of(vector: &geolog_core::causal::VersionVector) -> Vec<storage::Dot> {
    vector
        .iter()
        .map(|(node, seq)| storage::Dot {
            node: node.to_string(),
            seq,
        })
        .collect()
}

/// A version vector from the wire (a node listed twice: the last entry
/// counts, as for the map the field once was).
pub fn vector(dots: Vec<storage::Dot>) -> geolog_core::causal::VersionVector {
    vector_of(&dots)
}

/// [`vector`] of borrowed dots.
pub fn vector_of(dots: &[storage::Dot]) -> geolog_core::causal::VersionVector {
    dots.iter().map(|d| (d.node.as_str(), d.seq)).collect()
}

/// A level on the wire (for a field of type `Consistency`).
pub fn consistency(level: geolog_core::ConsistencyLevel) -> i32 {
    coordinator::Consistency::from(level) as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use geolog_core::ConsistencyLevel as L;
    use geolog_core::{ErrorCode, GeologError};

    #[test]
    fn every_level_crosses_the_wire_and_back() {
        let levels = [
            L::Any,
            L::One,
            L::Two,
            L::Three,
            L::Quorum,
            L::All,
            L::LocalOne,
            L::LocalQuorum,
            L::EachQuorum,
        ];
        for level in levels {
            assert_eq!(
                coordinator::Consistency::requested(consistency(level)),
                Ok(Some(level))
            );
        }
        assert_eq!(coordinator::Consistency::requested(0), Ok(None));
        assert_eq!(
            coordinator::Consistency::requested(42).unwrap_err().code,
            geolog_core::ErrorCode::InvalidConsistency
        );
    }

    #[test]
    fn a_version_vector_crosses_the_wire_and_back() {
        let v: geolog_core::causal::VersionVector =
            [("a1", 3), ("b2", 1 << 40)].into_iter().collect();
        assert_eq!(vector(dots(v.clone())), v);
        assert_eq!(vector_of(&dots_of(&v)), v);
        let twice = [
            storage::Dot {
                node: "a1".into(),
                seq: 1,
            },
            storage::Dot {
                node: "a1".into(),
                seq: 7,
            },
        ];
        assert_eq!(vector_of(&twice).get("a1"), 7, "the last entry counts");
    }

    #[test]
    fn a_batch_item_is_its_answer_or_its_error_and_never_silently_empty() {
        assert_eq!(item_outcome(Some(7), None), Ok(7));
        let refused = GeologError::new(ErrorCode::Overloaded, "queue full");
        assert_eq!(
            item_outcome(Some(7), Some(refused.to_wire())),
            Err(refused.clone()),
            "an error wins over an answer"
        );
        assert_eq!(
            item_outcome::<u8>(None, Some(refused.to_wire())),
            Err(refused)
        );
        assert_eq!(
            item_outcome::<u8>(None, None).unwrap_err().code,
            ErrorCode::Internal
        );
    }
}
