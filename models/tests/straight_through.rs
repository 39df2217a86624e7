//! Hard gates pass their gradient straight through in the dense pass (ConvNet-AIG's and
//! SkipNet's training rule, `hard + (soft − soft.detach())`): a gate's value is exactly its hard
//! decision, and the task loss's gradient still reaches the gate's parameters through its soft
//! probability, which a hard threshold alone would cut off.

mod common;

use tch::{Kind, Tensor};

#[test]
fn hard_gates_pass_the_task_loss_gradient_straight_through() {
    let data = common::test_images(64);
    for (name, gate_prefix) in [("gated", "gates."), ("skipnet", "rnn_gate.")] {
        let mut net = common::committed(name);
        net.vs.unfreeze();
        let out = net.forward_train(&data.images, false, false);
        assert!(!out.gates.is_empty(), "{name} has gates");
        for (g, (st, soft)) in out.gates.iter().zip(&out.gate_probs).enumerate() {
            let hard = soft.gt(0.5).to_kind(Kind::Float);
            assert!(bool::try_from(st.eq_tensor(&hard).all()).unwrap(), "{name} gate {g}: the value is the hard decision");
            assert!(st.requires_grad(), "{name} gate {g}: the decision carries a gradient");
        }
        let loss = out.logits.cross_entropy_for_logits(&data.labels);
        let gate_vars: Vec<(String, Tensor)> = net.vs.variables().into_iter().filter(|(k, t)| k.starts_with(gate_prefix) && t.requires_grad()).collect();
        assert!(!gate_vars.is_empty(), "{name}: no trainable variable named {gate_prefix}*");
        let tensors: Vec<&Tensor> = gate_vars.iter().map(|(_, t)| t).collect();
        let grads = Tensor::run_backward(&[&loss], &tensors, false, true);
        let reached: f64 = grads.iter().filter(|g| g.defined()).map(|g| g.abs().sum(Kind::Double).double_value(&[])).sum();
        assert!(reached > 0.0, "{name}: the cross-entropy's gradient reaches no gate parameter");
    }
}
