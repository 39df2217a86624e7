//! Running an attack over a data set and measuring it in the one metrics schema: clean and
//! adversarial accuracy and cost, recovery, DeepSloth efficacy, exit histograms or gate rates,
//! perturbation size (L2, L∞, MSE), wall time, and energy (estimated; RAPL where available).

use std::time::Instant;

use dynrobust_core::attack::{per_sample_norm, Attack, Goal};
use dynrobust_core::energy::{measure_rapl, EnergyModel};
use dynrobust_core::queries::Counted;
use dynrobust_core::metrics::{block_recovery, blocks_switched_on, correct, exit_histogram, fooled_rate, gate_rates, recovery};
use dynrobust_core::{cost_of, DynamicModel, Pass, Result, Trace};
use serde::Serialize;
use tch::{Kind, Tensor};

use crate::losses::efficacy_auc;

/// One attack run, in the schema every dynrobust result uses.
#[derive(Debug, Clone, Serialize)]
pub struct AttackRecord {
    pub model: String,
    pub attack: String,
    pub goal: dynrobust_core::attack::Goal,
    pub eps: Option<f64>,
    pub norm: Option<dynrobust_core::attack::Norm>,
    pub n: i64,
    pub clean_acc: f64,
    pub adv_acc: f64,
    /// Of the clean-correct samples, the share the attack misclassifies (for a transfer attack:
    /// the accuracy transfer rate).
    pub fooled_rate: f64,
    pub clean_cost: f64,
    pub adv_cost: f64,
    pub recovery: f64,
    /// Fraction of the blocks skipped on clean inputs that the attack switched on.
    pub blocks_switched_on: f64,
    /// Recovery on the equal-weight block percentage (GradMDM's and GradAuto's metric,
    /// [`dynrobust_core::metrics::block_recovery`]); `recovery` weighs blocks by their MACs.
    pub recovery_blocks: f64,
    pub l2_mean: f64,
    pub linf_max: f64,
    pub mse: f64,
    /// The MSE in the model's normalised units, `mean((δ/σ_c)²)` with the model's per-channel
    /// input std σ — GradMDM's `mse.py` figure; absent when the model does not name its σ.
    pub mse_normalised: Option<f64>,
    pub seconds: f64,
    /// Attack iterations per batch ([`Attack::iterations`]: the config's `steps`).
    pub iterations: Option<usize>,
    /// Model passes per attacked image while crafting, measured ([`Counted`]): every pass, and
    /// those whose input required a gradient (each back-propagated at least once). Unlike
    /// `iterations` they include PGD-max's one run per exit, a universal perturbation's fit
    /// (spread over the attacked images), EOT samples and forward-only candidate checks.
    /// Absent in records written before they were counted.
    pub forward_passes: Option<f64>,
    pub gradient_passes: Option<f64>,
    pub clean_exit_hist: Option<Vec<i64>>,
    pub adv_exit_hist: Option<Vec<i64>>,
    pub clean_efficacy: Option<f64>,
    pub adv_efficacy: Option<f64>,
    pub clean_gate_rates: Option<Vec<f64>>,
    pub adv_gate_rates: Option<Vec<f64>>,
    /// Estimated inference energy per image (J), clean and adversarial ([`EnergyModel`]).
    pub clean_energy_j: f64,
    pub adv_energy_j: f64,
    /// Measured package energy of crafting (J), when RAPL is readable.
    pub rapl_attack_j: Option<f64>,
    /// Why RAPL is not reported, when it is not.
    pub rapl_note: Option<String>,
    /// What the attack counted on the way ([`Attack::take_tally`]: the ensemble's robust
    /// accuracy after each member), when it counts anything.
    pub tally: Option<serde_json::Value>,
    pub config: serde_json::Value,
}

/// Mean-cost drop (MACs / static MACs) below which an energy attack's result is flagged.
pub const COST_DROP_FLAG: f64 = 0.005;
/// Accuracy rise (fraction) above which an accuracy attack's result is flagged.
pub const ACCURACY_RISE_FLAG: f64 = 0.01;

