//! An ensemble of accuracy attacks run one after another on the samples still classified
//! correctly, the way AutoAttack counts robust accuracy (Croce & Hein, ICML 2020): a sample is
//! robust only if every member fails on it. The default members are AutoAttack's standard
//! version: APGD-CE, APGD-T (targeted DLR, 9 target classes) and FAB-T (9 target classes), all
//! on the deployed prediction (the exit an early-exit model answers with), then the black-box
//! Square Attack (5,000 queries) — two white-box losses, a boundary search and a
//! gradient-free search, so a defense that masks gradients is still caught.
//!
//! `version` picks AutoAttack's other presets (`autoattack.py`, `set_version`): `plus` —
//! APGD-CE and APGD-DLR with 5 restarts each, FAB with 5 restarts, Square (5,000 queries),
//! APGD-T, FAB-T; `rand`, for randomised defenses — APGD-CE and APGD-DLR. (Every member in
//! every version averages its gradient over the defense's own EOT draws, its `eot` setting; in
//! AutoAttack only `rand` does, with 20.) `attacks` lists members by hand instead.
//!
//! As in AutoAttack, only the samples classified correctly (deployed prediction, sparse pass)
//! are attacked; the others come back unchanged. Per attacked sample the output is the first
//! member's example that fools the deployed model, else the first member's own output for it
//! (APGD: its highest-loss point — the presets start with APGD-CE; FAB: the clean image;
//! Square: its lowest-margin point).
//!
//! ```toml
//! [[attacks]]
//! name = "ensemble"
//! params = { attacks = [{ name = "apgd-ce" }, { name = "square", params = { queries = 1000 } }] }
//!
//! [[attacks]]
//! name = "ensemble"
//! label = "autoattack-plus"
//! params = { version = "plus" }
//! ```
//!
//! # Differences from AutoAttack's code
//!
//! Where dynrobust departs on purpose from fra31/auto-attack (`autoattack.py`,
//! `autopgd_base.py`, `fab_base.py` / `fab_pt.py`, `square.py`); what is not listed follows it.
//!
//! - **Never-fooled samples (ensemble):** `run_standard_evaluation` returns the clean image; here
//!   the first member's own example (in the presets APGD-CE's highest-loss point), so a cost
//!   measurement on the attacked input sees what the attack reached; the accuracy is the same.
//! - **Never-fooled samples (APGD):** `perturb` keeps the clean image; here the first run's
//!   highest-loss iterate, for the same reason. (FAB returns the clean image, as AutoAttack.)
//! - **Never-fooled samples (Square):** `perturb` returns the clean image; here the lowest-margin
//!   point, for the same reason (same verdict, other perturbation statistics).
//! - **EOT (APGD, FAB):** AutoAttack averages APGD's gradient over 20 draws in `rand` only
//!   (`eot_iter = 20`, else 1) and FAB's never; here both average over the model's
//!   `eot_samples()` (the defense's `eot`, 1 when deterministic) in every version — FAB its
//!   logits and gradients — as every adaptive attack here does; `rand` differs only in members.
//! - **Which logits (APGD, FAB; dynamic models):** AutoAttack attacks and predicts with one
//!   `forward`; here the presets set `loss = "deployed"` (the exit an early-exit model's rule
//!   chose, differentiated through the dense pass) and FAB's and the ensemble's verdicts read the
//!   sparse pass (real skipping), so each attack works on the decision accuracy is measured on.
//!   Listed by hand, APGD reads the final head by default (`loss = "final"`, as PGD), FAB the
//!   deployed logits.
//! - **Hand-listed members (`attacks`):** AutoAttack's `custom` version keeps its constructor's
//!   settings (APGD and FAB 5 restarts, FAB-T forced to 1, Square `resc_schedule=False`); here
//!   each member is built like the standalone attack: 1 restart unless set, a `fab-t` keeps its
//!   `restarts`, and `square` keeps `square.py`'s `rescale_schedule = true` unless set (the
//!   presets set `false`, as `autoattack.py` does).
//! - **Too many targets (APGD-T, FAB-T):** AutoAttack's `check_n_classes` only warns, then its
//!   target indexing fails; here `targets` above the model's wrong classes is a config error
//!   naming the field (`check_target_count`), not a crash and not a silent clamp.
//! - **Seeds (APGD, FAB, Square):** AutoAttack re-seeds torch's global generator at every
//!   `perturb` (from the clock when `seed=None`); here each re-seeds its own SplitMix64
//!   `SeededRng` from the ensemble's `seed` (0 unless set), so a cell is reproducible whatever runs
//!   beside it — but one seed does not give AutoAttack's draws.
//! - **Batches (ensemble):** AutoAttack runs each attack over every still-robust point of the
//!   data set, re-batched by `bs`; here the whole ensemble runs inside each evaluation batch, its
//!   members on that batch's still-robust samples (an `Attack` perturbs one batch): the counting
//!   is the same, but the re-seeded random starts fall on other samples.
//! - **Norms (ensemble):** AutoAttack runs L∞, L2 and L1 (L1 with `use_largereps`); here every
//!   member must be an L∞ accuracy attack (Square is L∞ only; APGD and FAB take L2 on their own;
//!   there is no L1).
//! - **Samples misclassified clean (APGD, Square on their own):** AutoAttack's `perturb` returns
//!   them unchanged; standalone here they are attacked like the others (the verdict is the
//!   same: they count as not robust). FAB, and the ensemble before any member, skip them.
//! - **Sanity checks (ensemble):** `run_standard_evaluation` logs `checks.py`'s warnings
//!   (randomised or dynamic defense, probability outputs, Square beating the rest); the ensemble
//!   logs none: dynrobust raises its sanity flags per result (zero or non-finite gradients) and
//!   in the report (a gradient-free `square` cell beating a white-box one).

