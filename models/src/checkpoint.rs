//! Checkpoints: weights in safetensors plus a JSON sidecar that says what the network is, how
//! it was trained and what it scores. Loading checks every tensor's name and shape, so a
//! checkpoint loaded into the wrong architecture fails naming the mismatched tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use dynrobust_core::atomic_file::{replace_atomic, temporary_path, write_atomic};
use dynrobust_core::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::config::ModelConfig;
use crate::net::Net;

/// File name of the weights inside a checkpoint directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// File name of the sidecar inside a checkpoint directory.
pub const SIDECAR_FILE: &str = "model.json";

/// How a checkpoint was trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainRecord {
    /// Data set the model was trained on.
    pub data: String,
    /// Training samples used.
    pub train_samples: i64,
    /// RNG seed.
    pub seed: u64,
    /// Epochs.
    pub epochs: i64,
    /// Mini-batch size.
    pub batch_size: i64,
    /// Peak learning rate.
    pub lr: f64,
    /// Optimiser and schedule.
    pub optimizer: String,
    /// What was optimised, in words.
    pub loss: String,
    /// Checkpoint the weights were initialised from, if any.
    pub init_from: Option<String>,
    /// Wall time of training in seconds.
    pub seconds: f64,
    /// Mean training loss of the last epoch.
    pub final_loss: f64,
    /// The command that produced it.
    pub command: String,
    /// dynrobust version.
    pub dynrobust_version: String,
    /// The source it was trained with ([`dynrobust_core::build_source`]: the git commit, marked
    /// `+dirty.…` when the binary was built from uncommitted changes); absent in
    /// sidecars written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_commit: Option<String>,
}

/// What a checkpoint scores on a test set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalRecord {
    /// Data set and split.
    pub data: String,
    /// Samples evaluated.
    pub n: i64,
    /// Top-1 accuracy in [0,1].
    pub accuracy: f64,
    /// Mean cost (MACs / static MACs).
    pub mean_cost: f64,
    /// Samples per exit (exit models).
    pub exit_histogram: Option<Vec<i64>>,
    /// Execution rate per gate (gated models).
    pub gate_rates: Option<Vec<f64>>,
}

/// The sidecar `model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sidecar {
    /// The architecture, enough to rebuild the network.
    pub architecture: ModelConfig,
    /// How it was trained.
    pub training: TrainRecord,
    /// What it scores.
    pub evaluation: EvalRecord,
}

/// Writes `dir/model.safetensors`, then `dir/model.json`, each to a temporary file of this
/// writer's own that is fsynced and renamed into place: a process killed while saving leaves
/// the previous checkpoint or none, never a truncated one, and the sidecar — which callers
/// take as "this checkpoint exists" — appears only after the weights are whole.
pub fn save(net: &Net, sidecar: &Sidecar, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let weights = dir.join(WEIGHTS_FILE);
    // the temporary name keeps the extension: the VarStore picks safetensors by it
    let tmp = PathBuf::from(format!("{}.safetensors", temporary_path(&weights).display()));
    replace_atomic(&weights, &tmp, |tmp| Ok(net.vs.save(tmp)?))?;
    let json = serde_json::to_string_pretty(sidecar)? + "\n";
    write_atomic(&dir.join(SIDECAR_FILE), json.as_bytes())
}

/// Reads and validates a sidecar.
pub fn read_sidecar(dir: &Path) -> Result<Sidecar> {
    let path = dir.join(SIDECAR_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::checkpoint(
            &path,
            "sidecar not found: a checkpoint is a directory holding model.safetensors and model.json",
        ),
        _ => Error::io(&path, e),
    })?;
    let sidecar: Sidecar = serde_json::from_str(&text).map_err(|e| Error::checkpoint(&path, e.to_string()))?;
    sidecar.architecture.clone().validated().map_err(|e| Error::checkpoint(&path, e.to_string()))?;
    Ok(sidecar)
}

