//! Batch-norm folding (`Net::fold_batch_norm`) computes the same function as conv → BN: on the
//! committed checkpoints the dense pass agrees in logits, gate probabilities, exit logits and
//! input gradients to float rounding, and in every hard decision that is not within rounding
//! of its threshold; the training loop and the weight loaders never leave a stale fold behind.

mod common;

use dynrobust_core::{DynamicModel, Pass, Trace};
use dynrobust_models::train::{train, TrainConfig};
use dynrobust_models::{checkpoint, Mechanism, ModelConfig, Net};
use tch::{Device, Kind, Tensor};

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn dense(net: &Net, x: &Tensor) -> Trace {
    tch::no_grad(|| net.forward_trace(x, Pass::Dense).unwrap())
}

/// Rows whose hard decisions (gates at 0.5, exits at q) may legitimately flip under rounding:
/// some gate probability or exit confidence within `tol` of its threshold.
fn near_threshold_rows(net: &Net, trace: &Trace, tol: f64) -> Tensor {
    let batch = trace.logits.size()[0];
    let mut near = Tensor::zeros([batch], (Kind::Bool, Device::Cpu));
    for p in &trace.gate_probs {
        near = near.logical_or(&(p - 0.5).abs().lt(tol));
    }
    for z in &trace.exit_logits {
        let confidence = z.softmax(-1, Kind::Float).amax(&[-1i64][..], false);
        near = near.logical_or(&(confidence - net.threshold()).abs().lt(tol));
    }
    near
}

fn input_grad(net: &Net, x: &Tensor, y: &Tensor) -> Tensor {
    let leaf = x.detach().set_requires_grad(true);
    let trace = net.forward_trace(&leaf, Pass::Dense).unwrap();
    let mut loss = trace.logits.cross_entropy_for_logits(y);
    for z in trace.exit_logits.iter().chain(&trace.gate_probs) {
        loss = loss + z.sum(Kind::Float) * 0.1;
    }
    Tensor::run_backward(&[&loss], &[&leaf], false, false).remove(0)
}

#[test]
fn committed_checkpoints_load_folded_and_agree_with_conv_then_bn() {
    let data = common::test_images(512);
    for name in ["static", "sdn", "gated", "skipnet"] {
        let mut net = common::committed(name);
        assert!(net.is_folded(), "{name}: checkpoint::load folds the batch norms");
        let folded = dense(&net, &data.images);
        let g_folded = input_grad(&net, &data.images.narrow(0, 0, 64), &data.labels.narrow(0, 0, 64));
        net.unfold_batch_norm();
        assert!(!net.is_folded());
        let plain = dense(&net, &data.images);
        let g_plain = input_grad(&net, &data.images.narrow(0, 0, 64), &data.labels.narrow(0, 0, 64));

        let scale = plain.final_logits.abs().max().double_value(&[]);
        let d = max_abs(&folded.final_logits, &plain.final_logits);
        assert!(d <= 1e-5 * scale.max(1.0), "{name}: final logits differ by {d} (scale {scale})");
        for (i, (a, b)) in folded.exit_logits.iter().zip(&plain.exit_logits).enumerate() {
            let d = max_abs(a, b);
            assert!(d <= 1e-4, "{name}: exit {i} logits differ by {d}");
        }
        for (i, (a, b)) in folded.gate_probs.iter().zip(&plain.gate_probs).enumerate() {
            let d = max_abs(a, b);
            assert!(d <= 1e-5, "{name}: gate {i} probabilities differ by {d}");
        }
        let g_scale = g_plain.abs().max().double_value(&[]);
        let dg = max_abs(&g_folded, &g_plain);
        assert!(g_scale > 0.0 && dg <= 1e-4 * g_scale, "{name}: input gradients differ by {dg} (scale {g_scale})");

        // hard decisions: equal on every row not within rounding of a threshold
        let differs = folded.executed.ne_tensor(&plain.executed).any_dim(1, false);
        let near = near_threshold_rows(&net, &plain, 1e-4);
        let unexplained = differs.logical_and(&near.logical_not()).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(unexplained, 0, "{name}: {unexplained} executed masks differ away from a threshold");
        let same_pred = folded.logits.argmax(-1, false).eq_tensor(&plain.logits.argmax(-1, false));
        let pred_unexplained = same_pred.logical_not().logical_and(&near.logical_not()).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(pred_unexplained, 0, "{name}: predictions differ away from a threshold");
    }
}

#[test]
fn folded_passes_still_agree_dense_with_sparse() {
    let data = common::test_images(256);
    for name in ["sdn", "gated"] {
        let net = common::committed(name);
        let d = dense(&net, &data.images);
        let s = net.forward_trace(&data.images, Pass::Sparse).unwrap();
        assert!(d.executed.equal(&s.executed), "{name}: executed masks differ between folded passes");
        assert!(d.macs.equal(&s.macs), "{name}: MACs differ between folded passes");
    }
}

#[test]
fn training_a_folded_net_refolds_from_the_trained_weights() {
    let data = common::test_images(256);
    tch::manual_seed(3);
    let mut net = Net::new(ModelConfig::resnet14n(Mechanism::Static, 0.286, 0.353).unwrap(), Device::Cpu).unwrap();
    net.fold_batch_norm();
    let before = dense(&net, &data.images).logits;
    let cfg = TrainConfig { epochs: 1, batch_size: 64, lr: 3e-3, seed: 3, cost_weight: 0.0 };
    train(&mut net, &data, &cfg).unwrap();
    assert!(net.is_folded(), "training keeps the net folded");
    let folded = dense(&net, &data.images).logits;
    assert!(max_abs(&folded, &before) > 1e-2, "training changed the function");
    net.unfold_batch_norm();
    let plain = dense(&net, &data.images).logits;
    let d = max_abs(&folded, &plain);
    assert!(d <= 1e-4, "the fold after training is stale: folded and live outputs differ by {d}");
}

#[test]
fn loading_weights_into_a_folded_net_refolds() {
    let data = common::test_images(64);
    let dir = checkpoint::committed_dir("static");
    tch::manual_seed(4);
    let mut net = Net::new(ModelConfig::resnet14n(Mechanism::Static, 0.286, 0.353).unwrap(), Device::Cpu).unwrap();
    net.fold_batch_norm();
    checkpoint::load_weights(&mut net, &dir.join("model.safetensors")).unwrap();
    assert!(net.is_folded());
    let reference = common::committed("static");
    let d = max_abs(&dense(&net, &data.images).logits, &dense(&reference, &data.images).logits);
    assert!(d == 0.0, "a net folded before loading must fold the loaded weights: outputs differ by {d}");
}
