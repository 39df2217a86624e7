//! Random starts across batches: the attacks whose authors draw each batch's start from one
//! running generator (PGD, the mechanism attack, feature-level PGD, DeepSloth) give every batch
//! its own start, while the same batch and seed give the same start. (APGD, FAB and Square
//! re-seed at every batch, as AutoAttack does.)
//!
//! The start is made visible by a step of 1e-7: the output is the start to within 1e-7.

mod common;

use dynrobust_attacks::registry;
use dynrobust_core::attack::Attack;
use dynrobust_core::DynamicModel;
use serde_json::{json, Value};
use tch::Tensor;

const EPS: f64 = 8.0 / 255.0;

/// The first sample's perturbation when `attack` perturbs `x`.
fn first_delta(attack: &dyn Attack, model: &dyn DynamicModel, x: &Tensor, y: &Tensor) -> Tensor {
    let adv = attack.perturb(model, x, y).expect("perturb");
    (adv - x).get(0)
}

/// Two batches that share their first sample (the last one differs), with their labels.
fn two_batches() -> ((Tensor, Tensor), (Tensor, Tensor)) {
    let data = common::test_images(6);
    let (images, labels) = (data.images, data.labels);
    let first = (images.narrow(0, 0, 4), labels.narrow(0, 0, 4));
    let second = (Tensor::cat(&[images.narrow(0, 0, 3), images.narrow(0, 5, 1)], 0), Tensor::cat(&[labels.narrow(0, 0, 3), labels.narrow(0, 5, 1)], 0));
    (first, second)
}

fn tiny_step(name: &str, extra: Value) -> Box<dyn Attack> {
    let mut cfg = json!({"eps": EPS, "steps": 1, "step_size": 1e-7});
    cfg.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    registry::build(name, &cfg).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn each_batch_draws_its_own_start_and_the_same_batch_the_same() {
    let _lock = common::torch_lock();
    let (static_net, sdn) = (common::committed("static"), common::committed("sdn"));
    let ((x1, y1), (x2, y2)) = two_batches();
    let cases: [(&str, Value, &dyn DynamicModel); 4] = [
        ("pgd-linf", json!({}), &static_net),
        ("mechanism", json!({}), &sdn),
        ("feature-pgd", json!({}), &static_net),
        ("deepsloth", json!({"mode": "fixed"}), &sdn),
    ];
    for (name, extra, model) in cases {
        let attack = tiny_step(name, extra);
        let in_first = first_delta(&*attack, model, &x1, &y1);
        let again = first_delta(&*attack, model, &x1, &y1);
        assert!(in_first.equal(&again), "{name}: the same batch and seed must give the same start");
        let in_second = first_delta(&*attack, model, &x2, &y2);
        // two independent U(−ε, ε) draws over 784 pixels differ by far more than the 1e-7 step
        let gap = common::max_abs_diff(&in_first, &in_second);
        assert!(gap > EPS, "{name}: the shared sample started at the same point in both batches (max gap {gap:.2e})");
        // the start fills the ball: its largest pixel change is close to ε
        let reach = in_first.abs().max().double_value(&[]);
        assert!(reach > 0.9 * EPS && reach <= EPS + 1e-6, "{name}: start reaches {reach:.4}, ε = {EPS:.4}");
    }
}