/// Loads a checkpoint directory: rebuilds the architecture from the sidecar, then loads the
/// weights strictly. The net comes with its batch norms folded for inference
/// ([`Net::fold_batch_norm`]; training unfolds them itself).
pub fn load(dir: &Path, device: Device) -> Result<(Net, Sidecar)> {
    let sidecar = read_sidecar(dir)?;
    let mut net = Net::new(sidecar.architecture.clone(), device)?;
    load_weights(&mut net, &dir.join(WEIGHTS_FILE))?;
    net.fold_batch_norm();
    Ok((net, sidecar))
}

fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    if path.is_dir() {
        return Err(Error::checkpoint(path, "is a directory: expected the safetensors weights file"));
    }
    if !path.is_file() {
        return Err(Error::checkpoint(path, "weights file not found"));
    }
    let tensors = Tensor::read_safetensors(path).map_err(|e| Error::unreadable_safetensors(path, "the weights `dynrobust train` or `dynrobust defend` writes", &e))?;
    for (name, t) in &tensors {
        check_weights(path, name, t)?;
    }
    Ok(tensors.into_iter().collect())
}

/// A weight must be a float tensor with finite values; batch-norm running variances must not
/// be negative (the square root of one is NaN). Damaged files otherwise load and quietly give
/// 0 % accuracy. (The denoiser's loader applies the same rule.)
pub fn check_weights(path: &Path, name: &str, t: &Tensor) -> Result<()> {
    let kind = t.kind();
    if !matches!(kind, tch::Kind::Float | tch::Kind::Double | tch::Kind::Half | tch::Kind::BFloat16) {
        // an int64 count (e.g. batch norm's `num_batches_tracked`) is not a weight dynrobust reads
        if name.ends_with("num_batches_tracked") {
            return Ok(());
        }
        return Err(Error::checkpoint(path, format!("tensor `{name}` has dtype {kind:?}: expected a float tensor")));
    }
    let bad = t.isfinite().logical_not().sum(tch::Kind::Int64).int64_value(&[]);
    if bad > 0 {
        return Err(Error::checkpoint(path, format!("tensor `{name}` holds {bad} non-finite value(s) (NaN or ±inf)")));
    }
    if name.ends_with("running_var") && t.numel() > 0 && t.min().double_value(&[]) < 0.0 {
        return Err(Error::checkpoint(path, format!("tensor `{name}` holds a negative variance")));
    }
    Ok(())
}

/// Loads every variable of `net` from a safetensors file; every name must be present with the
/// same shape and the file must hold no other tensors.
pub fn load_weights(net: &mut Net, path: &Path) -> Result<()> {
    let tensors = read_tensors(path)?;
    let missing = copy_matching(net, &tensors, path)?;
    if let Some(name) = missing.first() {
        return Err(Error::checkpoint(path, format!("tensor `{name}` required by the architecture is missing from the file")));
    }
    let wanted = net.vs.variables();
    let mut extra: Vec<&String> = tensors.keys().filter(|k| !wanted.contains_key(*k)).collect();
    extra.sort();
    if let Some(name) = extra.first() {
        return Err(Error::checkpoint(path, format!("tensor `{name}` in the file has no place in the architecture `{}`", net.config().mechanism.kind_name())));
    }
    Ok(())
}

/// Initialises the variables of `net` that `path` holds (same name and shape required);
/// returns the names of the variables left at their initial values.
pub fn init_from(net: &mut Net, path: &Path) -> Result<Vec<String>> {
    let tensors = read_tensors(path)?;
    copy_matching(net, &tensors, path)
}

/// Copies the tensors into the variables of the same name; a folded net is refolded from the
/// new weights.
fn copy_matching(net: &mut Net, tensors: &HashMap<String, Tensor>, path: &Path) -> Result<Vec<String>> {
    let refold = net.is_folded();
    net.unfold_batch_norm();
    let missing = copy_into(net, tensors, path)?;
    if refold {
        net.fold_batch_norm();
    }
    Ok(missing)
}

