//! Loss functions of the attacks, each as its authors' code computes it (see
//! `shared/spec/attacks.md`), on `[B,K]` logits and `[B]` gate probabilities.

use dynrobust_core::{Error, Result, Trace};
use tch::{Kind, Reduction, Tensor};

/// DeepSloth (Hong et al., ICLR 2021), `utils.CrossEntropyLogitsWithUniform`, summed over the
/// internal classifiers (all exits but the final head): Σ_i mean_b [−(1/K) Σ_k log(softmax(z_i)_k + 1e-9)].
/// Minimised: every IC is pushed to the uniform distribution (no confident early exit).
///
/// Computed on the ICs stacked `[E,B,K]` — one softmax, log and sum for every exit at once
/// (the same value as exit by exit, in a handful of calls instead of six per exit, which is
/// what an attack step pays for at small batches).
pub fn deepsloth_uniform_ce(exit_logits: &[Tensor]) -> Tensor {
    let z = Tensor::stack(exit_logits, 0);
    let (batch, classes) = (z.size()[1] as f64, z.size()[2] as f64);
    (z.softmax(2, Kind::Float) + 1e-9).log().sum(Kind::Float) / (-classes * batch)
}

/// `[B]` cross-entropy of softmax(z) against the uniform distribution (with DeepSloth's 1e-9).
pub fn uniform_ce_per_sample(z: &Tensor) -> Tensor {
    let k = z.size()[1] as f64;
    -(z.softmax(1, Kind::Float) + 1e-9).log().sum_dim_intlist(&[1i64][..], false, Kind::Float) / k
}

/// ILFO (Haque et al., CVPR 2020) energy term c·Σ_i relu(0.5 − p_i), summed over gates and
/// the batch (`[G]` of `[B]` probabilities); `faithful` multiplies by the number of gates G,
/// the effect of the authors' `(target[G] − output[G,1])` broadcast.
pub fn ilfo_energy(gate_probs: &[Tensor], c: f64, faithful: bool) -> Tensor {
    ilfo_energy_per_sample(&Tensor::stack(gate_probs, 1), c, faithful).sum(Kind::Float)
}

/// The ILFO energy term per sample `[B]` of a `[B,G]` gate matrix (see [`ilfo_energy`]).
pub fn ilfo_energy_per_sample(gates: &Tensor, c: f64, faithful: bool) -> Tensor {
    let c_eff = if faithful { c * gates.size()[1] as f64 } else { c };
    (-gates + 0.5).relu().sum_dim_intlist(&[1i64][..], false, Kind::Float) * c_eff
}

/// `||v||_p = (Σ_j |v_j|^p)^{1/p}` over the gate dimension of `[B,G]`, per sample (used even
/// for p < 1, as `Tensor.norm(p, dim=1)` in GradMDM's code). It is libtorch's own `norm`, so
/// the gradient is PyTorch's too: 0 (not NaN) at entries that are exactly 0 — a gate at
/// exactly 1 in Lpos — and for a row whose norm underflows to 0 (p = 50 on small entries).
pub fn p_norm_rows(v: &Tensor, p: f64) -> Tensor {
    v.norm_scalaropt_dim(p, [1i64], false)
}

/// GradMDM `Lpos = Σ_b ||1 − max(g_b, τ)||_{p_pos}` ("keep active gates active"), τ = 0.5.
pub fn gradmdm_lpos(gates: &Tensor, p_pos: f64) -> Tensor {
    p_norm_rows(&(1.0 - gates.clamp_min(0.5)), p_pos).sum(Kind::Float)
}

/// GradMDM `Lneg = −Σ_b ||min(g_b, τ)||_{p_neg}` ("switch inactive gates on"), τ = 0.5.
pub fn gradmdm_lneg(gates: &Tensor, p_neg: f64) -> Tensor {
    -p_norm_rows(&gates.clamp_max(0.5), p_neg).sum(Kind::Float)
}

/// GradAuto `Lpos = −Σ relu(g − 0.5)`.
pub fn gradauto_lpos(gates: &Tensor) -> Tensor {
    -(gates - 0.5).relu().sum(Kind::Float)
}

/// GradAuto `Lneg = Σ relu(0.5 − g)`.
pub fn gradauto_lneg(gates: &Tensor) -> Tensor {
    (-gates + 0.5).relu().sum(Kind::Float)
}

/// Stacks a trace's gate probabilities into `[B,G]`.
pub fn gate_matrix(trace: &Trace) -> Result<Tensor> {
    if trace.gate_probs.is_empty() {
        return Err(Error::config("model", "this attack needs gate probabilities; the model has no gates"));
    }
    Ok(Tensor::stack(&trace.gate_probs, 1))
}

