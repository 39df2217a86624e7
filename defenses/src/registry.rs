//! Defenses by name: the list `dynrobust list defenses` prints, and construction from a name
//! plus JSON params over the defaults (unknown fields refused with the field named; values
//! validated by each constructor).

use dynrobust_core::defense::{Adaptivity, DefenseKind, InputTransform};
use dynrobust_core::settings_doc::{setting_docs as docs, SettingDoc};
use dynrobust_core::{Error, Result};
use std::collections::BTreeMap;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::chain::{in_step, Chain, ChainParams, ChainStep};
use crate::denoiser::{Denoiser, DenoiserTransform};
use crate::guards::{BudgetConfig, MonitorConfig};
use crate::squeeze::SqueezeConfig;
use crate::transforms::{BitDepth, BitDepthConfig, Blur, BlurConfig, Jpeg, JpegConfig, Median, MedianConfig, Noise, NoiseConfig};

/// Name, kind and one-line description of every defense.
pub const DEFENSES: &[(&str, DefenseKind, &str)] = [
    ("none", DefenseKind::Transform, "no defense (the bare model)"),
    ("bitdepth", DefenseKind::Transform, "bit-depth reduction to `bits` (feature squeezing; DefQ-style quantization); BPDA"),
    ("median", DefenseKind::Transform, "k×k median filter (`kernel` 2, as feature squeezing, or odd 3–7); exact gradients"),
    ("blur", DefenseKind::Transform, "Gaussian blur (`sigma` px); exact gradients"),
    ("jpeg", DefenseKind::Transform, "JPEG re-encoding at `quality`; BPDA"),
    ("noise", DefenseKind::Transform, "additive Gaussian noise (`sigma`), randomised; EOT over `eot` draws"),
    ("denoiser", DefenseKind::Transform, "learned residual conv denoiser (`checkpoint`, from `dynrobust train-denoiser`); exact gradients, MACs counted"),
    ("chain", DefenseKind::Transform, "input transforms one after another (`steps = [{ name, params }, …]`); each differentiated its own way (BPDA only where needed)"),
    ("budget", DefenseKind::Guard, "compute budget cap: at most `max_blocks` residual branches per sample (worst case bounded)"),
    ("monitor", DefenseKind::Guard, "cost monitor (detector): flags inputs above the clean cost's `percentile`; reports TPR/FPR"),
    ("squeeze", DefenseKind::Guard, "feature squeezing (detector, Xu et al. NDSS 2018): flags inputs whose prediction or cost moves when squeezed (`bits`, `median`); TPR/FPR; adaptive `attacker` eot, fixed-point, best or penalty"),
    ("pgd-at", DefenseKind::Training, "PGD adversarial training (`dynrobust defend --recipe pgd-at`)"),
    ("deepsloth-at", DefenseKind::Training, "DeepSloth adversarial training, 'same_logits' (sdn)"),
    ("mixs", DefenseKind::Training, "DeepSloth's mixs: PGD and DeepSloth examples with the true labels (sdn)"),
    ("slowdown-at", DefenseKind::Training, "slowdown adversarial training on GradMDM examples (gated, skipnet)"),
    ("gate-consistency", DefenseKind::Training, "penalise gates off on x but on for x_adv (gated, skipnet)"),
    ("cost-cap", DefenseKind::Training, "penalise expected cost(x_adv) above cost(x) (gated, skipnet)"),
]
.as_slice();

/// Names of every defense.
pub fn names() -> Vec<&'static str> {
    DEFENSES.iter().map(|d| d.0).collect()
}

/// What each setting of defense `name` means (its config's doc comments; see
/// [`dynrobust_core::settings_doc`]).
pub fn setting_docs(name: &str) -> Result<BTreeMap<String, SettingDoc>> {
    Ok(match name {
        "none" => BTreeMap::new(),
        "bitdepth" => docs::<BitDepthConfig>(),
        "median" => docs::<MedianConfig>(),
        "blur" => docs::<BlurConfig>(),
        "jpeg" => docs::<JpegConfig>(),
        "noise" => docs::<NoiseConfig>(),
        "denoiser" => docs::<DenoiserParams>(),
        "chain" => docs::<ChainParams>(),
        "budget" => docs::<BudgetConfig>(),
        "monitor" => docs::<MonitorConfig>(),
        "squeeze" => docs::<SqueezeConfig>(),
        other => match kind(other)? {
            DefenseKind::Training => docs::<TrainedParams>(),
            _ => return Err(Error::config("defense", format!("`{other}` has no settings docs (add its config to `setting_docs`)"))),
        },
    })
}