use dynrobust_core::attack::{check_eps, check_requirements, Attack, Goal, Norm, Requirements};
use dynrobust_core::{DynamicModel, Error, Pass, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::cell::{Cell, RefCell};
use tch::{Kind, Tensor};

/// One member: a registry attack name and its overrides (its `eps` and `seed` are the
/// ensemble's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub name: String,
    #[serde(default)]
    pub params: Value,
}

/// AutoAttack's presets (`autoattack.py`, `set_version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    /// APGD-CE, APGD-T, FAB-T, Square (5,000 queries).
    Standard,
    /// APGD-CE and APGD-DLR (5 restarts each), FAB (5 restarts), Square, APGD-T, FAB-T.
    Plus,
    /// APGD-CE and APGD-DLR, for randomised defenses (EOT over the defense's draws).
    Rand,
}

impl Version {
    /// The preset's members, all on the deployed prediction.
    pub fn members(self) -> Vec<Member> {
        let member = |name: &str, params: Value| Member { name: name.into(), params };
        let deployed = |extra: Value| {
            let mut p = json!({ "loss": "deployed" });
            if let (Some(map), Some(more)) = (p.as_object_mut(), extra.as_object()) {
                map.extend(more.clone());
            }
            p
        };
        match self {
            Version::Standard => vec![
                member("apgd-ce", deployed(json!({}))),
                member("apgd-t", deployed(json!({}))),
                member("fab-t", deployed(json!({}))),
                member("square", json!({ "queries": 5000, "rescale_schedule": false })),
            ],
            Version::Plus => vec![
                member("apgd-ce", deployed(json!({ "restarts": 5 }))),
                member("apgd-dlr", deployed(json!({ "restarts": 5 }))),
                member("fab", deployed(json!({ "restarts": 5 }))),
                member("square", json!({ "queries": 5000, "rescale_schedule": false })),
                member("apgd-t", deployed(json!({}))),
                member("fab-t", deployed(json!({}))),
            ],
            Version::Rand => vec![member("apgd-ce", deployed(json!({}))), member("apgd-dlr", deployed(json!({})))],
        }
    }
}

/// Config of the ensemble.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EnsembleConfig {
    /// L∞ budget ε, shared by every member.
    pub eps: f64,
    /// Seed handed to every member that has one.
    pub seed: u64,
    /// One of AutoAttack's presets (`standard` when neither this nor `attacks` is set).
    #[serde(default)]
    pub version: Option<Version>,
    /// The members by hand, in the order they run (instead of a `version`).
    #[serde(default)]
    pub attacks: Option<Vec<Member>>,
}

