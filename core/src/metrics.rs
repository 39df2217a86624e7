//! Metrics shared by eval, attacks and reports: accuracy, cost, recovery, exit histograms,
//! gate rates.
//!
//! cost = MACs / static MACs; recovery = (adv cost − clean cost) / (1 − clean cost)
//! (GradMDM's "recovery", the share of the saved compute an attacker claws back); fooled rate =
//! the share of clean-correct samples the attack misclassifies (the transfer rate of a
//! surrogate-crafted attack).

use tch::{Kind, Tensor};

/// Fraction of rows whose arg-max of `logits` equals `labels`.
pub fn accuracy(logits: &Tensor, labels: &Tensor) -> f64 {
    correct(logits, labels).to_kind(Kind::Double).mean(Kind::Double).double_value(&[])
}

/// `[B]` bool: arg-max of `logits` equals `labels`.
pub fn correct(logits: &Tensor, labels: &Tensor) -> Tensor {
    logits.argmax(-1, false).eq_tensor(labels)
}

/// True when the clean inputs already cost a full static pass (a static model, a static twin):
/// there is no saving to recover, so recovery is 0/0 — reported as 0 in records, shown as
/// "–" in text and tables.
pub fn saves_nothing(clean_cost: f64) -> bool {
    clean_cost >= 1.0 - 1e-9
}

/// Share of the saved compute the attacker recovered; 0 when the clean cost is already 1
/// ([`saves_nothing`]).
/// Costs are MACs over the static twin's, gates and internal classifiers included, so an
/// attack that makes a model dearer than its static twin (every exit head run, then the final
/// one) recovers more than 100 %. [`block_recovery`] is the equal-weight block count variant.
pub fn recovery(clean_cost: f64, adv_cost: f64) -> f64 {
    if saves_nothing(clean_cost) {
        0.0
    } else {
        (adv_cost - clean_cost) / (1.0 - clean_cost)
    }
}

/// Of the samples classified correctly on clean inputs, the share the attack made wrong:
/// `#{adv wrong ∧ clean right} / #{clean right}` (`[B]` bools in; 0 when none was right). For
/// a transfer attack this is the accuracy transfer rate of the black-box protocol.
pub fn fooled_rate(clean_correct: &Tensor, adv_correct: &Tensor) -> f64 {
    let right = clean_correct.sum(Kind::Int64).int64_value(&[]);
    if right == 0 {
        return 0.0;
    }
    let fooled = clean_correct.logical_and(&adv_correct.logical_not()).sum(Kind::Int64).int64_value(&[]);
    fooled as f64 / right as f64
}

/// Counts of samples per exit index (`exits + 1` bins, the last is the final head).
pub fn exit_histogram(exit_index: &Tensor, exits: usize) -> Vec<i64> {
    let counts = exit_index.to_kind(Kind::Int64).bincount::<Tensor>(None, exits as i64 + 1);
    Vec::<i64>::try_from(&counts).unwrap_or_default()
}

/// Fraction of samples for which each gate opened (its own hard decision p > 0.5). A block
/// budget (the `guard` defense) can still switch off a block whose gate opened; the executed
/// masks behind `cost` and `recovery_blocks` count what ran.
pub fn gate_rates(gate_probs: &[Tensor]) -> Vec<f64> {
    gate_probs
        .iter()
        .map(|p| p.gt(0.5).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]))
        .collect()
}

/// Recovery on the equal-weight block percentage of GradMDM's and GradAuto's code (spec
/// §1.4): `cp = mean executed blocks / blocks`, recovery `(cp_adv − cp_clean) / (1 − cp_clean)`,
/// every backbone block counted alike whatever its MACs (0 when nothing was skipped).
/// `executed` masks are `[B,U]` in the column order of `units`.
pub fn block_recovery(clean_executed: &Tensor, adv_executed: &Tensor, units: &[crate::Unit]) -> f64 {
    let Some(cols) = block_columns(units, clean_executed.device()) else { return 0.0 };
    let share = |e: &Tensor| e.index_select(1, &cols).gt(0.5).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
    recovery(share(clean_executed), share(adv_executed))
}

/// The columns of the backbone blocks among `units` (the `executed` mask's order), on
/// `device`; `None` when there are none.
fn block_columns(units: &[crate::Unit], device: tch::Device) -> Option<Tensor> {
    let cols: Vec<i64> = units.iter().enumerate().filter(|(_, u)| u.kind == crate::UnitKind::Block).map(|(i, _)| i as i64).collect();
    (!cols.is_empty()).then(|| Tensor::from_slice(&cols).to_device(device))
}

/// Fraction of the (sample, block) pairs skipped on the clean input that run on the
/// adversarial one — how many skip decisions the attack flipped on (0 when nothing was
/// skipped). `executed` masks are `[B,U]` in the column order of `units`.
pub fn blocks_switched_on(clean_executed: &Tensor, adv_executed: &Tensor, units: &[crate::Unit]) -> f64 {
    let Some(cols) = block_columns(units, clean_executed.device()) else { return 0.0 };
    let clean_off = clean_executed.index_select(1, &cols).lt(0.5);
    let adv_on = adv_executed.index_select(1, &cols).gt(0.5);
    let off = clean_off.sum(Kind::Double).double_value(&[]);
    if off == 0.0 {
        return 0.0;
    }
    clean_off.logical_and(&adv_on).sum(Kind::Double).double_value(&[]) / off
}