/// False for the defenses that take a setting with no default and so cannot be built from no
/// params: `chain` (its `steps`) and the training-time ones (their `checkpoint`).
pub fn has_defaults(name: &str) -> bool {
    name != "chain" && !matches!(kind(name), Ok(DefenseKind::Training))
}

/// The kind of defense `name`, or an error listing the valid names.
pub fn kind(name: &str) -> Result<DefenseKind> {
    DEFENSES
        .iter()
        .find(|d| d.0 == name)
        .map(|d| d.1)
        .ok_or_else(|| Error::config("defense", format!("unknown defense `{name}`{}; expected one of: {}", dynrobust_core::error::did_you_mean(name, names()), names().join(", "))))
}

/// True for the detectors (`monitor`, `squeeze`): they flag inputs and leave the model as it
/// is.
pub fn is_detector(name: &str) -> bool {
    matches!(name, "monitor" | "squeeze")
}

/// Params of the denoiser defense.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DenoiserParams {
    /// Denoiser directory (`denoiser.safetensors` + `denoiser.json`).
    pub checkpoint: String,
}

impl Default for DenoiserParams {
    fn default() -> Self {
        DenoiserParams { checkpoint: "models/checkpoints/denoiser".into() }
    }
}

/// Params of a training-time defense used in a study: the checkpoint it produced.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainedParams {
    /// The checkpoint `dynrobust defend --recipe NAME` wrote: a directory, or the name of a
    /// committed one (`gated-slowdown-at`; in a study `{model}-slowdown-at` names the cell's).
    pub checkpoint: String,
}

/// Merges `overrides` over `defaults` and deserialises, naming the offending field.
pub fn merged<C: Serialize + DeserializeOwned>(defaults: C, overrides: &serde_json::Value) -> Result<C> {
    let mut value = serde_json::to_value(defaults)?;
    match (value.as_object_mut(), overrides) {
        (Some(base), serde_json::Value::Object(over)) => {
            for (k, v) in over {
                base.insert(k.clone(), v.clone());
            }
        }
        (_, serde_json::Value::Null) => {}
        _ => return Err(Error::config("params", "expected a table/object of parameters")),
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let msg = e.inner().to_string();
        let field = match msg.strip_prefix("unknown field `") {
            Some(rest) => rest.split('`').next().unwrap_or("params").to_string(),
            None => e.path().to_string(),
        };
        Error::config(field, msg)
    })
}

/// Resolves a path: as given, else relative to the project root, else a committed checkpoint
/// name (`denoiser-adv` → `models/checkpoints/denoiser-adv`, as training-time defenses take
/// their checkpoints).
fn project_path(p: &str) -> std::path::PathBuf {
    let as_given = std::path::PathBuf::from(p);
    let under_root = dynrobust_core::data::project_root().join(p);
    let committed = dynrobust_models::checkpoint::committed_dir(p);
    if as_given.exists() {
        as_given
    } else if under_root.exists() || !committed.is_dir() {
        under_root // when nothing is found, the loader's error names this path
    } else {
        committed
    }
}

/// Builds the input transform `name` with `params` (a learned denoiser on the CPU; see
/// [`build_transform_on`]).
pub fn build_transform(name: &str, params: &serde_json::Value) -> Result<Box<dyn InputTransform>> {
    build_transform_on(name, params, tch::Device::Cpu)
}

