//! The attack plugin protocol.
//!
//! An [`Attack`] takes a model (possibly a defended one — it only sees [`DynamicModel`]),
//! clean inputs in [0,1] and labels, and returns adversarial inputs in [0,1] of the same shape.
//! Its config is a serde struct that rejects unknown fields and is validated on construction.

use tch::Tensor;

use crate::error::{Error, Result};
use crate::protocol::{DynamicModel, Family};

/// What an attack is after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Goal {
    /// Raise the compute the model spends (slowdown / energy attacks).
    Energy,
    /// Make the model misclassify.
    Accuracy,
    /// Both at once (the dynamic-mechanism attack).
    Both,
}

/// What an attack requires of the model it attacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Requirements {
    /// Needs early exits (internal classifiers).
    pub exits: bool,
    /// Needs gates.
    pub gates: bool,
    /// Needs gates or exits (any dynamic mechanism).
    pub dynamic: bool,
}

/// Lp norm of a perturbation budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    /// L∞ (max absolute pixel change).
    Linf,
    /// L2 (Euclidean norm per sample).
    L2,
}

impl Norm {
    /// Parses `linf` / `l2`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "linf" | "l_inf" | "inf" => Ok(Norm::Linf),
            "l2" => Ok(Norm::L2),
            other => Err(Error::config("norm", format!("`{other}`: expected linf or l2"))),
        }
    }

    /// The norm's p, for [`per_sample_norm`] (∞ for L∞).
    pub fn p(self) -> f64 {
        match self {
            Norm::Linf => f64::INFINITY,
            Norm::L2 => 2.0,
        }
    }
}

/// `linf` / `l2`: the name configs and records use.
impl std::fmt::Display for Norm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Norm::Linf => "linf",
            Norm::L2 => "l2",
        })
    }
}

/// `energy` / `accuracy` / `both`: the name records use.
impl std::fmt::Display for Goal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Goal::Energy => "energy",
            Goal::Accuracy => "accuracy",
            Goal::Both => "both",
        })
    }
}

/// A white-box or transfer attack.
pub trait Attack {
    /// The registry name, e.g. `deepsloth`.
    fn name(&self) -> &'static str;
    /// What it is after.
    fn goal(&self) -> Goal;
    /// What it needs from the model.
    fn requirements(&self) -> Requirements;
    /// The full (validated) config, saved beside every result.
    fn config_json(&self) -> serde_json::Value;
    /// The budget (ε and its norm), if the attack has a hard one.
    fn budget(&self) -> Option<(f64, Norm)>;
    /// Crafts adversarial examples for a whole batch; output in [0,1], same shape as `x`.
    fn perturb(&self, model: &dyn DynamicModel, x: &Tensor, y: &Tensor) -> Result<Tensor>;

    /// Iterations the attack runs per batch (the metrics' `iterations`): by default its config's
    /// `steps` or `iterations` field ([`iterations_in`]).
    fn iterations(&self) -> Option<usize> {
        iterations_in(&self.config_json())
    }

    /// False when a batch's result depends on the batches perturbed before it (a universal
    /// perturbation fitted on the first batch and reused): such an attack's batches cannot be
    /// cached or replayed one by one.
    fn batch_independent(&self) -> bool {
        true
    }

    /// How many training images the attack fits on before it perturbs anything, if it fits on
    /// training data at all (DeepSloth's universal perturbation, fitted on the authors' first
    /// training batch); `i64::MAX` asks for the whole training split. Callers hand them over
    /// with [`Attack::set_fit_data`] before the first `perturb`; [`prepare_fit`] does both.
    fn fit_images(&self) -> Option<i64> {
        None
    }

    /// Hands over the training images asked for by [`Attack::fit_images`], with their labels
    /// (DeepSloth's class-universal perturbations are fitted one class at a time). The attack
    /// fits on them lazily, with the model of its first `perturb` call (the defended model for
    /// an adaptive attack, the surrogate for a transfer attack).
    fn set_fit_data(&self, _images: &Tensor, _labels: &Tensor) -> Result<()> {
        Ok(())
    }

    /// What the attack counted over the batches it perturbed since the last call, for attacks
    /// that learn more than their examples (the ensemble: how many samples each member
    /// fooled); the counts restart at zero. `None` for every other attack.
    fn take_tally(&self) -> Option<serde_json::Value> {
        None
    }

    /// Refuses models that lack what the attack needs, naming both (by default
    /// [`check_requirements`]; attacks with more needs add theirs).
    fn check_model(&self, model: &dyn DynamicModel) -> Result<()> {
        check_requirements(self, model)
    }
}

