//! Training-time defenses: fine-tune a committed checkpoint with adversarial examples crafted
//! on the fly, and write a new checkpoint with its sidecar.
//!
//! Recipes (spec §7.1):
//! - `pgd-at` (Madry et al., ICLR 2018), any family: the family's own loss on the clean batch
//!   plus the task loss on PGD-L∞ examples (SDN: Σ_i CE(z_i(x_adv)) over the ICs, IC-only as in
//!   DeepSloth's `sdn_ic_only_step_adv`).
//! - `deepsloth-at` (Hong et al., ICLR 2021, `'same_logits'`), SDN: clean Σ_i CE(z_i(x), y) plus
//!   Σ_i H_soft(z_i(x), z_i(x_adv)) with x_adv from DeepSloth L∞ (ε 0.03125, step 0.002,
//!   30 iterations by default).
//! - `mixs` (DeepSloth's), SDN: clean Σ_i CE(z_i(x), y) plus Σ_i CE(z_i(x_pgd), y) and
//!   Σ_i CE(z_i(x_sloth), y) — PGD-L∞ and DeepSloth L∞ examples, both with the true labels
//!   (`'same_output'`), IC-only.
//! - `slowdown-at`, gated: CE and the target-rate loss on the clean batch and on
//!   GradMDM/ILFO examples, so the gates keep their rate on attacked inputs.
//! - `gate-consistency`, gated: task loss + λ·mean Σ_j relu(g_j(x_adv) − τ)·[g_j(x) < τ]: a
//!   penalty on gates that are off on x but switched on by the attack. (The spec writes
//!   relu(τ − g_j(x_adv)), which penalises gates being *off* on x_adv — the opposite of its own
//!   words; we implement the words.)
//! - `cost-cap`, gated: task loss + λ·mean relu(ĉ(x_adv) − ĉ(x)) with the gate cost
//!   ĉ = Σ_j g_j·MACs_j / static MACs over the straight-through gates g_j (the hard 0/1
//!   decisions in value — AIG's Gumbel draws in training — with the soft probabilities'
//!   gradient), so the penalty acts on batches whose attacked *executed* cost exceeds the
//!   clean one; ĉ(x) is not detached, as the spec writes it.
//!
//! On the SDN every recipe is DeepSloth's stage 2 only: the internal classifiers are trained
//! on a frozen backbone. DeepSloth first adversarially trains the backbone itself (stage 1,
//! PGD-AT ε 8/255, 10 steps of 2/255) and trains the ICs on that AT-CNN. By default the
//! backbone (and so the final head) stays the SDN's own, so a sample an attack pushes to the
//! final head is classified exactly as on the undefended SDN; `dynrobust defend --backbone DIR`
//! first swaps in a static checkpoint's backbone and head (stage 1 made by `pgd-at` on the
//! static model: the committed `static-pgd-at`, with `sdn-atcnn-*` trained on it).
//!
//! In gate-consistency g_j are the soft gate probabilities (τ thresholds them; `--tau`). The
//! crafting attack's random start is reseeded per batch from the config's seed
//! ([`reseeded_attack`]); the committed `*-pgd-at`, `sdn-deepsloth-at` and `sdn-mixs`
//! checkpoints were trained so (their sidecars' loss text says "reseeded per batch"), the
//! gate-consistency ones at τ = 0.5, where the penalty on soft probabilities has the same
//! gradient as the earlier one on hard decisions.


use dynrobust_core::data::Dataset;
use dynrobust_core::{Error, Result, UnitKind};
use dynrobust_models::train::{optimise, target_rate_loss, Schedule, TrainReport};
use dynrobust_models::{Mechanism, Net};
use serde::{Deserialize, Serialize};

use tch::{Kind, Tensor};

/// A training-time defense.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Recipe {
    PgdAt,
    DeepslothAt,
    /// DeepSloth's `mixs`: PGD and DeepSloth examples, both with the true labels (SDN).
    Mixs,
    SlowdownAt,
    GateConsistency,
    CostCap,
}