impl AttackRecord {
    /// Signs in this one result that the attack worked against its own goal: an energy attack
    /// whose examples make the model *cheaper*, an accuracy attack whose examples are
    /// classified *better* than the clean images.
    pub fn outcome_flags(&self) -> Vec<String> {
        let mut flags = Vec::new();
        if self.goal == Goal::Energy && self.adv_cost < self.clean_cost - COST_DROP_FLAG {
            // the attack's name leads (`ilfo@surrogate` for a transfer attack)
            let config = self.config.get("inner_config").unwrap_or(&self.config);
            let faithful_ilfo = self.attack.starts_with("ilfo") && config.get("mode").and_then(|m| m.as_str()) == Some("faithful");
            let known_cause = if faithful_ilfo { " (faithful ILFO starts at R(x) ≠ x, the authors' box quirk)" } else { "" };
            flags.push(format!(
                "the energy attack lowered the mean cost ({:.3} → {:.3}): too few iterations, or a start away from the clean input{known_cause}",
                self.clean_cost, self.adv_cost
            ));
        }
        if self.goal == Goal::Accuracy && self.adv_acc > self.clean_acc + ACCURACY_RISE_FLAG {
            flags.push(format!("the accuracy attack raised accuracy ({:.1} % → {:.1} %)", 100.0 * self.clean_acc, 100.0 * self.adv_acc));
        }
        flags
    }
}

/// Per-sample results, for CSV export and recomputation.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PerSample {
    pub clean_cost: Vec<f64>,
    pub adv_cost: Vec<f64>,
    pub clean_correct: Vec<bool>,
    pub adv_correct: Vec<bool>,
    pub clean_exit: Vec<i64>,
    pub adv_exit: Vec<i64>,
}

/// A finished run: the record, the per-sample results and the adversarial images.
#[derive(Debug)]
pub struct AttackOutcome {
    pub record: AttackRecord,
    pub per_sample: PerSample,
    pub x_adv: Tensor,
}

#[derive(Default)]
struct Acc {
    traces: Vec<(Trace, Trace)>,
    labels: Vec<Tensor>,
    l2: Vec<Tensor>,
    linf: f64,
    sq_sum: f64,
    /// The measured model's per-channel input std, when it names one.
    std: Option<Vec<f64>>,
    /// Σ (δ/σ_c)² (kept only with `std`).
    sq_sum_normalised: f64,
    elems: f64,
}

impl Acc {
    /// Adds a batch's perturbations `δ = x_adv − x` to the size statistics (L2 per sample,
    /// L∞, squared sums in pixel and, with the model's input std, normalised units).
    fn add_perturbation(&mut self, delta: &Tensor) -> Result<()> {
        self.l2.push(per_sample_norm(delta, 2.0));
        self.linf = self.linf.max(delta.abs().max().double_value(&[]));
        self.sq_sum += delta.square().sum(Kind::Double).double_value(&[]);
        if let Some(std) = &self.std {
            self.sq_sum_normalised += normalised_square_sum(delta, std)?;
        }
        self.elems += delta.numel() as f64;
        Ok(())
    }
}

/// Runs `attack` on `model` over `images`/`labels` in batches; `on_batch(done)` reports progress.
pub fn run_attack(
    model: &dyn DynamicModel,
    attack: &dyn Attack,
    images: &Tensor,
    labels: &Tensor,
    batch: i64,
    on_batch: &mut dyn FnMut(i64),
) -> Result<AttackOutcome> {
    run_attack_on(model, model, attack, images, labels, batch, on_batch)
}

