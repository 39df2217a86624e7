//! Shared helpers of the attacks crate's integration tests: committed checkpoints,
//! Fashion-MNIST test images, random images, and the ε-ball / box checks every attack keeps.
#![allow(dead_code, unused_imports)]

use dynrobust_models::Net;
use tch::{Device, Kind, Tensor};

pub use dynrobust_core::testing::{test_images, torch_lock};

/// A committed checkpoint by name (`static`, `sdn`, `gated`, `skipnet`).
pub fn committed(name: &str) -> Net {
    dynrobust_models::checkpoint::load_committed(name)
}

/// `[batch,1,28,28]` uniform images in [0,1] and `[batch]` labels in 0..10, from `seed`.
pub fn random_batch(seed: i64, batch: i64) -> (Tensor, Tensor) {
    tch::manual_seed(seed);
    let x = Tensor::rand([batch, 1, 28, 28], (Kind::Float, Device::Cpu));
    let y = Tensor::randint(10, [batch], (Kind::Int64, Device::Cpu));
    (x, y)
}

/// Largest |a − b| as f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().to_kind(Kind::Double).double_value(&[])
}

pub use dynrobust_attacks::testing::check_contract;