/// The recipe's name as the CLI and studies spell it (`gate-consistency`).
impl std::fmt::Display for Recipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Recipe::PgdAt => "pgd-at",
            Recipe::DeepslothAt => "deepsloth-at",
            Recipe::Mixs => "mixs",
            Recipe::SlowdownAt => "slowdown-at",
            Recipe::GateConsistency => "gate-consistency",
            Recipe::CostCap => "cost-cap",
        })
    }
}

impl Recipe {
    /// Parses a recipe name.
    pub fn parse(s: &str) -> Result<Self> {
        serde_json::from_value(serde_json::Value::String(s.into()))
            .map_err(|_| Error::config("recipe", format!("`{s}`: expected one of pgd-at, deepsloth-at, mixs, slowdown-at, gate-consistency, cost-cap")))
    }

    /// The attack used to craft training examples by default, with its overrides.
    pub fn default_attack(self) -> (&'static str, serde_json::Value) {
        match self {
            Recipe::PgdAt | Recipe::Mixs => ("pgd-linf", serde_json::json!({ "eps": 8.0 / 255.0, "steps": 10 })),
            Recipe::DeepslothAt => ("deepsloth", serde_json::json!({ "eps": 0.03125, "steps": 30, "step_size": 0.002 })),
            Recipe::SlowdownAt | Recipe::GateConsistency | Recipe::CostCap => {
                ("gradmdm", serde_json::json!({ "mode": "fixed", "eps": 8.0 / 255.0, "iterations": 10, "warmup": 2 }))
            }
        }
    }

    fn check(self, mechanism: &Mechanism) -> Result<()> {
        let ok = match self {
            Recipe::PgdAt => true,
            Recipe::DeepslothAt | Recipe::Mixs => matches!(mechanism, Mechanism::Sdn { .. }),
            Recipe::SlowdownAt | Recipe::GateConsistency | Recipe::CostCap => matches!(mechanism, Mechanism::Gated { .. } | Mechanism::Skipnet { .. }),
        };
        if ok {
            Ok(())
        } else {
            Err(Error::config("recipe", format!("`{self}` does not apply to a `{}` model (deepsloth-at, mixs: sdn; slowdown-at, gate-consistency, cost-cap: gated or skipnet)", mechanism.kind_name())))
        }
    }
}

/// Config of a training-time defense run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefendConfig {
    pub recipe: Recipe,
    /// Epochs over the training subset.
    pub epochs: i64,
    pub batch_size: i64,
    /// Peak learning rate (Adam, one-cycle).
    pub lr: f64,
    /// Weight λ of the regulariser (gate-consistency, cost-cap) or of the target-rate loss.
    pub weight: f64,
    /// Gate threshold τ (gate-consistency).
    pub tau: f64,
    /// The attack crafting training examples (registry name) and its overrides.
    pub attack: String,
    pub attack_params: serde_json::Value,
    pub seed: u64,
}

impl DefendConfig {
    /// Defaults for `recipe` on a model with `mechanism`.
    /// The peak learning rate is DeepSloth's Adam 1e-3 for every recipe on an SDN — each trains
    /// the internal classifiers only, as `model_funcs.py::sdn_ic_only_step_adv` does for its
    /// `PGD`, `ours` and `mixs` modes — and 5e-4 for the gated and recurrent-gate models, whose
    /// recipes fine-tune the backbone and are not the DeepSloth code's.
    pub fn for_recipe(recipe: Recipe, mechanism: &Mechanism) -> Self {
        let (attack, attack_params) = recipe.default_attack();
        let lr = match mechanism {
            Mechanism::Sdn { .. } => 1e-3,
            _ => 5e-4,
        };
        DefendConfig { recipe, epochs: 1, batch_size: 128, lr, weight: 5.0, tau: 0.5, attack: attack.into(), attack_params, seed: 0 }
    }