/// Refuses a model that lacks what `attack`'s [`Attack::requirements`] ask for (exits, gates,
/// any dynamic mechanism), naming both.
pub fn check_requirements(attack: &(impl Attack + ?Sized), model: &dyn DynamicModel) -> Result<()> {
    let req = attack.requirements();
    let family = model.family();
    let problem = if req.exits && !family.has_exits() {
        Some("needs early exits")
    } else if req.gates && !family.has_gates() {
        Some("needs gates")
    } else if req.dynamic && family == Family::Static {
        Some("needs a dynamic mechanism (gates or exits)")
    } else {
        None
    };
    match problem {
        Some(p) => Err(Error::config("model", format!("attack `{}` {p}, but model `{}` is {}", attack.name(), model.name(), family_words(&family)))),
        None => Ok(()),
    }
}

/// Loads the training images `attack` fits on (if it asks for any, through `load(n)`) and
/// hands them over; a no-op for every attack that does not fit on training data.
pub fn prepare_fit(attack: &dyn Attack, load: impl FnOnce(i64) -> Result<crate::data::Dataset>) -> Result<()> {
    match attack.fit_images() {
        Some(n) => {
            let data = load(n)?;
            attack.set_fit_data(&data.images, &data.labels)
        }
        None => Ok(()),
    }
}

fn family_words(f: &Family) -> &'static str {
    match f {
        Family::Static => "static (no gates, no exits)",
        Family::EarlyExit { .. } => "an early-exit model (no gates)",
        Family::Gated { .. } => "a gated model (no exits)",
    }
}

/// Validates a perturbation budget ε: finite and ≥ 0.
pub fn check_eps(field: &str, eps: f64) -> Result<()> {
    if eps.is_finite() && eps >= 0.0 {
        Ok(())
    } else {
        Err(Error::config(field, format!("{eps}: expected a finite value ≥ 0")))
    }
}

/// Validates a positive finite number.
pub fn check_positive(field: &str, v: f64) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(Error::config(field, format!("{v}: expected a finite value > 0")))
    }
}

/// The step size in force: `step_size`, else Madry et al.'s default 2.5·ε/steps.
pub fn step_in_force(step_size: Option<f64>, eps: f64, steps: usize) -> f64 {
    step_size.unwrap_or(2.5 * eps / steps as f64)
}

/// A step size as a saved config writes it: unset for a zero step (ε = 0), which a config
/// rebuilt from it would refuse.
pub fn saved_step(step: f64) -> Option<f64> {
    Some(step).filter(|a| *a > 0.0)
}

/// Validates a step count ≥ 1.
pub fn check_steps(field: &str, steps: usize) -> Result<()> {
    if steps >= 1 {
        Ok(())
    } else {
        Err(Error::config(field, "0: expected ≥ 1"))
    }
}

/// Per-sample Lp norm `[B]` of a `[B,…]` tensor.
pub fn per_sample_norm(t: &Tensor, p: f64) -> Tensor {
    t.flatten(1, -1).norm_scalaropt_dim(p, &[1i64][..], false)
}

/// Projects `x_adv` onto the ε-ball around `x` in `norm` and onto the [0,1] box.
pub fn project(x_adv: &Tensor, x: &Tensor, eps: f64, norm: Norm) -> Tensor {
    let delta = x_adv - x;
    let delta = match norm {
        Norm::Linf => delta.clamp(-eps, eps),
        Norm::L2 => {
            let n = per_sample_norm(&delta, 2.0).clamp_min(1e-12);
            let factor = (n.reciprocal() * eps).clamp_max(1.0);
            delta * factor.view([-1, 1, 1, 1])
        }
    };
    (x + delta).clamp(0.0, 1.0)
}

/// The `steps` or `iterations` field of an attack config (or of its `inner_config`, for an
/// attack that wraps another).
pub fn iterations_in(config: &serde_json::Value) -> Option<usize> {
    let c = config.get("inner_config").unwrap_or(config);
    c.get("steps").or_else(|| c.get("iterations")).and_then(serde_json::Value::as_u64).map(|n| n as usize)
}