/// Builds the input transform `name` with `params`, a learned denoiser's weights on `device`
/// (the device of the images it will see).
pub fn build_transform_on(name: &str, params: &serde_json::Value, device: tch::Device) -> Result<Box<dyn InputTransform>> {
    Ok(match name {
        "bitdepth" => Box::new(BitDepth::new(merged(BitDepthConfig::default(), params)?)?),
        "median" => Box::new(Median::new(merged(MedianConfig::default(), params)?)?),
        "blur" => Box::new(Blur::new(merged(BlurConfig::default(), params)?)?),
        "jpeg" => Box::new(Jpeg::new(merged(JpegConfig::default(), params)?)?),
        "noise" => Box::new(Noise::new(merged(NoiseConfig::default(), params)?)?),
        "denoiser" => {
            let p: DenoiserParams = merged(DenoiserParams::default(), params)?;
            let dir = project_path(&p.checkpoint);
            let (net, _) = Denoiser::load(&dir, device)?;
            Box::new(DenoiserTransform::new(net, p.checkpoint))
        }
        "chain" => {
            let steps = chain_steps(params)?;
            let built = steps.iter().enumerate().map(|(i, s)| build_transform_on(&s.name, &s.params, device).map_err(|e| in_step(e, i)));
            Box::new(Chain::new(built.collect::<Result<Vec<_>>>()?)?)
        }
        other => {
            return Err(match kind(other)? {
                DefenseKind::Transform => Error::config("defense", format!("`{other}` is not an input transform")),
                k => Error::config("defense", format!("`{other}` is a {k} defense, not an input transform")),
            })
        }
    })
}

/// The denoiser checkpoints an input transform reads (a chain's in step order).
fn transform_checkpoints(name: &str, params: &serde_json::Value) -> Result<Vec<std::path::PathBuf>> {
    Ok(match name {
        "denoiser" => vec![project_path(&merged(DenoiserParams::default(), params)?.checkpoint)],
        "chain" => chain_steps(params)?.iter().map(|s| transform_checkpoints(&s.name, &s.params)).collect::<Result<Vec<_>>>()?.concat(),
        _ => Vec::new(),
    })
}

/// The steps of a `chain` defense's params (a step may not be `none` or another chain).
fn chain_steps(params: &serde_json::Value) -> Result<Vec<ChainStep>> {
    let p: ChainParams = serde_path_to_error::deserialize(params.clone()).map_err(|e| {
        let field = if e.path().to_string() == "." { "steps".to_string() } else { e.path().to_string() };
        Error::config(field, format!("{} (expected steps = [{{ name = \"bitdepth\", params = {{ bits = 4 }} }}, {{ name = \"denoiser\" }}])", e.inner()))
    })?;
    for (i, step) in p.steps.iter().enumerate() {
        if matches!(step.name.as_str(), "none" | "chain") {
            return Err(Error::config(format!("steps[{i}].name"), format!("`{}` cannot be a step of a chain", step.name)));
        }
    }
    Ok(p.steps)
}

/// A parsed defense for one evaluation.
#[derive(Debug, Clone)]
pub enum DefenseSpec {
    /// The bare model.
    None,
    /// An input transform (name + params, built per worker), with the label and the settings
    /// (`config_json`) of the transform built once when it was parsed.
    Transform { name: String, params: serde_json::Value, label: String, settings: serde_json::Value },
    /// A budget cap.
    Budget(BudgetConfig),
    /// A cost monitor (detector).
    Monitor(MonitorConfig),
    /// A feature-squeezing detector.
    Squeeze(SqueezeConfig),
    /// A checkpoint produced by a training-time defense.
    Trained { recipe: String, checkpoint: String },
}

impl DefenseSpec {
    /// True for a detector (see [`is_detector`]).
    pub fn is_detector(&self) -> bool {
        matches!(self, DefenseSpec::Monitor(_) | DefenseSpec::Squeeze(_))
    }

    /// The attacker mode used when none is asked for: adaptive, except where there is no
    /// adaptive attacker — the cost monitor (an energy attacker that knows it can do no more
    /// than stop below its threshold).
    pub fn default_mode(&self) -> Adaptivity {
        if self.check_mode(Adaptivity::Adaptive).is_ok() {
            Adaptivity::Adaptive
        } else {
            Adaptivity::Oblivious
        }
    }

