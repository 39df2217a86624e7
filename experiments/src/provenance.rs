//! Which weights, plugin settings and test images a cell was computed with, so that a resumed
//! run notices a checkpoint, a default of the build or a data set that changed under it.
//!
//! A cell's id names its *configuration* (model name, attack, ε, …), not the weights behind a
//! name: retraining `models/checkpoints/sdn-pgd-at` and resuming a study would otherwise mix
//! cells of the old and the new network in one report without a word. So every stored cell
//! carries its **inputs** — a digest of each checkpoint it read (the model, the surrogate, the
//! defense's checkpoint) — and a run compares them with the checkpoints on disk before it
//! skips a finished cell ([`crate::runner::run_cells`]).
//!
//! The digest ([`checkpoint_digest`]) covers what changes a result: every `*.safetensors` file
//! of a checkpoint directory, and the `architecture` of its JSON sidecars (exit threshold,
//! gate settings, normalisation). It leaves out the sidecar's training log and evaluation, so
//! re-evaluating a checkpoint does not make its cells stale. A TorchScript file is digested
//! whole.
//!
//! A cell's id hashes its parameters *as the study writes them*, so a default that changes
//! between builds (an attack's step size, the ε of a cell that names none) leaves the id as it
//! was. The inputs therefore also carry a digest of the attack's and the defense's **settings**
//! as they resolve in this build, defaults filled in ([`settings_digest`] under
//! [`ATTACK_SETTINGS`] and [`DEFENSE_SETTINGS`]): a finished cell whose settings resolve
//! differently now is stale like one whose checkpoint changed. And they carry a digest of the
//! test images and labels the cell evaluates ([`images_digest`] under [`DATA`]), so a
//! `folder:` or `npy:` data set edited in place, or another `DYNROBUST_DATA_DIR`, is noticed
//! too. When a detector calibrates on training images or an attack fits on them (DeepSloth's
//! universal perturbation), those are digested as well ([`TRAINING_DATA`]).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use dynrobust_core::{Error, Result};
use sha2::{Digest, Sha256};

/// What a cell read, e.g. `{"model": "3f…", "defense": "9a…", "attack settings": "c0…",
/// "data": "5e…"}`: role → [`checkpoint_digest`], [`settings_digest`] for the two settings
/// roles, [`images_digest`] for [`DATA`].
pub type Inputs = BTreeMap<String, String>;

/// The first 8 bytes of a SHA-256 as 16 hex digits, the form of every digest here.
fn short_hex(hasher: Sha256) -> String {
    hasher.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The role of the digest of the attack's resolved settings ([`settings_digest`]).
pub const ATTACK_SETTINGS: &str = "attack settings";
/// The role of the digest of the defense's resolved settings ([`settings_digest`]).
pub const DEFENSE_SETTINGS: &str = "defense settings";

/// First 16 hex digits of a SHA-256 over a plugin's resolved settings (its `config_json`,
/// defaults filled in), as canonical JSON text (keys sorted, no whitespace).
pub fn settings_digest(settings: &serde_json::Value) -> String {
    let mut hasher = Sha256::new();
    hasher.update(settings.to_string().as_bytes());
    short_hex(hasher)
}

/// First 16 hex digits of a SHA-256 over the parts of a checkpoint (a directory, or a
/// TorchScript file) that change its results: the weights and the sidecars' `architecture`.
pub fn checkpoint_digest(path: &Path) -> Result<String> {
    let mut hasher = Sha256::new();
    if path.is_file() {
        hasher.update(fs::read(path).map_err(|e| Error::io(path, e))?);
    } else {
        let mut names: Vec<_> = fs::read_dir(path).map_err(|e| Error::io(path, e))?.flatten().map(|e| e.file_name()).collect();
        names.sort();
        let mut digested = 0;
        for name in names.iter().filter_map(|n| n.to_str()).filter(|n| !n.contains(".tmp.")) {
            let file = path.join(name);
            let part = if name.ends_with(".safetensors") {
                fs::read(&file).map_err(|e| Error::io(&file, e))?
            } else if name.ends_with(".json") {
                architecture_of(&file)?.into_bytes()
            } else {
                continue;
            };
            hasher.update((name.len() as u64).to_le_bytes());
            hasher.update(name.as_bytes());
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(&part);
            digested += 1;
        }
        if digested == 0 {
            return Err(Error::checkpoint(path, "no *.safetensors or *.json file to digest: not a checkpoint directory"));
        }
    }
    Ok(short_hex(hasher))
}

/// The canonical text of a sidecar's `architecture` (the whole file when it has none).
fn architecture_of(file: &Path) -> Result<String> {
    let text = fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::checkpoint(file, e.to_string()))?;
    Ok(value.get("architecture").unwrap_or(&value).to_string())
}

