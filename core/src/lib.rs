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
pub mod settings_doc;
pub mod testing;

pub use error::{Error, Result};

/// The git commit the library crates were built from (12 hex digits), or `unknown` outside a
/// git checkout; uncommitted changes are not marked here. What results record is
/// [`build_source`], which the `dynrobust` binary sets with the mark.
pub const SOURCE_COMMIT: &str = env!("DYNROBUST_SOURCE_COMMIT");

/// The tch version the build used (from `Cargo.lock`), recorded with every study cell.
pub const TCH_VERSION: &str = env!("DYNROBUST_TCH_VERSION");

/// The version of the libtorch the build linked (`2.13.0+cpu`, or the PyTorch wheel's
/// `2.13.0+cu130`), read from the `LIBTORCH` directory at build time; recorded with every
/// study cell.
pub const LIBTORCH_VERSION: &str = env!("DYNROBUST_LIBTORCH_VERSION");

static BUILD_SOURCE: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// The source the running program was built from, as study cells, checkpoint sidecars and the
/// craft cache record it: the binary's [`set_build_source`] — its commit, with
/// `+dirty.<digest>` when it was built from uncommitted changes — else [`SOURCE_COMMIT`] (a
/// library linked into something else, or its tests).
pub fn build_source() -> &'static str {
    BUILD_SOURCE.get().copied().unwrap_or(SOURCE_COMMIT)
}

/// Sets what [`build_source`] returns, once, before any result is written (the binary's
/// `main` does, with the commit and dirty mark its build script computed); later calls are
/// ignored.
pub fn set_build_source(source: &'static str) {
    let _ = BUILD_SOURCE.set(source);
}

pub use protocol::{check_labels_fit, check_model_labels, cost_of, CutTrace, macs_from_executed, static_macs, DynamicModel, Family, Pass, Trace, Unit, UnitKind};