    /// Its epochs, batch size, learning rate and seed.
    pub fn schedule(&self) -> Schedule {
        Schedule { epochs: self.epochs, batch_size: self.batch_size, lr: self.lr, seed: self.seed }
    }

    /// Checks every field.
    pub fn validated(self) -> Result<Self> {
        self.schedule().check()?;
        if !(self.weight >= 0.0 && self.weight.is_finite()) {
            return Err(Error::config("weight", format!("{}: expected a finite value ≥ 0", self.weight)));
        }
        if !(self.tau > 0.0 && self.tau < 1.0) {
            return Err(Error::config("tau", format!("{}: expected a value in (0, 1)", self.tau)));
        }
        Ok(self)
    }
}

/// What a defense run did.
#[derive(Debug, Clone)]
pub struct DefendReport {
    /// Losses and wall time of the optimisation.
    pub run: TrainReport,
    /// The schedule it ran with.
    pub schedule: Schedule,
    /// Words for the sidecar's `loss` field.
    pub loss: String,
}

/// Fine-tunes `net` in place with `cfg.recipe` on `data`.
pub fn defend(net: &mut Net, data: &Dataset, cfg: &DefendConfig) -> Result<DefendReport> {
    let cfg = cfg.clone().validated()?;
    let mechanism = net.config().mechanism.clone();
    let attack = crafting_attack(net, &cfg)?;
    dynrobust_core::attack::prepare_fit(&*attack, |n| Ok(data.take(n)))?;
    let ic_only = matches!(mechanism, Mechanism::Sdn { .. });
    let schedule = cfg.schedule();
    // mixs' second term: DeepSloth L∞ examples at the authors' settings
    let sloth = match cfg.recipe {
        Recipe::Mixs => {
            let (name, params) = Recipe::DeepslothAt.default_attack();
            Some((name, dynrobust_attacks::registry::build(name, &params)?))
        }
        _ => None,
    };
    let mut batch = 0u64;
    let run = optimise(net, data, &schedule, &format!("defend {}", cfg.recipe), |net, x, y| {
        let x_adv = craft(&cfg.attack, cfg.seed, &*attack, batch, (net, x, y))?;
        let x_sloth = sloth.as_ref().map(|(name, a)| craft(name, cfg.seed ^ 0x5105, &**a, batch, (net, x, y))).transpose()?;
        batch += 1;
        Ok(step_loss(net, &mechanism, &cfg, (x, &x_adv, x_sloth.as_ref()), y, ic_only))
    })?;
    Ok(DefendReport { run, schedule, loss: describe(&cfg) })
}

/// The attack that crafts `cfg`'s training examples for `net`, once the recipe is checked to
/// apply to `net`'s family and the attack to `net` — what `defend` refuses, so a caller can
/// check it before loading data or creating an output directory.
pub fn crafting_attack(net: &Net, cfg: &DefendConfig) -> Result<Box<dyn dynrobust_core::attack::Attack>> {
    cfg.recipe.check(&net.config().mechanism)?;
    let attack = dynrobust_attacks::registry::build(&cfg.attack, &cfg.attack_params)?;
    attack.check_model(net)?;
    Ok(attack)
}

/// For an attack with a seeded random start (PGD, DeepSloth, the mechanism attack): a copy
/// whose seed is drawn from `cfg.seed` and the batch index, so every training batch starts
/// from fresh noise, as Madry et al.'s adversarial training does. (PGD, DeepSloth and the
/// mechanism attack also mix their seed with the batch's pixels; APGD, FAB and Square re-seed
/// at every call, so for them one instance would give every batch the same noise.) `None`
/// for an attack without a seed, and for a universal one.
pub fn reseeded_attack(cfg: &DefendConfig, attack: &dyn dynrobust_core::attack::Attack, batch: u64) -> Result<Option<Box<dyn dynrobust_core::attack::Attack>>> {
    reseeded(&cfg.attack, cfg.seed, attack, batch)
}