/// The role of the digest of the test images and labels a cell evaluates ([`images_digest`]).
pub const DATA: &str = "data";

/// The role of the digest of the training images and labels a cell's detector calibrates on
/// or its attack fits on (the first n of the training split, n the larger of the two counts;
/// [`images_digest`]).
pub const TRAINING_DATA: &str = "training data";

/// First 16 hex digits of a SHA-256 over the images (float32, as loaded) and labels (int64)
/// of `set`, with their shapes: a data set edited in place (a `folder:` or `npy:` directory,
/// another `DYNROBUST_DATA_DIR`) digests differently.
pub fn images_digest(set: &dynrobust_core::data::Dataset) -> Result<String> {
    let bad = |e: tch::TchError| Error::data(&set.name, format!("cannot read its tensors to digest them: {e}"));
    let mut hasher = Sha256::new();
    for tensor in [&set.images, &set.labels] {
        for d in tensor.size() {
            hasher.update(d.to_le_bytes());
        }
    }
    let images = Vec::<f32>::try_from(set.images.to_device(tch::Device::Cpu).to_kind(tch::Kind::Float).flatten(0, -1)).map_err(bad)?;
    for chunk in images.chunks(1 << 16) {
        hasher.update(chunk.iter().flat_map(|p| p.to_le_bytes()).collect::<Vec<u8>>());
    }
    let labels = Vec::<i64>::try_from(set.labels.to_device(tch::Device::Cpu).to_kind(tch::Kind::Int64)).map_err(bad)?;
    hasher.update(labels.iter().flat_map(|l| l.to_le_bytes()).collect::<Vec<u8>>());
    Ok(short_hex(hasher))
}

/// One input whose checkpoint (or resolved settings, or test images) differs from the one a
/// stored cell was computed with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    /// The role, e.g. `model` or [`ATTACK_SETTINGS`].
    pub input: String,
    /// Digest stored with the cell.
    pub stored: String,
    /// Digest of the checkpoint on disk now (of the settings as this build resolves them, of
    /// the test images as they load now).
    pub now: String,
}

impl Changed {
    /// What changed, in words: `model checkpoint`, `attack settings`, `test images` or
    /// `training images`.
    pub fn what(&self) -> String {
        match self.input.as_str() {
            ATTACK_SETTINGS | DEFENSE_SETTINGS => self.input.clone(),
            DATA => "test images".to_string(),
            TRAINING_DATA => "training images".to_string(),
            role => format!("{role} checkpoint"),
        }
    }
}

/// The top-level keys whose values differ between the settings objects `old` and `new`, as
/// `key: old → new` (`none` for a key on one side only), in key order.
pub fn changed_keys(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    let (empty_old, empty_new) = (serde_json::Map::new(), serde_json::Map::new());
    let old = old.as_object().unwrap_or(&empty_old);
    let new = new.as_object().unwrap_or(&empty_new);
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    let shown = |v: Option<&serde_json::Value>| v.map_or("none".to_string(), |v| v.to_string());
    keys.into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .map(|k| format!("{k}: {} → {}", shown(old.get(k)), shown(new.get(k))))
        .collect()
}

