//! # dynrobust-defenses
//!
//! Defenses for dynamic networks, in the three kinds of [`dynrobust_core::defense`]:
//! - input transforms ([`transforms`], [`denoiser`], chained: [`chain`]) wrapped around a model by
//!   [`Defended`] — itself a `DynamicModel`, so attacks are adaptive by default (exact, BPDA or
//!   EOT gradients);
//! - training-time defenses ([`training`]): PGD-AT, DeepSloth-AT, slowdown AT, gate
//!   consistency, cost cap;
//! - runtime guards ([`guards`]): a compute budget cap; detectors: a cost monitor and feature
//!   squeezing ([`squeeze`]).
//!
//! [`registry`] builds them by name from JSON params; [`sanity`] flags suspicious results.
//!
//! ```no_run
//! use dynrobust_defenses::{registry, Defended};
//! use dynrobust_models::checkpoint;
//! # fn main() -> dynrobust_core::Result<()> {
//! let (net, _) = checkpoint::load(&checkpoint::resolve("sdn")?, tch::Device::Cpu)?;
//! let transform = registry::build_transform("bitdepth", &serde_json::json!({ "bits": 4 }))?;
//! let defended = Defended::new(net, transform);
//! # let _ = defended; Ok(()) }
//! ```

pub mod chain;
pub mod defended;
pub mod denoiser;
pub mod evaluate;
pub mod guards;
pub mod registry;
pub mod sanity;
pub mod squeeze;
pub mod training;
pub mod transforms;

pub use defended::Defended;
