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
pub mod protocol;
pub mod rng;
pub mod testing;

pub use error::{Error, Result};
pub use protocol::{cost_of, CutTrace, macs_from_executed, static_macs, DynamicModel, Family, Pass, Trace, Unit, UnitKind};