/// `attack`'s examples (detached) for training batch `batch`: from a copy reseeded for the
/// batch ([`reseeded`]) when the attack has a seeded random start, else from `attack`.
fn craft(name: &str, seed: u64, attack: &dyn dynrobust_core::attack::Attack, batch: u64, (net, x, y): (&Net, &Tensor, &Tensor)) -> Result<Tensor> {
    let x_adv = match reseeded(name, seed, attack, batch)? {
        Some(fresh) => fresh.perturb(net, x, y)?,
        None => attack.perturb(net, x, y)?,
    };
    Ok(x_adv.detach())
}

/// [`reseeded_attack`] for the registry attack `name` with base seed `seed`.
fn reseeded(name: &str, seed: u64, attack: &dyn dynrobust_core::attack::Attack, batch: u64) -> Result<Option<Box<dyn dynrobust_core::attack::Attack>>> {
    let serde_json::Value::Object(mut params) = attack.config_json() else { return Ok(None) };
    // a universal perturbation is fitted once (on the training images it was handed) and kept
    if !params.contains_key("seed") || !attack.batch_independent() {
        return Ok(None);
    }
    let seed = seed.wrapping_mul(1_000_003).wrapping_add(batch);
    params.insert("seed".into(), seed.into());
    Ok(Some(dynrobust_attacks::registry::build(name, &serde_json::Value::Object(params))?))
}

fn describe(cfg: &DefendConfig) -> String {
    let base = match cfg.recipe {
        Recipe::PgdAt => "family loss on x + task loss on x_adv (PGD adversarial training)".to_string(),
        Recipe::DeepslothAt => "Σ_i CE(z_i(x), y) + Σ_i H_soft(z_i(x), z_i(x_adv)) (DeepSloth-AT, 'same_logits'), IC-only".to_string(),
        Recipe::Mixs => "Σ_i CE(z_i(x), y) + Σ_i CE(z_i(x_pgd), y) + Σ_i CE(z_i(x_sloth), y) (DeepSloth's 'mixs', x_sloth from DeepSloth L∞ 8/256, 30 × 0.002), IC-only".to_string(),
        Recipe::SlowdownAt => format!("CE(x) + CE(x_adv) + {}·(rate(x) + rate(x_adv)) (slowdown adversarial training)", cfg.weight),
        Recipe::GateConsistency => format!("CE(x) + {w}·rate(x) + {w}·mean Σ_j relu(g_j(x_adv) − {t})·[g_j(x) < {t}] (gate consistency)", w = cfg.weight, t = cfg.tau),
        Recipe::CostCap => format!("CE(x) + {w}·rate(x) + {w}·mean relu(ĉ(x_adv) − ĉ(x)) (cost cap, ĉ expected cost)", w = cfg.weight),
    };
    format!("{base}; x_adv from {} {} (random starts reseeded per batch)", cfg.attack, cfg.attack_params)
}

