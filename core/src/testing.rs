//! Helpers for the workspace's tests: the libtorch lock and test images.
#![doc(hidden)]

use std::sync::{Mutex, MutexGuard};

use crate::data::{DataSource, Dataset, Split};

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
    first_images(Split::Test, n)
}

/// The first `n` Fashion-MNIST training images (what an attack that fits on training data,
/// DeepSloth's universal perturbation, is handed in tests).
pub fn train_images(n: i64) -> Dataset {
    first_images(Split::Train, n)
}

fn first_images(split: Split, n: i64) -> Dataset {
    DataSource::FashionMnist
        .load(split, None)
        .unwrap_or_else(|e| panic!("Fashion-MNIST is needed by this test: {e}"))
        .take(n)
}
