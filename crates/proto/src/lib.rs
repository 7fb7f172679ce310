//! Protocol types and gRPC stubs generated from `proto/`. Nothing else lives
//! here: conversions to domain types belong to the crates that own them.
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
