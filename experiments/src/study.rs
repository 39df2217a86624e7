//! Study files: a TOML description of an experiment grid, and the [`Cell`]s it expands to.
//!
//! A study names a data set, the number of test images per cell, seeds, ε values, models (plus
//! named variants: a runtime threshold on a committed model, or a model trained by the runner),
//! attacks (with free-form parameter overrides and optional transfer surrogates) and defenses
//! (with adaptive and/or oblivious attacker modes). The cross product
//! models × defenses × modes × attacks × surrogates × ε × seeds is expanded, `[[overrides]]` merge
//! parameters into matching cells, and `[[include]]`/`[[exclude]]` filter them (on model,
//! attack, label, defense, mode, surrogate and ε).
//!
//! Every cell carries a normalised [`CellConfig`]; its id is the first 16 hex digits of the
//! SHA-256 of the config's canonical JSON (sorted keys), so ids do not depend on the order in
//! which lists are written, and a result stored under an id always means the same experiment.
//! Variants are part of the grid whether or not they are also named in `models`.
//!
//! Every problem in a study file (unknown key, unknown plugin name, invalid value, empty grid)
//! is an `Error::Config` whose `field` is `FILE:LINE:COLUMN` and whose text names the key.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use dynrobust_core::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::grid;
use crate::location::Source;

/// The plugin names a study may use, supplied by the caller (the binary knows the crates).
#[derive(Debug, Clone, Default)]
pub struct Registry {
    /// Committed model names (checkpoint names).
    pub models: Vec<String>,
    /// Attack names.
    pub attacks: Vec<String>,
    /// Defense names (`none` = undefended).
    pub defenses: Vec<String>,
    /// Attacks without an ε budget (e.g. `ilfo`): they get one cell with `eps = null` instead of
    /// one per ε. An attack entry's own `eps = [...]` list overrides this.
    pub eps_free: Vec<String>,
}

/// An expanded, validated study.
#[derive(Debug, Clone)]
pub struct Study {
    /// The file it was read from.
    pub path: PathBuf,
    /// The study's `name`.
    pub name: String,
    /// The study's `description` (empty when not given).
    pub description: String,
    /// The file's text, byte for byte (the store keeps a copy).
    pub source: String,
    /// The grid, in a deterministic order (model, defense, mode, attack, surrogate, ε, seed).
    pub cells: Vec<Cell>,
}

/// One experiment: a model, a defense in one mode, an attack (crafted on a surrogate or on the
/// model itself), one ε and one seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    /// First 16 hex digits of SHA-256 over the canonical JSON of `config`.
    pub id: String,
    pub config: CellConfig,
}

/// The normalised description of a cell; everything an executor needs to run it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CellConfig {
    /// Data set name (`fashion-mnist` or `mnist`); the cell uses the first `n` test images.
    pub data: String,
    pub n: usize,
    pub batch: usize,
    pub seed: u64,
    /// Perturbation budget, `None` for attacks without one (or when the study gives no ε).
    pub eps: Option<f64>,
    /// The model under attack.
    pub model: ModelRef,
    /// The model the attack is crafted on (transfer); `None` = white-box on `model`.
    pub surrogate: Option<ModelRef>,
    pub attack: AttackRef,
    pub defense: DefenseRef,
}

/// A model: a committed checkpoint, a checkpoint directory, or a study-defined variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRef {
    /// The name cells and reports use (registry name, directory path or variant name).
    pub name: String,
    /// Registry model name or checkpoint directory this model starts from.
    pub base: String,
    /// Runtime threshold override (exit confidence / gate threshold), for variants.
    pub threshold: Option<f64>,
    /// Exit placement (block indices of the internal classifiers in use), for SDN variants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exits: Option<Vec<usize>>,
    /// Free-form training table (variants trained by the runner), as JSON.
    pub train: Option<serde_json::Value>,
    /// The static twin of the base model (gates forced open / no early exit), for variants.
    /// Left out of the stored config when false, so cells of other models keep their ids.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub twin: bool,
}

/// An attack entry: registry name, label (defaults to the name) and parameter overrides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttackRef {
    pub name: String,
    pub label: String,
    /// A JSON object, validated later by the attack's own config.
    pub params: serde_json::Value,
}

/// A defense entry in one attacker mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefenseRef {
    pub name: String,
    pub label: String,
    /// `None` for the undefended baseline (`none`).
    pub mode: Option<DefenseMode>,
    /// A JSON object, validated later by the defense's own config.
    pub params: serde_json::Value,
}

/// Whether the attacker knows the defense (adaptive: attacks the defended model) or not
/// (oblivious: crafts on the undefended model, evaluated on the defended one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefenseMode {
    Adaptive,
    Oblivious,
}