impl Default for EnsembleConfig {
    fn default() -> Self {
        EnsembleConfig { eps: 8.0 / 255.0, seed: 0, version: None, attacks: None }
    }
}

impl EnsembleConfig {
    /// The members this config runs: its own list, or its version's (standard by default).
    pub fn members(&self) -> Result<Vec<Member>> {
        match (&self.attacks, self.version) {
            (Some(_), Some(_)) => Err(Error::config("version", "set `version` (a preset) or `attacks` (members by hand), not both")),
            (Some(list), None) => Ok(list.clone()),
            (None, version) => Ok(version.unwrap_or(Version::Standard).members()),
        }
    }
}

/// The ensemble.
pub struct Ensemble {
    cfg: EnsembleConfig,
    members: Vec<Box<dyn Attack>>,
    /// Since the last [`Attack::take_tally`]: images perturbed, those misclassified before any
    /// attack, and per member the samples it was the first to fool.
    seen: Cell<i64>,
    wrong_clean: Cell<i64>,
    fooled_by: RefCell<Vec<i64>>,
}

impl Ensemble {
    /// Builds every member through `build` (the registry), each with the ensemble's ε and seed;
    /// a member must be an L∞ accuracy attack.
    pub fn new(cfg: EnsembleConfig, build: impl Fn(&str, &Value) -> Result<Box<dyn Attack>>) -> Result<Self> {
        check_eps("eps", cfg.eps)?;
        let listed = cfg.members()?;
        if listed.is_empty() {
            return Err(Error::config("attacks", "no members: expected at least one accuracy attack"));
        }
        let mut members = Vec::new();
        for (i, m) in listed.iter().enumerate() {
            let field = |f: &str| format!("attacks[{i}].{f}");
            if m.name == "ensemble" {
                return Err(Error::config(field("name"), "an ensemble cannot contain an ensemble"));
            }
            let mut params = if m.params.is_null() { json!({}) } else { m.params.clone() };
            let map = params.as_object_mut().ok_or_else(|| Error::config(field("params"), "expected a table of parameters"))?;
            if map.contains_key("eps") || map.contains_key("seed") {
                return Err(Error::config(field("params"), "`eps` and `seed` are the ensemble's: set them on the ensemble"));
            }
            map.insert("eps".into(), json!(cfg.eps));
            if crate::registry::has_seed(&m.name) {
                map.insert("seed".into(), json!(cfg.seed));
            }
            let attack = build(&m.name, &params).map_err(|e| e.within(&format!("attacks[{i}]")))?;
            if attack.goal() != Goal::Accuracy || attack.budget().map(|b| b.1) != Some(Norm::Linf) {
                return Err(Error::config(field("name"), format!("`{}` is not an L∞ accuracy attack; an ensemble counts misclassified samples", m.name)));
            }
            members.push(attack);
        }
        let fooled_by = RefCell::new(vec![0; members.len()]);
        Ok(Ensemble { cfg, members, seen: Cell::new(0), wrong_clean: Cell::new(0), fooled_by })
    }
}

/// `[B]` bool: the deployed prediction (sparse pass) differs from `y`.
pub(crate) fn misclassified(model: &dyn DynamicModel, x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    Ok(model.forward_trace(x, Pass::Sparse)?.logits.argmax(1, false).ne_tensor(y))
}

