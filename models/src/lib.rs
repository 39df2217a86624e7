//! # dynrobust-models
//!
//! The model families dynrobust evaluates, all on one ResNet-14n backbone (stem 1→8; stages
//! 8/16/32 of two BasicBlocks; 5.074 M MACs at 28×28×1):
//!
//! - `static` — every block, final head;
//! - `sdn` — Shallow-Deep Network (Kaya, Hong, Dumitraş, ICML 2019): the static weights frozen
//!   plus an internal classifier after every block, exit at the first IC with max-softmax ≥ q;
//! - `gated` — ConvNet-AIG (Veit & Belongie, ECCV 2018): a gate per block from its input;
//! - `skipnet` — SkipNet (Wang, Yu, Dou, Darrell, Gonzalez, ECCV 2018): a recurrent (LSTM)
//!   gate decides whether the next block runs.
//!
//! Each is a [`Net`] implementing [`dynrobust_core::DynamicModel`]; `set_twin(true)` gives
//! its static twin (gates forced open / no early exit). The same families exist for 3×32×32
//! inputs on a ResNet-20 layout ([`ModelConfig::resnet20`]).
//!
//! A user's own PyTorch model, scripted with `torch.jit.script`, is a
//! [`torchscript::ScriptModel`]; [`AnyModel`] holds either kind.

pub mod any;
pub mod calibrate;
pub mod checkpoint;
pub mod config;
pub mod layers;
pub mod net;
pub mod timing;
pub mod torchscript;
pub mod train;

pub use any::{AnyModel, ModelSource};
pub use config::{Mechanism, ModelConfig};
pub use net::Net;
