//! Shared helpers of the models crate's integration tests.
#![allow(dead_code)]

use dynrobust_core::data::{DataSource, Dataset, Split};
use dynrobust_models::checkpoint;
use dynrobust_models::Net;
use tch::Device;

/// The first `n` Fashion-MNIST test images (`make test` installs the data set).
pub fn test_images(n: i64) -> Dataset {
    DataSource::FashionMnist
        .load(Split::Test, None)
        .unwrap_or_else(|e| panic!("Fashion-MNIST is needed by this test: {e}"))
        .take(n)
}

/// A committed checkpoint by name.
pub fn committed(name: &str) -> Net {
    let dir = checkpoint::committed_dir(name);
    checkpoint::load(&dir, Device::Cpu).unwrap_or_else(|e| panic!("committed checkpoint `{name}`: {e}")).0
}

/// A unique scratch directory.
pub fn scratch(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("dynrobust-test-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