impl Attack for Ensemble {
    fn name(&self) -> &'static str {
        "ensemble"
    }
    fn goal(&self) -> Goal {
        Goal::Accuracy
    }
    fn requirements(&self) -> Requirements {
        Requirements::default()
    }
    /// Refuses a model any member refuses (before any member runs), naming the member.
    fn check_model(&self, model: &dyn DynamicModel) -> Result<()> {
        check_requirements(self, model)?;
        self.members.iter().enumerate().try_for_each(|(i, m)| m.check_model(model).map_err(|e| e.within(&format!("attacks[{i}]"))))
    }
    fn config_json(&self) -> Value {
        let members: Vec<Value> = self.members.iter().map(|m| json!({ "name": m.name(), "config": m.config_json() })).collect();
        json!({ "eps": self.cfg.eps, "seed": self.cfg.seed, "version": self.cfg.version, "attacks": members })
    }
    fn budget(&self) -> Option<(f64, Norm)> {
        Some((self.cfg.eps, Norm::Linf))
    }
    /// Every member's iterations, summed (an upper bound: later members see fewer samples).
    fn iterations(&self) -> Option<usize> {
        Some(self.members.iter().filter_map(|m| m.iterations()).sum())
    }
    /// As AutoAttack's `run_standard_evaluation`: the samples misclassified clean are not
    /// attacked and come back unchanged; the others go through the members in turn.
    fn perturb(&self, model: &dyn DynamicModel, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let wrong_clean = misclassified(model, x, y)?;
        self.seen.set(self.seen.get() + x.size()[0]);
        self.wrong_clean.set(self.wrong_clean.get() + wrong_clean.sum(Kind::Int64).int64_value(&[]));
        let correct = wrong_clean.logical_not().nonzero().squeeze_dim(1);
        if correct.numel() == 0 {
            return Ok(x.copy());
        }
        let (xc, yc) = (x.index_select(0, &correct), y.index_select(0, &correct));
        let attacked = in_turn(&xc, self.members.len(), |i, todo| {
            let ys = yc.index_select(0, todo);
            let adv = self.members[i].perturb(model, &xc.index_select(0, todo), &ys).map_err(|e| e.within(&format!("attacks[{i}]")))?.detach();
            let fooled = misclassified(model, &adv, &ys)?;
            self.fooled_by.borrow_mut()[i] += fooled.sum(Kind::Int64).int64_value(&[]);
            Ok((adv, fooled))
        })?;
        Ok(tch::no_grad(|| x.index_copy(0, &correct, &attacked)))
    }
    /// `{"images": N, "misclassified_clean": K, "members": [{"name", "fooled", "robust_after"},
    /// …]}`: the samples wrong before any attack, then per member the samples it was the first
    /// to fool and the accuracy left after it — AutoAttack's "initial accuracy" and "robust
    /// accuracy after APGD-CE: …" lines (read through the sparse pass on the model the
    /// ensemble attacked).
    fn take_tally(&self) -> Option<Value> {
        let images = self.seen.replace(0);
        let wrong_clean = self.wrong_clean.replace(0);
        let fooled = std::mem::replace(&mut *self.fooled_by.borrow_mut(), vec![0; self.members.len()]);
        let mut left = images - wrong_clean;
        let members: Vec<Value> = self
            .members
            .iter()
            .zip(fooled)
            .map(|(m, k)| {
                left -= k;
                json!({ "name": m.name(), "fooled": k, "robust_after": left as f64 / images.max(1) as f64 })
            })
            .collect();
        Some(json!({ "images": images, "misclassified_clean": wrong_clean, "members": members }))
    }
}

/// Runs `attempts` attempts one after another, each on the samples of `x` that no earlier one
/// fooled: `attempt(i, todo)` gets the indices `[T]` of those samples and returns its examples
/// for them `[T,…]` and which of them fool `[T]` bool. Per sample the result is the first
/// fooling example, else the first attempt's own (whatever that attempt returns for it). The
/// ensemble's members and APGD's and FAB's targets × restarts run this way.
pub(crate) fn in_turn(x: &Tensor, attempts: usize, mut attempt: impl FnMut(usize, &Tensor) -> Result<(Tensor, Tensor)>) -> Result<Tensor> {
    let mut x_out = x.copy();
    let mut fooled = Tensor::zeros([x.size()[0]], (Kind::Bool, x.device()));
    for i in 0..attempts {
        let todo = fooled.logical_not().nonzero().squeeze_dim(1);
        if todo.numel() == 0 {
            break;
        }
        let (adv, now_fooled) = attempt(i, &todo)?;
        tch::no_grad(|| {
            let take = if i == 0 { now_fooled.ones_like() } else { now_fooled.shallow_clone() };
            x_out = x_out.index_copy(0, &todo, &adv.where_self(&take.view([-1, 1, 1, 1]), &x_out.index_select(0, &todo)));
            fooled = fooled.index_copy(0, &todo, &now_fooled);
        });
    }
    Ok(x_out.detach())
}
