//! Pure domain logic shared by every geolog service: the error vocabulary,
//! consistency levels and quorum math, ring placement, hybrid logical clocks,
//! key validation and the shared JSON text of values. Nothing here performs I/O.

pub mod causal;
pub mod consistency;
pub mod error;
pub mod hlc;
pub mod json;
pub mod key;
pub mod merkle;
pub mod ring;

pub use consistency::{AckTracker, ConsistencyLevel, Requirement};
pub use error::{ErrorCode, GeologError};
pub use hlc::{Hlc, HlcClock};
pub use json::JsonText;
pub use key::Key;
pub use ring::Ring;
