//! # dynrobust-core
//!
//! The vocabulary every other dynrobust crate speaks: the [`DynamicModel`] protocol with its
//! [`Trace`], [`Unit`]s and [`Pass`]es; the attack and defense plugin protocols; data sets; cost and accuracy metrics; the one
//! [`Error`] type.

pub mod allocator;
pub mod atomic_file;
pub mod attack;
pub mod data;
pub mod defense;
pub mod device;
pub mod energy;
pub mod error;
pub mod formats;
pub mod metrics;
pub mod process;
pub mod protocol;
pub mod queries;
pub mod rng;
pub mod testing;

pub use error::{Error, Result};

/// The git commit dynrobust was built from (12 hex digits), or `unknown` outside a git
/// checkout; uncommitted changes are not marked. Study cells and checkpoint sidecars record
/// it beside the version.
pub const SOURCE_COMMIT: &str = env!("DYNROBUST_SOURCE_COMMIT");

/// `0.1.0 (commit 1a2b3c4d5e6f)`: the version with [`SOURCE_COMMIT`], as `dynrobust --version`
/// prints it.
pub const VERSION_LINE: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("DYNROBUST_SOURCE_COMMIT"), ")");
pub use protocol::{check_labels_fit, check_model_labels, cost_of, CutTrace, macs_from_executed, static_macs, DynamicModel, Family, Pass, Trace, Unit, UnitKind};
