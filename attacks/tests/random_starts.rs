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

fn tiny_step(name: &str, eps: f64, extra: Value) -> Box<dyn Attack> {
    let mut cfg = json!({"eps": eps, "steps": 1, "step_size": 1e-7});
    cfg.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    registry::build(name, &cfg).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn each_batch_draws_its_own_start_and_the_same_batch_the_same() {
    let _lock = common::torch_lock();
    let (static_net, sdn) = (common::committed("static"), common::committed("sdn"));
    let ((x1, y1), (x2, y2)) = two_batches();
    // (attack, extra config, model, ε, L2 budget?)
    let cases: [(&str, Value, &dyn DynamicModel, f64, bool); 6] = [
        ("pgd-linf", json!({}), &static_net, EPS, false),
        ("pgd-l2", json!({}), &static_net, 1.0, true),
        ("mechanism", json!({}), &sdn, EPS, false),
        ("feature-pgd", json!({}), &static_net, EPS, false),
        ("deepsloth", json!({"mode": "fixed"}), &sdn, EPS, false),
        ("deepsloth-l2", json!({}), &sdn, 1.0, true),
    ];
    for (name, extra, model, eps, l2) in cases {
        let attack = tiny_step(name, eps, extra);
        let in_first = first_delta(&*attack, model, &x1, &y1);
        let again = first_delta(&*attack, model, &x1, &y1);
        assert!(in_first.equal(&again), "{name}: the same batch and seed must give the same start");
        let in_second = first_delta(&*attack, model, &x2, &y2);
        // two independent draws differ by far more than the 1e-7 step
        let (gap, reach) = if l2 {
            ((&in_first - &in_second).norm().double_value(&[]), in_first.norm().double_value(&[]))
        } else {
            (common::max_abs_diff(&in_first, &in_second), in_first.abs().max().double_value(&[]))
        };
        assert!(gap > 0.5 * eps, "{name}: the shared sample started at (nearly) the same point in both batches (gap {gap:.2e})");
        // the start lies in the ball and reaches well into it
        assert!(reach > 0.3 * eps && reach <= eps + 1e-5, "{name}: start reaches {reach:.4}, ε = {eps:.4}");
    }
}