/// The inputs recorded in both `stored` and `now` whose digests differ. An input missing from
/// either side cannot be compared and is not reported: cells stored before inputs were
/// recorded, and variants not trained yet (the runner trains them before any cell runs).
pub fn changed(stored: &Inputs, now: &Inputs) -> Vec<Changed> {
    stored
        .iter()
        .filter_map(|(input, old)| {
            now.get(input).filter(|new| *new != old).map(|new| Changed { input: input.clone(), stored: old.clone(), now: new.clone() })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(pairs: &[(&str, &str)]) -> Inputs {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn only_inputs_on_both_sides_are_compared() {
        let stored = inputs(&[("model", "aa"), ("defense", "bb"), ("surrogate", "cc")]);
        let now = inputs(&[("model", "aa"), ("defense", "b2")]);
        assert_eq!(changed(&stored, &now), vec![Changed { input: "defense".into(), stored: "bb".into(), now: "b2".into() }]);
        assert!(changed(&Inputs::new(), &now).is_empty(), "a cell stored without inputs is not stale");
    }

    #[test]
    fn changed_keys_name_each_differing_setting() {
        let old = serde_json::json!({"steps": 20, "eps": 0.1, "lr": 0.01});
        let new = serde_json::json!({"steps": 30, "eps": 0.1, "momentum": 0.9});
        assert_eq!(changed_keys(&old, &new), vec!["lr: 0.01 → none", "momentum: none → 0.9", "steps: 20 → 30"]);
        assert!(changed_keys(&old, &old).is_empty());
    }

    #[test]
    fn settings_digests_ignore_key_order_and_name_what_changed() {
        let (a, b) = (serde_json::json!({"steps": 20, "eps": 0.1}), serde_json::json!({"eps": 0.1, "steps": 20}));
        assert_eq!(settings_digest(&a), settings_digest(&b));
        assert_ne!(settings_digest(&a), settings_digest(&serde_json::json!({"eps": 0.1, "steps": 10})));
        assert_eq!(settings_digest(&a).len(), 16);
        let change = |input: &str| Changed { input: input.into(), stored: "a".into(), now: "b".into() }.what();
        assert_eq!(change("model"), "model checkpoint");
        assert_eq!(change(ATTACK_SETTINGS), "attack settings");
        assert_eq!(change(DEFENSE_SETTINGS), "defense settings");
        assert_eq!(change(DATA), "test images");
        assert_eq!(change(TRAINING_DATA), "training images");
    }

    #[test]
    fn the_digest_follows_weights_and_architecture_not_the_training_log() {
        let dir = tempfile::tempdir().unwrap();
        let sidecar = |threshold: f64, seconds: f64| {
            serde_json::json!({ "architecture": { "threshold": threshold }, "training": { "seconds": seconds } }).to_string()
        };
        fs::write(dir.path().join("model.safetensors"), [1u8, 2, 3]).unwrap();
        fs::write(dir.path().join("model.json"), sidecar(0.8, 10.0)).unwrap();
        let first = checkpoint_digest(dir.path()).unwrap();
        assert_eq!(first.len(), 16);

        fs::write(dir.path().join("model.json"), sidecar(0.8, 99.0)).unwrap();
        assert_eq!(checkpoint_digest(dir.path()).unwrap(), first, "training log and evaluation are left out");
        fs::write(dir.path().join("notes.txt"), "anything").unwrap();
        assert_eq!(checkpoint_digest(dir.path()).unwrap(), first, "other files are left out");

        fs::write(dir.path().join("model.json"), sidecar(0.9, 99.0)).unwrap();
        let other_threshold = checkpoint_digest(dir.path()).unwrap();
        assert_ne!(other_threshold, first, "the architecture counts");

        fs::write(dir.path().join("model.safetensors"), [1u8, 2, 4]).unwrap();
        assert_ne!(checkpoint_digest(dir.path()).unwrap(), other_threshold, "the weights count");
    }

    #[test]
    fn a_directory_without_checkpoint_files_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = checkpoint_digest(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&dir.path().display().to_string()) && err.contains("not a checkpoint directory"), "{err}");
    }
}
