//! Evaluation sanity flags, in the spirit of AutoAttack's checks (Croce & Hein, ICML 2020) and
//! of Carlini et al., "On Evaluating Adversarial Robustness" (2019): signs that a robustness
//! number comes from a broken attack rather than a strong defense.
//!
//! Per result (here): zero or non-finite input gradients of the attack's natural objective
//! through the (defended) model. Across results (in the report): a transfer or oblivious attack
//! beating the white-box adaptive one; clean numbers of a deterministic defense changing
//! with the seed.

use dynrobust_core::attack::{input_grad, Goal};
use dynrobust_core::{DynamicModel, Pass, Result};
use tch::{Kind, Tensor};

/// Fraction of samples with an all-zero input gradient above which a result is flagged.
pub const ZERO_GRAD_FRACTION: f64 = 0.5;

/// The gradient checks on a batch: the objective is cross-entropy of the deployed prediction
/// for accuracy attacks; for energy attacks, the sum of gate probabilities (gated) or of the
/// max-softmax of every exit (early exit), both of which the attacks move.
pub fn gradient_flags(model: &dyn DynamicModel, x: &Tensor, y: &Tensor, goal: Goal) -> Result<Vec<String>> {
    let (g, _) = input_grad(x, |leaf| {
        let trace = model.forward_trace(leaf, Pass::Dense)?;
        Ok(match goal {
            Goal::Accuracy | Goal::Both => trace.logits.cross_entropy_for_logits(y),
            Goal::Energy if !trace.gate_probs.is_empty() => Tensor::stack(&trace.gate_probs, 1).sum(Kind::Float),
            Goal::Energy if !trace.exit_logits.is_empty() => {
                trace.exit_logits.iter().map(|z| z.softmax(-1, Kind::Float).amax(&[-1i64][..], false).sum(Kind::Float)).sum::<Tensor>()
            }
            Goal::Energy => trace.logits.cross_entropy_for_logits(y),
        })
    })?;
    let mut flags = Vec::new();
    let finite = g.isfinite().all().int64_value(&[]) == 1;
    if !finite {
        flags.push("non-finite input gradients".to_string());
    }
    let per_sample = g.abs().flatten(1, -1).amax(&[1i64][..], false);
    let zero = per_sample.eq(0.0).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
    if zero > ZERO_GRAD_FRACTION {
        flags.push(format!("zero input gradient on {:.0} % of samples (gradient masking?)", 100.0 * zero));
    }
    Ok(flags)
}