    /// Refuses a mode the defense has no attacker for (see [`DefenseSpec::default_mode`]).
    pub fn check_mode(&self, mode: Adaptivity) -> Result<()> {
        match (self, mode) {
            (DefenseSpec::Monitor(_), Adaptivity::Adaptive) => Err(Error::config(
                "mode",
                "the cost monitor has no adaptive attacker (an energy attack that knows it can only stop below its threshold; the report gives the cost of what passes): evaluate it obliviously",
            )),
            (DefenseSpec::Squeeze(cfg), Adaptivity::Adaptive) => cfg.adaptive_squeezer().map(|_| ()),
            (DefenseSpec::Squeeze(cfg), Adaptivity::Oblivious) if cfg.attacker != crate::squeeze::SqueezeAttacker::Eot => Err(Error::config(
                "attacker",
                "`fixed-point`, `best` and `penalty` are adaptive attackers: an oblivious run would ignore them (and repeat the plain oblivious cell); drop `attacker` or evaluate adaptively",
            )),
            _ => Ok(()),
        }
    }

    /// The checkpoints a defense reads — a training-time defense's network, a learned
    /// denoiser (also each one among the steps of a chain, in step order) — resolved as its
    /// loader resolves them (none for the others).
    pub fn checkpoint_paths(&self) -> Result<Vec<std::path::PathBuf>> {
        Ok(match self {
            DefenseSpec::Trained { checkpoint, .. } => vec![dynrobust_models::checkpoint::resolve(checkpoint)?],
            DefenseSpec::Transform { name, params, .. } => transform_checkpoints(name, params)?,
            _ => Vec::new(),
        })
    }

    /// The defense's settings as it runs, every default filled in (a transform's as built when
    /// it was parsed): a record's `defense_params`, and what a stored result is checked against
    /// when a default changes between builds. `{}` for the bare model.
    pub fn settings(&self) -> Result<serde_json::Value> {
        Ok(match self {
            DefenseSpec::None => serde_json::json!({}),
            DefenseSpec::Transform { settings, .. } => settings.clone(),
            DefenseSpec::Budget(config) => serde_json::to_value(config)?,
            DefenseSpec::Monitor(config) => serde_json::to_value(config)?,
            DefenseSpec::Squeeze(config) => serde_json::to_value(config)?,
            DefenseSpec::Trained { checkpoint, .. } => serde_json::json!({ "checkpoint": checkpoint }),
        })
    }

    /// Clean training images a detector calibrates on (`None` for other defenses).
    pub fn calibration_images(&self) -> Option<i64> {
        match self {
            DefenseSpec::Monitor(m) => Some(m.calibration),
            DefenseSpec::Squeeze(s) => Some(s.calibration),
            _ => None,
        }
    }

    /// Parses and validates `name` + `params` (transforms are built once to validate them).
    pub fn parse(name: &str, params: &serde_json::Value) -> Result<Self> {
        Ok(match kind(name)? {
            _ if name == "none" => {
                if !(params.is_null() || params.as_object().is_some_and(|o| o.is_empty())) {
                    return Err(Error::config("params", "defense `none` takes no parameters"));
                }
                DefenseSpec::None
            }
            DefenseKind::Transform => {
                let built = build_transform(name, params)?;
                DefenseSpec::Transform { name: name.into(), params: params.clone(), label: built.label(), settings: built.config_json() }
            }
            DefenseKind::Guard if name == "budget" => DefenseSpec::Budget(merged(BudgetConfig::default(), params)?),
            DefenseKind::Guard if name == "monitor" => DefenseSpec::Monitor(merged(MonitorConfig::default(), params)?.validated()?),
            DefenseKind::Guard => DefenseSpec::Squeeze(merged(SqueezeConfig::default(), params)?.validated()?),
            DefenseKind::Training => {
                let p: TrainedParams = serde_path_to_error::deserialize(params.clone())
                    .map_err(|e| Error::config("checkpoint", format!("training-time defense `{name}` needs params {{ checkpoint = \"DIR\" }} (made by `dynrobust defend --recipe {name}`): {}", e.inner())))?;
                DefenseSpec::Trained { recipe: name.into(), checkpoint: p.checkpoint }
            }
        })
    }
}