/// One batch's loss; `inputs` = (clean, attacked, mixs' DeepSloth examples).
fn step_loss(net: &Net, mechanism: &Mechanism, cfg: &DefendConfig, inputs: (&Tensor, &Tensor, Option<&Tensor>), y: &Tensor, ic_only: bool) -> Tensor {
    let (x, x_adv, x_sloth) = inputs;
    let gumbel = matches!(mechanism, Mechanism::Gated { .. });
    let clean = net.forward_train(x, !ic_only, gumbel);
    let adv = net.forward_train(x_adv, !ic_only, gumbel);
    let target = match mechanism {
        Mechanism::Gated { target_rate } | Mechanism::Skipnet { target_rate } => *target_rate,
        _ => 0.0,
    };
    let ce_sum = |zs: &[Tensor]| zs.iter().map(|z| z.cross_entropy_for_logits(y)).sum::<Tensor>();
    match (cfg.recipe, mechanism) {
        (Recipe::PgdAt, Mechanism::Static) => adv.logits.cross_entropy_for_logits(y),
        (Recipe::PgdAt, Mechanism::Sdn { .. }) => ce_sum(&clean.exit_logits) + ce_sum(&adv.exit_logits),
        (Recipe::Mixs, _) => {
            let sloth = x_sloth.map(|xs| ce_sum(&net.forward_train(xs, !ic_only, gumbel).exit_logits));
            ce_sum(&clean.exit_logits) + ce_sum(&adv.exit_logits) + sloth.unwrap_or_else(|| Tensor::zeros([], (Kind::Float, x.device())))
        }
        (Recipe::DeepslothAt, _) => {
            let soft: Tensor = clean.exit_logits.iter().zip(&adv.exit_logits).map(|(zc, za)| soft_ce(zc, za)).sum();
            ce_sum(&clean.exit_logits) + soft
        }
        (Recipe::PgdAt, _) => {
            clean.logits.cross_entropy_for_logits(y) + adv.logits.cross_entropy_for_logits(y) + target_rate_loss(&clean.gates, target) * cfg.weight
        }
        (Recipe::SlowdownAt, _) => {
            clean.logits.cross_entropy_for_logits(y)
                + adv.logits.cross_entropy_for_logits(y)
                + (target_rate_loss(&clean.gates, target) + target_rate_loss(&adv.gates, target)) * cfg.weight
        }
        (Recipe::GateConsistency, _) => {
            let task = clean.logits.cross_entropy_for_logits(y) + target_rate_loss(&clean.gates, target) * cfg.weight;
            task + gate_flip_penalty(&clean.gate_probs, &adv.gate_probs, cfg.tau) * cfg.weight
        }
        (Recipe::CostCap, _) => {
            let task = clean.logits.cross_entropy_for_logits(y) + target_rate_loss(&clean.gates, target) * cfg.weight;
            let weights = gated_block_weights(net);
            let over = (expected_cost(&adv.gates, &weights) - expected_cost(&clean.gates, &weights)).relu().mean(Kind::Float);
            task + over * cfg.weight
        }
    }
}

/// DeepSloth's `H_soft(a, b) = −(1/B)·Σ softmax(b)·log softmax(a)`, both arguments with gradients.
fn soft_ce(a: &Tensor, b: &Tensor) -> Tensor {
    let batch = a.size()[0] as f64;
    -(b.softmax(-1, Kind::Float) * a.log_softmax(-1, Kind::Float)).sum(Kind::Float) / batch
}

/// Mean over samples of Σ_j relu(g_j(x_adv) − τ)·[g_j(x) < τ] on the soft gate probabilities
/// `g` (one `[B]` per gate), so τ is a threshold on them. (It once read the straight-through
/// decisions, which are 0 or 1 in value, so τ only scaled the logged loss; at the default
/// τ = 0.5 the gradient is the same either way — decision = [p > 0.5] — so the committed
/// gate-consistency checkpoints, trained at 0.5, are what this trains.)
pub fn gate_flip_penalty(clean: &[Tensor], adv: &[Tensor], tau: f64) -> Tensor {
    let terms: Vec<Tensor> = clean.iter().zip(adv).map(|(gc, ga)| (ga - tau).relu() * gc.detach().lt(tau).to_kind(Kind::Float)).collect();
    Tensor::stack(&terms, 1).sum_dim_intlist(&[1i64][..], false, Kind::Float).mean(Kind::Float)
}

/// MACs of each gated block over the static MACs, in gate order.
fn gated_block_weights(net: &Net) -> Vec<f64> {
    use dynrobust_core::DynamicModel;
    let gates = net.units().iter().filter(|u| u.kind == UnitKind::Gate).count();
    dynrobust_attacks::losses::gated_block_shares(net, gates).1
}

/// Differentiable expected cost `[B]` of the gated blocks: Σ_j g_j·w_j.
pub fn expected_cost(gates: &[Tensor], weights: &[f64]) -> Tensor {
    gates.iter().zip(weights).map(|(g, w)| g * *w).sum::<Tensor>()
}
