//! The experiment machinery of dynrobust: study files (TOML) expanded into a grid of cells
//! ([`study`]), a crash-safe result store with one file per finished cell ([`store`]), a generic
//! parallel runner that skips finished cells and survives failing ones ([`runner`]), merging of
//! sharded runs and Slurm job-array scripts ([`slurm`]), and the report: markdown tables and SVG
//! plots ([`report`]).
//!
//! This crate knows nothing about models, attacks or defenses: the caller supplies the plugin
//! names ([`study::Registry`]) and an [`runner::Executor`] that runs one cell.

pub mod craft_cache;
pub mod execute;
mod findings;
mod grid;
mod location;
mod plots;
pub mod provenance;
pub mod report;
pub mod runner;
pub mod slurm;
pub mod store;
pub mod study;
mod worst_case;

pub use runner::{run_cells, stale_cell, stale_cells, CellFailure, CellOutput, Executor, RunSummary, StaleCell};
pub use report::{write_partial_report, write_report, ReportFiles};
pub use slurm::{merge, slurm_script};
pub use store::{Store, StoredCell};
pub use study::{parse_shard, shard, AttackRef, Cell, CellConfig, DefenseMode, DefenseRef, ModelRef, Registry, Study};