impl DefenseMode {
    /// `adaptive` or `oblivious`.
    pub fn as_str(self) -> &'static str {
        match self {
            DefenseMode::Adaptive => "adaptive",
            DefenseMode::Oblivious => "oblivious",
        }
    }

    /// Parses `adaptive` / `oblivious`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "adaptive" => Some(DefenseMode::Adaptive),
            "oblivious" => Some(DefenseMode::Oblivious),
            _ => None,
        }
    }
}

impl CellConfig {
    /// The attack's parameters as the cell runs it: the study's params with the cell's ε.
    pub fn attack_params(&self) -> serde_json::Value {
        let mut params = if self.attack.params.is_null() { serde_json::json!({}) } else { self.attack.params.clone() };
        if let (Some(eps), Some(map)) = (self.eps, params.as_object_mut()) {
            map.insert("eps".into(), serde_json::json!(eps));
        }
        params
    }

    /// The canonical JSON text the id is computed from (keys sorted, no whitespace).
    pub fn canonical_json(&self) -> String {
        // serde_json's Value keeps object keys in a BTreeMap, so this is sorted at every level.
        let value = serde_json::to_value(self).expect("a cell config always serialises");
        value.to_string()
    }

    /// First 16 hex digits of SHA-256 over [`Self::canonical_json`].
    pub fn id(&self) -> String {
        let digest = Sha256::digest(self.canonical_json().as_bytes());
        digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }

    /// A one-line human description, e.g. `model=sdn defense=none attack=pgd-k10 eps=8/255 seed=0`.
    pub fn summary(&self) -> String {
        let mode = self.defense.mode.map(|m| format!("/{}", m.as_str())).unwrap_or_default();
        let surrogate = self.surrogate.as_ref().map(|s| format!(" surrogate={}", s.name)).unwrap_or_default();
        let eps = self.eps.map_or("-".to_string(), format_eps);
        format!(
            "model={} defense={}{mode} attack={}{surrogate} eps={eps} seed={}",
            self.model.name, self.defense.label, self.attack.label, self.seed
        )
    }
}

impl Cell {
    /// A cell with its id computed from `config`.
    pub fn new(config: CellConfig) -> Self {
        Cell { id: config.id(), config }
    }
}

/// Formats ε as `k/255` when it is one (to 1e-9) below 1, else as a short decimal (an L2
/// radius of 1 reads `1`, not `255/255`).
pub fn format_eps(eps: f64) -> String {
    let k = eps * 255.0;
    if (k - k.round()).abs() < 1e-9 && k.round() >= 1.0 && eps < 1.0 {
        format!("{}/255", k.round() as i64)
    } else {
        format!("{eps}")
    }
}

impl Study {
    /// Reads, validates and expands the study at `path` against the caller's plugin names.
    pub fn load(path: impl AsRef<Path>, registry: &Registry) -> Result<Study> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Study::parse(&text, path, registry)
    }

    /// Validates and expands study text; `path` is only used to name locations in errors.
    pub fn parse(text: &str, path: impl AsRef<Path>, registry: &Registry) -> Result<Study> {
        let path = path.as_ref();
        let file = path.display().to_string();
        let src = Source { file: &file, text };
        let expanded = grid::expand(src, registry)?;
        Ok(Study {
            path: path.to_path_buf(),
            name: expanded.name,
            description: expanded.description,
            source: text.to_string(),
            cells: expanded.cells,
        })
    }

    /// The set of cell ids.
    pub fn ids(&self) -> BTreeSet<String> {
        self.cells.iter().map(|c| c.id.clone()).collect()
    }
}

/// Parses `--shard i/n` (0-based `i`, `i < n`, `n ≥ 1`).
pub fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let bad = |why: &str| Error::config("shard", format!("`{s}`: {why}; expected `i/n` with 0 ≤ i < n, e.g. `3/16`"));
    let (i, n) = s.split_once('/').ok_or_else(|| bad("no `/`"))?;
    let i: usize = i.trim().parse().map_err(|_| bad("`i` is not a non-negative integer"))?;
    let n: usize = n.trim().parse().map_err(|_| bad("`n` is not a non-negative integer"))?;
    if n == 0 {
        return Err(bad("n must be at least 1"));
    }
    if i >= n {
        return Err(bad("i must be smaller than n"));
    }
    Ok((i, n))
}

/// Shard `i` of `n`: the cells whose rank in id order is ≡ i (mod n), in their input order.
/// Shards are disjoint, cover all cells, and do not depend on the order of `cells`.
pub fn shard(cells: &[Cell], i: usize, n: usize) -> Vec<Cell> {
    assert!(n > 0 && i < n, "shard {i}/{n}: use parse_shard to validate");
    let mut ids: Vec<&str> = cells.iter().map(|c| c.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    let mine: BTreeSet<&str> = ids.into_iter().enumerate().filter(|(k, _)| k % n == i).map(|(_, id)| id).collect();
    cells.iter().filter(|c| mine.contains(c.id.as_str())).cloned().collect()
}