fn copy_into(net: &mut Net, tensors: &HashMap<String, Tensor>, path: &Path) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    let mut vars: Vec<(String, Tensor)> = net.vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, mut var) in vars {
        let Some(src) = tensors.get(&name) else {
            missing.push(name);
            continue;
        };
        if src.size() != var.size() {
            return Err(Error::checkpoint(
                path,
                format!("tensor `{name}` has shape {:?} in the file but the architecture expects {:?}", src.size(), var.size()),
            ));
        }
        tch::no_grad(|| var.copy_(&src.to_kind(var.kind()).to_device(var.device())));
    }
    Ok(missing)
}

/// The directory of a committed checkpoint by name (`static`, `sdn`, `gated`, `skipnet`).
pub fn committed_dir(name: &str) -> PathBuf {
    dynrobust_core::data::project_root().join("models").join("checkpoints").join(name)
}

/// Loads a committed checkpoint by name, panicking with the reason (for tests and examples).
pub fn load_committed(name: &str) -> Net {
    load(&committed_dir(name), Device::Cpu).unwrap_or_else(|e| panic!("committed checkpoint `{name}`: {e}")).0
}

/// A model named by a path: as written (relative to the working directory), else relative to
/// the project root ([`dynrobust_core::data::project_root`]) — so a study that names
/// `models/checkpoints/x` reads the same from any directory. `None` when neither exists.
pub fn locate_path(name: &str) -> Option<PathBuf> {
    let path = Path::new(name);
    if path.exists() {
        return Some(path.to_path_buf());
    }
    let under_root = dynrobust_core::data::project_root().join(path);
    (path.is_relative() && under_root.exists()).then_some(under_root)
}

/// The one spelling of a path-named model ([`locate_path`]) that study cell ids hash:
/// relative to the project root when it lies inside it (`./x/`, `x` and `/abs/root/x` all
/// become `x`), else the absolute path. `None` when the path does not exist.
pub fn canonical_path_name(name: &str) -> Option<String> {
    let found = absolute_lexical(&locate_path(name)?)?;
    let root = absolute_lexical(&dynrobust_core::data::project_root())?;
    // lexically, so a symlink inside the checkout (to shared storage) keeps its name in it
    let relative = found.strip_prefix(&root).ok().map(Path::to_path_buf);
    Some(relative.unwrap_or(found).display().to_string())
}

/// `path` made absolute (against the working directory) with `.` and `..` resolved by name,
/// symlinks left as they are.
fn absolute_lexical(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for part in std::path::absolute(path).ok()?.components() {
        match part {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    Some(out)
}

/// Resolves `--model`: a committed checkpoint name or a checkpoint directory path.
pub fn resolve(model: &str) -> Result<PathBuf> {
    let as_path = PathBuf::from(model);
    if let Some(dir) = locate_path(model).filter(|d| d.join(SIDECAR_FILE).is_file()) {
        return Ok(dir);
    }
    let committed = committed_dir(model);
    if committed.join(SIDECAR_FILE).is_file() {
        return Ok(committed);
    }
    if as_path.is_dir() {
        return Err(Error::checkpoint(&as_path, format!("a directory without {SIDECAR_FILE}: not a dynrobust checkpoint (expected model.safetensors and model.json, as `dynrobust train` writes)")));
    }
    let committed_names: Vec<String> = std::fs::read_dir(committed_dir("")).into_iter().flatten().flatten().filter(|e| e.path().join(SIDECAR_FILE).is_file()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    Err(Error::checkpoint(
        &as_path,
        format!(
            "no checkpoint `{model}`{}: expected a committed model name (static, sdn, gated, skipnet, in {}) \
             or a directory holding model.safetensors and model.json",
            dynrobust_core::error::did_you_mean(model, committed_names.iter().map(String::as_str)),
            committed_dir("").display()
        ),
    ))
}