/// Which output an accuracy loss reads (DeepSloth's PGD, PGD-avg, PGD-max).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExitLoss {
    /// The final head (DeepSloth's PGD).
    Final,
    /// The deployed prediction (the exit the rule chose; the final head for non-exit models).
    Deployed,
    /// Cross-entropy averaged over every exit and the final head (PGD-avg).
    Avg,
    /// Per sample the largest cross-entropy over the exits and the final head (a one-pass
    /// form of PGD-max's worst exit).
    Max,
    /// DeepSloth's PGD-max as its code runs it (spec §4.4): one PGD per output (each internal
    /// classifier and the final head alone), then per sample the result with the largest
    /// cross-entropy summed over all outputs. `maxruns` in configs; the final head alone on
    /// models without exits.
    #[serde(rename = "maxruns")]
    MaxRuns,
}

/// Per-sample cross-entropy `[B]` of `[B,K]` logits.
pub fn ce_per_sample(z: &Tensor, y: &Tensor) -> Tensor {
    z.log_softmax(1, Kind::Float).nll_loss_nd::<Tensor>(y, None, Reduction::None, -100)
}

/// Per-sample difference-of-logits-ratio loss `[B]` (Croce & Hein, ICML 2020, AutoAttack's
/// `dlr_loss`): `−(z_y − max_{i≠y} z_i) / (z_π1 − z_π3 + 1e-12)` with π the logits sorted in
/// decreasing order. Invariant to shifting and scaling the logits. Needs ≥ 3 classes.
pub fn dlr_per_sample(z: &Tensor, y: &Tensor) -> Tensor {
    let (sorted, order) = z.sort(1, false);
    let k = z.size()[1];
    let top = sorted.select(1, k - 1);
    let second = sorted.select(1, k - 2);
    let third = sorted.select(1, k - 3);
    let y_is_top = order.select(1, k - 1).eq_tensor(y).to_kind(Kind::Float);
    let z_y = z.gather(1, &y.unsqueeze(1), false).squeeze_dim(1);
    let best_other: Tensor = &second * &y_is_top + &top * (1.0 - &y_is_top);
    let margin: Tensor = z_y - best_other;
    let spread: Tensor = top - third + 1e-12;
    -(margin / spread)
}

/// Per-sample targeted DLR loss `[B]` (AutoAttack's `dlr_loss_targeted`, for APGD-T):
/// `−(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2 + 1e-12)` for target classes `t` `[B]`; ascending it
/// lifts the target's logit over the true class's. Needs ≥ 4 classes.
pub fn dlr_targeted_per_sample(z: &Tensor, y: &Tensor, target: &Tensor) -> Tensor {
    let (sorted, _) = z.sort(1, false);
    let k = z.size()[1];
    let pick = |t: &Tensor| z.gather(1, &t.unsqueeze(1), false).squeeze_dim(1);
    let spread: Tensor = sorted.select(1, k - 1) - (sorted.select(1, k - 3) + sorted.select(1, k - 4)) * 0.5 + 1e-12;
    let margin: Tensor = pick(y) - pick(target);
    -(margin / spread)
}

/// `loss` `[B]` of every output, the internal classifiers first and the final head last,
/// stacked `[B, E+1]`.
fn per_output(trace: &Trace, y: &Tensor, loss: &dyn Fn(&Tensor, &Tensor) -> Tensor) -> Tensor {
    Tensor::stack(&trace.exit_logits.iter().chain(std::iter::once(&trace.final_logits)).map(|z| loss(z, y)).collect::<Vec<_>>(), 1)
}

/// Cross-entropy `[B]` of every output, the internal classifiers first and the final head
/// last, stacked `[B, E+1]`.
pub fn per_output_ce(trace: &Trace, y: &Tensor) -> Tensor {
    per_output(trace, y, &ce_per_sample)
}

/// Cross-entropy `[B]` (per sample) of the output chosen by `which`.
pub fn accuracy_loss_per_sample(trace: &Trace, y: &Tensor, which: ExitLoss) -> Tensor {
    output_loss_per_sample(trace, y, which, &ce_per_sample)
}

/// `loss` `[B]` (per sample; cross-entropy, DLR) of the output chosen by `which`: one output,
/// or the mean / the largest over the internal classifiers and the final head.
pub fn output_loss_per_sample(trace: &Trace, y: &Tensor, which: ExitLoss, loss: &dyn Fn(&Tensor, &Tensor) -> Tensor) -> Tensor {
    match which {
        ExitLoss::Deployed => return loss(&trace.logits, y),
        _ if trace.exit_logits.is_empty() || matches!(which, ExitLoss::Final | ExitLoss::MaxRuns) => return loss(&trace.final_logits, y),
        _ => {}
    }
    // every internal classifier plus the final head
    let stacked = per_output(trace, y, loss);
    match which {
        ExitLoss::Avg => stacked.mean_dim(&[1i64][..], false, Kind::Float),
        _ => stacked.amax(&[1i64][..], false),
    }
}

