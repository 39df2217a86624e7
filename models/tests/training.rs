//! Training smoke tests on ~1k images: the loss goes down, and training is deterministic
//! under a seed.

mod common;

use dynrobust_core::{DynamicModel, Pass};
use dynrobust_models::train::{train, TrainConfig};
use dynrobust_models::{Mechanism, ModelConfig, Net};
use tch::{Device, Kind, Tensor};

fn fresh(mechanism: Mechanism, seed: i64) -> Net {
    tch::manual_seed(seed);
    Net::new(ModelConfig::resnet14n(mechanism, 0.286, 0.353).unwrap(), Device::Cpu).unwrap()
}

fn mean_loss(net: &Net, x: &Tensor, y: &Tensor) -> f64 {
    tch::no_grad(|| net.forward_train(x, false, false).logits.cross_entropy_for_logits(y).double_value(&[]))
}

#[test]
fn training_on_1k_images_lowers_the_loss() {
    // libtorch's generator is global: tests of this binary that train must not interleave
    let _lock = dynrobust_core::testing::torch_lock();
    let data = common::test_images(1024);
    let mut net = fresh(Mechanism::Static, 1);
    let before = mean_loss(&net, &data.images, &data.labels);
    let cfg = TrainConfig { epochs: 4, batch_size: 64, lr: 3e-3, seed: 1, cost_weight: 0.0 };
    let report = train(&mut net, &data, &cfg).unwrap();
    let after = mean_loss(&net, &data.images, &data.labels);
    assert!(after < before * 0.7, "loss {before:.4} → {after:.4}");
    let first = report.epoch_losses[0];
    assert!(report.epoch_losses[1..].iter().all(|&l| l < first), "epoch losses {:?}", report.epoch_losses);
}

#[test]
fn gated_training_moves_gate_rates_towards_the_target() {
    // libtorch's generator is global: tests of this binary that train must not interleave
    let _lock = dynrobust_core::testing::torch_lock();
    let data = common::test_images(1024);
    let mut net = fresh(Mechanism::Gated { target_rate: 0.3 }, 2);
    // mean soft execute-probability: it moves continuously, the hard rate only once a gate flips
    let rates = |net: &Net| -> f64 {
        let trace = tch::no_grad(|| net.forward_trace(&data.images, Pass::Dense).unwrap());
        Tensor::stack(&trace.gate_probs, 0).mean(Kind::Float).double_value(&[])
    };
    let before = rates(&net);
    let cfg = TrainConfig { epochs: 2, batch_size: 64, lr: 3e-3, seed: 2, cost_weight: 5.0 };
    train(&mut net, &data, &cfg).unwrap();
    let after = rates(&net);
    assert!(before > 0.8, "AIG gates start mostly open: {before}");
    assert!((after - 0.3).abs() < (before - 0.3).abs(), "mean gate rate {before:.3} → {after:.3}, target 0.3");
}

#[test]
fn training_is_deterministic_under_a_seed() {
    // libtorch's generator is global: tests of this binary that train must not interleave
    let _lock = dynrobust_core::testing::torch_lock();
    let data = common::test_images(512);
    let cfg = TrainConfig { epochs: 1, batch_size: 64, lr: 3e-3, seed: 5, cost_weight: 5.0 };
    let mut a = fresh(Mechanism::Skipnet { target_rate: 0.5 }, 5);
    let mut b = fresh(Mechanism::Skipnet { target_rate: 0.5 }, 5);
    train(&mut a, &data, &cfg).unwrap();
    train(&mut b, &data, &cfg).unwrap();
    let vb = b.vs.variables();
    for (name, t) in a.vs.variables() {
        assert!(t.equal(&vb[&name]), "tensor {name} differs between two seeded runs");
    }
}

#[test]
fn sdn_training_leaves_the_backbone_untouched() {
    // libtorch's generator is global: tests of this binary that train must not interleave
    let _lock = dynrobust_core::testing::torch_lock();
    let data = common::test_images(512);
    let mut net = fresh(Mechanism::Sdn { threshold: 0.9 }, 4);
    let before: Vec<(String, Tensor)> = net.vs.variables().into_iter().filter(|(n, _)| !n.starts_with("exits.")).map(|(n, t)| (n, t.copy())).collect();
    let cfg = TrainConfig { epochs: 1, batch_size: 64, lr: 2e-3, seed: 4, cost_weight: 0.0 };
    train(&mut net, &data, &cfg).unwrap();
    let after = net.vs.variables();
    for (name, t) in before {
        assert!(t.equal(&after[&name]), "backbone tensor {name} changed during IC-only training");
    }
}

#[test]
fn bad_training_configs_are_refused_with_the_field_named() {
    let ok = TrainConfig { epochs: 1, batch_size: 8, lr: 1e-3, seed: 0, cost_weight: 1.0 };
    for (cfg, field) in [
        (TrainConfig { epochs: 0, ..ok.clone() }, "epochs"),
        (TrainConfig { batch_size: 0, ..ok.clone() }, "batch_size"),
        (TrainConfig { lr: f64::NAN, ..ok.clone() }, "lr"),
        (TrainConfig { cost_weight: -1.0, ..ok.clone() }, "cost_weight"),
    ] {
        let err = cfg.validated().unwrap_err().to_string();
        assert!(err.contains(&format!("`{field}`")), "{err}");
    }
}

#[test]
fn small_training_sets_get_enough_optimiser_steps_by_default() {
    use dynrobust_models::train::{default_epochs, MIN_DEFAULT_STEPS};
    // the whole Fashion-MNIST split at batch 128: 469 steps per epoch, the family default holds
    assert_eq!(default_epochs(3, 60_000, 128), 3);
    // k = 1 per class (10 images): one step per epoch, so 300 epochs
    assert_eq!(default_epochs(3, 10, 128), MIN_DEFAULT_STEPS);
    // k = 100 (1,000 images): 8 steps per epoch → 38 epochs (304 steps)
    assert_eq!(default_epochs(3, 1_000, 128), 38);
}

#[test]
fn only_whole_split_fashion_mnist_nets_start_from_the_committed_static() {
    use dynrobust_core::data::{DataSource, DataSpec};
    use dynrobust_models::train::may_start_from_committed_static;
    use dynrobust_models::{Mechanism, ModelConfig};
    let (fashion, mnist) = (DataSpec::Named(DataSource::FashionMnist), DataSpec::Named(DataSource::Mnist));
    let gated = ModelConfig::resnet14n(Mechanism::Gated { target_rate: 0.5 }, 0.286, 0.353).unwrap();
    assert!(may_start_from_committed_static(&gated, &fashion, false));
    // a k-shot, subset or other-data surrogate must not inherit the victim's training
    assert!(!may_start_from_committed_static(&gated, &fashion, true));
    assert!(!may_start_from_committed_static(&gated, &mnist, false));
    let cifar = ModelConfig::resnet20(Mechanism::Gated { target_rate: 0.5 }, vec![0.5; 3], vec![0.25; 3], 10).unwrap();
    assert!(!may_start_from_committed_static(&cifar, &fashion, false));
}