/// Crafts on `craft` and measures on `model` (they differ for an oblivious attack on a
/// defended model: crafted on the bare model, measured behind the defense).
pub fn run_attack_on(
    craft: &dyn DynamicModel,
    model: &dyn DynamicModel,
    attack: &dyn Attack,
    images: &Tensor,
    labels: &Tensor,
    batch: i64,
    on_batch: &mut dyn FnMut(i64),
) -> Result<AttackOutcome> {
    attack.check_model(craft)?;
    check_budget(attack)?;
    if batch < 1 {
        return Err(dynrobust_core::Error::config("batch", format!("{batch}: expected ≥ 1")));
    }
    let n = images.size()[0];
    if n == 0 || labels.size() != [n] {
        return Err(dynrobust_core::Error::config("images", format!("{n} images with labels {:?}: expected at least one image and one label per image", labels.size())));
    }
    dynrobust_core::check_model_labels(model, labels)?;
    let mut acc = Acc { std: model.input_std(), ..Acc::default() };
    let mut advs = Vec::new();
    let mut seconds = 0.0;
    let mut rapl: std::result::Result<f64, String> = Ok(0.0);
    let _ = attack.take_tally(); // count this run only
    let counted = Counted::new(craft);
    for start in (0..n).step_by(batch as usize) {
        let len = batch.min(n - start);
        let (x, y) = (images.narrow(0, start, len), labels.narrow(0, start, len));
        let t0 = Instant::now();
        let (x_adv, joules) = measure_rapl(|| attack.perturb(&counted, &x, &y));
        let x_adv = x_adv?.detach();
        seconds += t0.elapsed().as_secs_f64();
        rapl = match (rapl, joules) {
            (Ok(a), Ok(b)) => Ok(a + b),
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        acc.add_perturbation(&(&x_adv - &x))?;
        let clean = model.forward_trace(&x, Pass::Sparse)?;
        let adv = model.forward_trace(&x_adv, Pass::Sparse)?;
        acc.traces.push((clean, adv));
        acc.labels.push(y);
        advs.push(x_adv);
        on_batch(start + len);
    }
    let (mut record, per_sample) = summarise(model, attack, &acc, n, seconds, rapl);
    record.tally = attack.take_tally();
    let (forward, gradient) = counted.count().per_image(n);
    (record.forward_passes, record.gradient_passes) = (Some(forward), Some(gradient));
    Ok(AttackOutcome { record, per_sample, x_adv: Tensor::cat(&advs, 0) })
}

fn cat(ts: impl Iterator<Item = Tensor>) -> Tensor {
    Tensor::cat(&ts.collect::<Vec<_>>(), 0)
}

fn to_vec<T: tch::kind::Element>(t: &Tensor) -> Vec<T> {
    let flat = t.flatten(0, -1).to_kind(T::KIND);
    let mut out = vec![T::ZERO; flat.numel()];
    let len = out.len();
    flat.copy_data(&mut out, len);
    out
}

fn summarise(model: &dyn DynamicModel, attack: &dyn Attack, acc: &Acc, n: i64, seconds: f64, rapl: std::result::Result<f64, String>) -> (AttackRecord, PerSample) {
    let labels = cat(acc.labels.iter().map(|t| t.shallow_clone()));
    let side = |pick: fn(&(Trace, Trace)) -> &Trace| {
        let logits = cat(acc.traces.iter().map(|p| pick(p).logits.shallow_clone()));
        let cost = cat(acc.traces.iter().map(|p| cost_of(pick(p), model)));
        let executed = cat(acc.traces.iter().map(|p| pick(p).executed.shallow_clone()));
        let exits = acc.traces[0].0.exit_index.as_ref().map(|_| cat(acc.traces.iter().map(|p| pick(p).exit_index.as_ref().expect("exit index").shallow_clone())));
        let gates: Vec<Tensor> = (0..pick(&acc.traces[0]).gate_probs.len()).map(|g| cat(acc.traces.iter().map(|p| pick(p).gate_probs[g].shallow_clone()))).collect();
        (correct(&logits, &labels), cost, executed, exits, gates)
    };
    let (clean_ok, clean_cost, clean_exec, clean_exits, clean_gates) = side(|p| &p.0);
    let (adv_ok, adv_cost, adv_exec, adv_exits, adv_gates) = side(|p| &p.1);
    let mean = |t: &Tensor| t.to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
    let energy = EnergyModel::default();
    let exits_of = |e: &Option<Tensor>| match (e, model.family()) {
        (Some(e), dynrobust_core::Family::EarlyExit { exits, .. }) => Some(exit_histogram(e, exits)),
        _ => None,
    };
    let (clean_hist, adv_hist) = (exits_of(&clean_exits), exits_of(&adv_exits));
    let efficacy = |h: &Option<Vec<i64>>| Some(efficacy_auc(h.as_ref()?, &model.exit_costs()?));
    let (clean_cost_mean, adv_cost_mean) = (mean(&clean_cost), mean(&adv_cost));
    let budget = attack.budget();
    let record = AttackRecord {
        model: model.name(),
        attack: attack.name().to_string(),
        goal: attack.goal(),
        eps: budget.map(|b| b.0),
        norm: budget.map(|b| b.1),
        n,
        clean_acc: mean(&clean_ok),
        adv_acc: mean(&adv_ok),
        fooled_rate: fooled_rate(&clean_ok, &adv_ok),
        clean_cost: clean_cost_mean,
        adv_cost: adv_cost_mean,
        recovery: recovery(clean_cost_mean, adv_cost_mean),
        blocks_switched_on: blocks_switched_on(&clean_exec, &adv_exec, model.units()),
        recovery_blocks: block_recovery(&clean_exec, &adv_exec, model.units()),
        l2_mean: mean(&cat(acc.l2.iter().map(|t| t.shallow_clone()))),
        linf_max: acc.linf,
        mse: acc.sq_sum / acc.elems.max(1.0),
        mse_normalised: acc.std.as_ref().map(|_| acc.sq_sum_normalised / acc.elems.max(1.0)),
        seconds,
        iterations: attack.iterations(),
        forward_passes: None,
        gradient_passes: None,
        clean_efficacy: efficacy(&clean_hist),
        adv_efficacy: efficacy(&adv_hist),
        clean_exit_hist: clean_hist,
        adv_exit_hist: adv_hist,
        clean_gate_rates: (!clean_gates.is_empty()).then(|| gate_rates(&clean_gates)),
        adv_gate_rates: (!adv_gates.is_empty()).then(|| gate_rates(&adv_gates)),
        clean_energy_j: mean(&energy.joules(&clean_exec, model.units())),
        adv_energy_j: mean(&energy.joules(&adv_exec, model.units())),
        rapl_attack_j: rapl.as_ref().ok().copied(),
        rapl_note: rapl.err(),
        tally: None,
        config: attack.config_json(),
    };
    let per_sample = PerSample {
        clean_cost: to_vec(&clean_cost),
        adv_cost: to_vec(&adv_cost),
        clean_correct: to_vec::<bool>(&clean_ok),
        adv_correct: to_vec::<bool>(&adv_ok),
        clean_exit: clean_exits.map(|e| to_vec(&e)).unwrap_or_default(),
        adv_exit: adv_exits.map(|e| to_vec(&e)).unwrap_or_default(),
    };
    (record, per_sample)
}

/// Σ (δ/σ_c)² over a batch of perturbations `[B,C,H,W]`, σ one value per channel (or one for
/// all channels).
fn normalised_square_sum(delta: &Tensor, std: &[f64]) -> Result<f64> {
    let channels = delta.size().get(1).copied().unwrap_or(1);
    if std.len() != 1 && std.len() as i64 != channels {
        return Err(dynrobust_core::Error::config("input_std", format!("{} values for {channels} input channels", std.len())));
    }
    let inv: Vec<f64> = std.iter().map(|s| 1.0 / s).collect();
    let scale = crate::tanh_box::per_channel(&inv, delta.device());
    Ok((delta * scale).square().sum(Kind::Double).double_value(&[]))
}

/// An L∞ budget above 1 spans the whole [0, 1] pixel box: not a perturbation budget, most
/// likely 8 written for 8/255.
pub fn check_budget(attack: &dyn Attack) -> Result<()> {
    match attack.budget() {
        Some((eps, dynrobust_core::attack::Norm::Linf)) if eps > 1.0 => Err(dynrobust_core::Error::config(
            "eps",
            format!("{eps}: an L∞ budget above 1 covers the whole [0, 1] pixel range; expected ≤ 1 (8/255 is written \"8/255\")"),
        )),
        _ => Ok(()),
    }
}