/// Gradient of the scalar `loss(x)` with respect to `x` (x is detached first).
pub fn input_grad(x: &Tensor, loss: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<(Tensor, f64)> {
    let x = x.detach().set_requires_grad(true);
    let l = loss(&x)?;
    let value = l.double_value(&[]);
    let g = Tensor::f_run_backward(&[&l], &[&x], false, false)?.remove(0);
    Ok((g, value))
}

/// Mean of `k` draws of `sample()` (EOT: with a randomised model each call draws new
/// randomness; with `k = 1` this is one call). `T` is a tensor, or anything that adds and
/// divides by a scalar like one (FAB's linearised boundaries).
pub fn eot_average<T>(k: usize, mut sample: impl FnMut() -> Result<T>) -> Result<T>
where
    T: std::ops::Add<Output = T> + std::ops::Div<f64, Output = T>,
{
    let mut sum = sample()?;
    for _ in 1..k.max(1) {
        sum = sum + sample()?;
    }
    Ok(if k > 1 { sum / k as f64 } else { sum })
}

/// [`input_grad`] averaged over `k` evaluations of `loss` (EOT); the value is the last draw's.
pub fn input_grad_eot(k: usize, x: &Tensor, mut loss: impl FnMut(&Tensor) -> Result<Tensor>) -> Result<(Tensor, f64)> {
    let mut value = 0.0;
    let g = eot_average(k, || {
        let (g, v) = input_grad(x, &mut loss)?;
        value = v;
        Ok(g)
    })?;
    Ok((g, value))
}

/// Unit-norm direction per sample in `norm` (sign for L∞, g/‖g‖₂ for L2).
pub fn steepest(g: &Tensor, norm: Norm) -> Tensor {
    match norm {
        Norm::Linf => g.sign(),
        Norm::L2 => g / per_sample_norm(g, 2.0).clamp_min(1e-12).view([-1, 1, 1, 1]),
    }
}

/// Writes the [`Attack`] methods a wrapper hands on unchanged to the attack it wraps: inside an
/// `impl Attack for W`, `delegate_attack!(inner; name, goal, budget)` forwards those methods to
/// `self.inner` (a `Box<dyn Attack>`, `&dyn Attack` or any attack). The method names are any of
/// `name`, `goal`, `requirements`, `config_json`, `budget`, `iterations`, `batch_independent`,
/// `fit_images`, `set_fit_data` and `take_tally`; the wrapper writes `perturb` and whatever
/// it changes itself.
#[macro_export]
macro_rules! delegate_attack {
    ($inner:ident; $($method:ident),+ $(,)?) => {
        $( $crate::delegate_attack!(@one $inner $method); )+
    };
    (@one $inner:ident name) => {
        fn name(&self) -> &'static str { self.$inner.name() }
    };
    (@one $inner:ident goal) => {
        fn goal(&self) -> $crate::attack::Goal { self.$inner.goal() }
    };
    (@one $inner:ident requirements) => {
        fn requirements(&self) -> $crate::attack::Requirements { self.$inner.requirements() }
    };
    (@one $inner:ident config_json) => {
        fn config_json(&self) -> ::serde_json::Value { self.$inner.config_json() }
    };
    (@one $inner:ident budget) => {
        fn budget(&self) -> ::std::option::Option<(f64, $crate::attack::Norm)> { self.$inner.budget() }
    };
    (@one $inner:ident iterations) => {
        fn iterations(&self) -> ::std::option::Option<usize> { self.$inner.iterations() }
    };
    (@one $inner:ident batch_independent) => {
        fn batch_independent(&self) -> bool { self.$inner.batch_independent() }
    };
    (@one $inner:ident fit_images) => {
        fn fit_images(&self) -> ::std::option::Option<i64> { self.$inner.fit_images() }
    };
    (@one $inner:ident set_fit_data) => {
        fn set_fit_data(&self, images: &::tch::Tensor, labels: &::tch::Tensor) -> $crate::Result<()> { self.$inner.set_fit_data(images, labels) }
    };
    (@one $inner:ident take_tally) => {
        fn take_tally(&self) -> ::std::option::Option<::serde_json::Value> { self.$inner.take_tally() }
    };
}

#[cfg(test)]
mod tests {
    use super::{Goal, Norm};

    #[test]
    fn norms_goals_and_defense_kinds_display_as_configs_spell_them() {
        let serde_name = |v: serde_json::Value| v.as_str().unwrap().to_string();
        for norm in [Norm::Linf, Norm::L2] {
            assert_eq!(norm.to_string(), serde_name(serde_json::to_value(norm).unwrap()));
        }
        for goal in [Goal::Energy, Goal::Accuracy, Goal::Both] {
            assert_eq!(goal.to_string(), serde_name(serde_json::to_value(goal).unwrap()));
        }
        use crate::defense::DefenseKind;
        for kind in [DefenseKind::Transform, DefenseKind::Training, DefenseKind::Guard] {
            assert_eq!(kind.to_string(), serde_name(serde_json::to_value(kind).unwrap()));
        }
    }
}
