//! The differentiable cost stand-in (`soft_cost_per_sample`) on the committed checkpoints:
//! with the gates' hard decisions in place of their probabilities it is the blocks' share of
//! the static MACs that ran (to within the soft decision's σ(±10)); for the exit model it is the expected cost under the
//! soft exit rule, recomputed here by hand from the exit logits; for models without a dynamic
//! mechanism it is the constant 1. It carries a gradient to the input.

use dynrobust_attacks::losses::{soft_cost_per_sample, SOFT_DECISION_TEMPERATURE};
use dynrobust_core::testing::{test_images, torch_lock};
use dynrobust_core::{cost_of, DynamicModel, Family, Pass, UnitKind};
use dynrobust_models::checkpoint::load_committed;
use tch::{Kind, Tensor};

fn values(t: &Tensor) -> Vec<f64> {
    Vec::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

/// Per sample, the share of the static MACs the residual blocks that ran hold.
fn executed_block_share(model: &dyn DynamicModel, executed: &Tensor) -> Vec<f64> {
    let stat = model.static_macs() as f64;
    let weights: Vec<f64> = model.units().iter().map(|u| if u.kind == UnitKind::Block { u.macs as f64 / stat } else { 0.0 }).collect();
    values(&executed.to_kind(Kind::Double).matmul(&Tensor::from_slice(&weights)))
}

#[test]
fn with_hard_gates_it_is_the_executed_blocks_share_of_the_macs() {
    let _lock = torch_lock();
    let x = test_images(64).images;
    for name in ["gated", "skipnet"] {
        let net = load_committed(name);
        let Family::Gated { gates, .. } = net.family() else { panic!("{name} has gates") };
        let mut trace = tch::no_grad(|| net.forward_trace(&x, Pass::Dense)).unwrap();
        let block_columns: Vec<i64> = net.units().iter().enumerate().filter(|(_, u)| u.kind == UnitKind::Block).map(|(i, _)| i as i64).collect();
        let gated_columns = &block_columns[block_columns.len() - gates..];
        trace.gate_probs = gated_columns.iter().map(|&c| trace.executed.select(1, c)).collect();
        let soft = values(&soft_cost_per_sample(&net, &trace));
        let want = executed_block_share(&net, &trace.executed);
        // a decided gate (p = 0 or 1) weighs σ(±0.5/T) = σ(±10): 4.5e-5 from its decision
        let tolerance = 1.0 / (1.0 + (0.5 / SOFT_DECISION_TEMPERATURE).exp()) + 1e-6;
        for (s, w) in soft.iter().zip(&want) {
            assert!((s - w).abs() < tolerance, "{name}: soft cost {s} vs executed block share {w}");
        }
        // and the share is the hard cost up to the units that always run
        let hard = values(&cost_of(&trace, &net));
        let spread: Vec<f64> = hard.iter().zip(&want).map(|(h, w)| h - w).collect();
        let (lo, hi) = spread.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &d| (lo.min(d), hi.max(d)));
        assert!(hi - lo < 1e-9, "{name}: the hard cost minus the block share varies ({lo} … {hi})");
    }
}

#[test]
fn for_the_exit_model_it_is_the_expected_cost_under_the_soft_exit_rule() {
    let _lock = torch_lock();
    let net = load_committed("sdn");
    let Family::EarlyExit { threshold, .. } = net.family() else { panic!("sdn has exits") };
    let exit_costs = net.exit_costs().unwrap();
    let trace = tch::no_grad(|| net.forward_trace(&test_images(16).images, Pass::Dense)).unwrap();
    let soft = values(&soft_cost_per_sample(&net, &trace));
    let confidences: Vec<Vec<f64>> = trace.exit_logits.iter().map(|z| values(&z.softmax(1, Kind::Double).amax(&[1i64][..], false))).collect();
    for (b, got) in soft.iter().enumerate() {
        let (mut remaining, mut want) = (1.0, 0.0);
        for (conf, cost) in confidences.iter().zip(&exit_costs) {
            let leaves = 1.0 / (1.0 + (-(conf[b] - threshold) / SOFT_DECISION_TEMPERATURE).exp());
            want += remaining * leaves * cost;
            remaining *= 1.0 - leaves;
        }
        want += remaining * exit_costs.last().unwrap();
        assert!((got - want).abs() < 1e-5, "sample {b}: {got} vs by hand {want}");
    }
}

#[test]
fn it_is_constant_without_a_dynamic_mechanism_and_differentiable_with_one() {
    let _lock = torch_lock();
    let x = test_images(32).images;
    let bare = load_committed("static");
    let trace = bare.forward_trace(&x, Pass::Dense).unwrap();
    assert!(values(&soft_cost_per_sample(&bare, &trace)).iter().all(|&c| c == 1.0));
    for name in ["sdn", "gated", "skipnet"] {
        let net = load_committed(name);
        let x_leaf = x.detach().set_requires_grad(true);
        let trace = net.forward_trace(&x_leaf, Pass::Dense).unwrap();
        let soft = soft_cost_per_sample(&net, &trace);
        let g = Tensor::run_backward(&[soft.sum(Kind::Float)], &[&x_leaf], false, false).remove(0);
        assert!(g.abs().sum(Kind::Double).double_value(&[]) > 0.0, "{name}: no gradient reaches the input");
        // how closely it follows the hard cost is a property of the model (how saturated its
        // gates are), not an invariant: printed, not asserted
        let (soft, hard) = (values(&soft), values(&cost_of(&trace, &net)));
        eprintln!("{name}: correlation of soft and hard cost over 32 images {:.3}", pearson(&soft, &hard));
    }
}

fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let (va, vb): (f64, f64) = (a.iter().map(|x| (x - ma).powi(2)).sum(), b.iter().map(|y| (y - mb).powi(2)).sum());
    cov / (va * vb).sqrt()
}
