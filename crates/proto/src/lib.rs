//! Protocol types and gRPC stubs generated from `proto/`, and the one limit
//! every service puts on their messages. Nothing else lives here:
//! conversions to domain types belong to the crates that own them.
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

/// Largest gRPC message any geolog service sends or accepts, on every hop
/// (gateway, coordinators, storage nodes, anti-entropy). Answers that could
/// outgrow it are paged (a quarter of it per page: `ReadMany`,
/// `BucketVersions`) and calls that carry versions are split by bytes.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

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