/// DeepSloth's efficacy: the area under (cumulative exit fraction) vs (normalised cumulative
/// cost) with points `[0, c_1 … c_N]`, `[0, F_1 … F_N]` (trapezoid rule). `exit_costs[i]` is
/// the cost of a sample leaving at exit i (the last is the final head, normalised to 1 here);
/// `histogram[i]` the samples that left there.
pub fn efficacy_auc(histogram: &[i64], exit_costs: &[f64]) -> f64 {
    let n: i64 = histogram.iter().sum();
    if n == 0 || histogram.len() != exit_costs.len() {
        return f64::NAN;
    }
    let last = *exit_costs.last().unwrap();
    let (mut xs, mut ys) = (vec![0.0], vec![0.0]);
    let mut cum = 0;
    for (i, (&h, &c)) in histogram.iter().zip(exit_costs).enumerate() {
        cum += h;
        xs.push(c / last);
        ys.push(if i + 1 == histogram.len() { 1.0 } else { cum as f64 / n as f64 });
    }
    xs.windows(2).zip(ys.windows(2)).map(|(x, y)| (x[1] - x[0]) * (y[0] + y[1]) / 2.0).sum()
}

/// Temperature of the soft decisions in [`soft_cost_per_sample`]: a gate runs its block with
/// weight `σ((p − 0.5)/T)`, an exit takes a sample with `σ((conf − q)/T)`.
pub const SOFT_DECISION_TEMPERATURE: f64 = 0.05;

/// The soft form of the decision `value > threshold`: `σ((value − threshold)/T)`.
fn soft_decision(value: &Tensor, threshold: f64) -> Tensor {
    ((value.to_kind(Kind::Float) - threshold) / SOFT_DECISION_TEMPERATURE).sigmoid()
}

/// Each residual block's share of the static MACs, split into the ungated blocks' total and
/// the gated blocks' shares in gate order (the last `gates` blocks carry the gates).
pub fn gated_block_shares(model: &dyn dynrobust_core::DynamicModel, gates: usize) -> (f64, Vec<f64>) {
    let stat = model.static_macs() as f64;
    let blocks: Vec<f64> = model.units().iter().filter(|u| u.kind == dynrobust_core::UnitKind::Block).map(|u| u.macs as f64 / stat).collect();
    let first_gated = blocks.len().saturating_sub(gates);
    (blocks[..first_gated].iter().sum(), blocks[first_gated..].to_vec())
}

/// A differentiable stand-in `[B]` for the per-sample cost of a (dense) trace, for attacks
/// that must trade compute against another term:
/// - gated models: `Σ_j σ((p_j − 0.5)/T)·w_j`, each gate's soft decision on its execute
///   probability `p_j` times the share of the static MACs its block holds, plus the share of
///   the ungated blocks (T [`SOFT_DECISION_TEMPERATURE`]; the gates decide `p_j > 0.5`, and
///   the committed gates' `p_j` mostly lie in 0.3–0.8, so `Σ p_j·w_j` — the expected cost the
///   cost-cap defense penalises — follows the hard cost less closely: Pearson correlation with
///   the hard cost over the first 32 test images 0.44 for `gated`, 0.68 with the soft decision;
///   0.50 for `skipnet`, 0.97 for `sdn`);
/// - exit models: the expected cost under a soft exit rule, sample leaves at exit i with
///   probability `e_i Π_{j<i} (1 − e_j)`, `e_i = σ((max softmax(z_i) − q)/T)`, and at the
///   final head with `Π_j (1 − e_j)`, each exit weighted by its cost
///   ([`DynamicModel::exit_costs`]);
/// - a model with no dynamic mechanism (or its static twin): its constant cost 1.
///
/// It is not the cost metric, which counts the hard decisions: as T → 0 it tends to the cost
/// up to the units every sample runs (stem, shortcuts, head, gates, ICs).
pub fn soft_cost_per_sample(model: &dyn dynrobust_core::DynamicModel, trace: &Trace) -> Tensor {
    use dynrobust_core::Family;
    let batch = trace.logits.size()[0];
    let constant = |c: f64| Tensor::full([batch], c, (Kind::Float, trace.logits.device()));
    match (model.family(), model.exit_costs()) {
        (Family::Gated { gates, .. }, _) if !trace.gate_probs.is_empty() => {
            let (ungated, gated) = gated_block_shares(model, gates);
            trace.gate_probs.iter().zip(&gated).fold(constant(ungated), |cost, (p, w)| cost + soft_decision(p, 0.5) * *w)
        }
        (Family::EarlyExit { threshold, .. }, Some(exit_costs)) if exit_costs.len() == trace.exit_logits.len() + 1 => {
            let mut remaining = constant(1.0);
            let mut cost = constant(0.0);
            for (z, c) in trace.exit_logits.iter().zip(&exit_costs) {
                let confidence = z.softmax(1, Kind::Float).amax(&[1i64][..], false);
                let leaves = soft_decision(&confidence, threshold);
                cost = cost + &remaining * &leaves * *c;
                remaining = &remaining * (1.0 - leaves);
            }
            cost + remaining * exit_costs[exit_costs.len() - 1]
        }
        _ => constant(1.0),
    }
}
