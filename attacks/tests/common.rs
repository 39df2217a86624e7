//! Shared helpers of the attacks crate's integration tests: committed checkpoints,
//! Fashion-MNIST test images, random images, and the ε-ball / box checks every attack keeps.
#![allow(dead_code)]

use std::sync::{Mutex, MutexGuard};

use dynrobust_core::attack::{per_sample_norm, Attack, Norm};
use dynrobust_core::data::{DataSource, Dataset, Split};
use dynrobust_models::checkpoint;
use dynrobust_models::Net;
use tch::{Device, Kind, Tensor};

/// libtorch's RNG is global: attacks reseed it (`tch::manual_seed`) and then draw from it, so
/// two tests drawing at the same time would interleave. Every test that runs an attack holds
/// this lock (it also keeps two networks from fighting over the CPUs).
static TORCH: Mutex<()> = Mutex::new(());

/// Serialises the tests of one binary that use libtorch, and runs libtorch on one intra-op
/// thread: these networks are small, and on a busy machine (two cores, a benchmark running
/// beside the tests) OpenMP's spinning threads made a batch-6 forward+backward pass of the
/// static model take 1.2 s instead of 13 ms.
pub fn torch_lock() -> MutexGuard<'static, ()> {
    let guard = TORCH.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if tch::get_num_threads() != 1 {
        tch::set_num_threads(1);
    }
    guard
}

/// The first `n` Fashion-MNIST test images (`make test` installs the data set).
pub fn test_images(n: i64) -> Dataset {
    DataSource::FashionMnist
        .load(Split::Test, None)
        .unwrap_or_else(|e| panic!("Fashion-MNIST is needed by this test: {e}"))
        .take(n)
}

/// A committed checkpoint by name (`static`, `sdn`, `gated`, `skipnet`).
pub fn committed(name: &str) -> Net {
    let dir = checkpoint::committed_dir(name);
    checkpoint::load(&dir, Device::Cpu).unwrap_or_else(|e| panic!("committed checkpoint `{name}`: {e}")).0
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

/// The contract of `Attack::perturb`: same shape and kind, finite, in [0,1], inside the
/// attack's ε-ball (L∞: max |δ| ≤ ε + 1e-6; L2: per-sample ‖δ‖₂ ≤ ε + 1e-4).
/// Returns a description of the first broken promise.
pub fn check_contract(attack: &dyn Attack, x: &Tensor, x_adv: &Tensor) -> Result<(), String> {
    if x_adv.size() != x.size() {
        return Err(format!("shape {:?}, expected {:?}", x_adv.size(), x.size()));
    }
    if x_adv.kind() != x.kind() {
        return Err(format!("kind {:?}, expected {:?}", x_adv.kind(), x.kind()));
    }
    let non_finite = x_adv.isfinite().logical_not().sum(Kind::Int64).int64_value(&[]);
    if non_finite > 0 {
        return Err(format!("{non_finite} non-finite values"));
    }
    let (lo, hi) = (x_adv.min().double_value(&[]), x_adv.max().double_value(&[]));
    if lo < 0.0 || hi > 1.0 {
        return Err(format!("values in [{lo}, {hi}], outside [0,1]"));
    }
    if let Some((eps, norm)) = attack.budget() {
        let delta = (x_adv - x).to_kind(Kind::Double);
        match norm {
            Norm::Linf => {
                let m = delta.abs().max().double_value(&[]);
                if m > eps + 1e-6 {
                    return Err(format!("L∞ of δ is {m}, budget ε = {eps}"));
                }
            }
            Norm::L2 => {
                let m = per_sample_norm(&delta, 2.0).max().double_value(&[]);
                if m > eps + 1e-4 {
                    return Err(format!("per-sample L2 of δ reaches {m}, budget ε = {eps}"));
                }
            }
        }
    }
    Ok(())
}
