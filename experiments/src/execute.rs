//! The executor that runs one cell for real: data → model (committed checkpoint, directory or
//! trained variant) → defense → attack (white-box, or crafted on a surrogate) → record.
//!
//! Each worker thread loads its own data and networks (tch tensors are not `Sync`); libtorch
//! runs with `threads_per_worker` intra-op threads. Every cell reseeds libtorch with its seed,
//! so a cell's result does not depend on which worker ran it or what ran before.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dynrobust_attacks::evaluate::PerSample;
use dynrobust_attacks::registry as attacks;
use dynrobust_attacks::transfer::Transfer;
use dynrobust_core::attack::{prepare_fit, Attack};
use dynrobust_core::data::{DataSpec, Dataset, Split};
use dynrobust_core::defense::Adaptivity;
use dynrobust_core::device::device_name;
use dynrobust_core::{DynamicModel, Error, Result};
use dynrobust_defenses::evaluate::run_defended;
use dynrobust_defenses::registry::DefenseSpec;
use dynrobust_models::checkpoint::{self, Sidecar};
use dynrobust_models::train::{default_epochs, evaluate, may_start_from_committed_static, train_family, train_record, TrainConfig};
use dynrobust_models::{AnyModel, Mechanism, ModelConfig, Net};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tch::Device;

use crate::craft_cache::CraftCache;
use crate::provenance::{changed_keys, checkpoint_digest, images_digest, settings_digest, Inputs, ATTACK_SETTINGS, DATA, DEFENSE_SETTINGS, TRAINING_DATA};
use crate::runner::{CellOutput, Executor};
use crate::study::{Cell, DefenseMode, ModelRef, Registry, Study};

/// Plugin names for study validation, from the crates.
pub fn registry() -> Registry {
    Registry {
        models: dynrobust_models::Mechanism::FAMILIES.iter().map(|s| s.to_string()).collect(),
        attacks: attacks::names().iter().map(|s| s.to_string()).collect(),
        defenses: dynrobust_defenses::registry::names().iter().map(|s| s.to_string()).collect(),
        eps_free: vec!["ilfo".into()],
    }
}

/// Runs cells on the real models.
pub struct RealExecutor {
    /// Where trained variants live (`OUT/models/<variant>`).
    pub variants_dir: PathBuf,
    /// libtorch intra-op threads per worker.
    pub threads_per_worker: i32,
    /// Where models and data live (`--device`).
    pub device: Device,
    /// Where crafted examples are shared between cells that craft on the bare model
    /// (`OUT/craft-cache`; `None` turns the cache off). See [`CraftCache`].
    pub craft_cache: Option<PathBuf>,
    /// [`images_digest`] of the first n images of a data set's split by (data set, training
    /// split?, n), computed once per executor: every cell of a run reads the same files. Each
    /// entry has a lock of its own, held while it is computed, so two workers asking for the
    /// same digest load the split once and different digests do not wait for each other.
    data_digests: DigestTable,
}

impl RealExecutor {
    /// An executor whose variants live in `variants_dir`, with `threads_per_worker` libtorch
    /// threads per worker, models and data on `device`, and crafted examples shared through
    /// `craft_cache` (`None`: not shared).
    pub fn new(variants_dir: PathBuf, threads_per_worker: i32, device: Device, craft_cache: Option<PathBuf>) -> Self {
        RealExecutor { variants_dir, threads_per_worker, device, craft_cache, data_digests: Default::default() }
    }

    /// [`images_digest`] of the first `n` images of the data set `name`'s `split` (all of
    /// them when it has fewer).
    fn images_digest(&self, name: &str, split: Split, n: i64) -> Result<String> {
        let key = (name.to_string(), matches!(split, Split::Train), n);
        let entry = self.data_digests.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_default().clone();
        let mut slot = entry.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(digest) = slot.as_ref() {
            return Ok(digest.clone());
        }
        let digest = images_digest(&located_data(name)?.load(split, None)?.take(n))?;
        *slot = Some(digest.clone());
        Ok(digest)
    }
}

/// Digests by (data set, training split?, n), each behind its own lock (see
/// [`RealExecutor::images_digest`]).
type DigestTable = std::sync::Mutex<BTreeMap<(String, bool, i64), std::sync::Arc<std::sync::Mutex<Option<String>>>>>;

/// Per-thread state: loaded data sets.
pub struct Worker {
    data: BTreeMap<(String, bool), Dataset>,
    device: Device,
}

impl Worker {
    fn data(&mut self, name: &str, split: Split) -> Result<&Dataset> {
        let key = (name.to_string(), matches!(split, Split::Train));
        if !self.data.contains_key(&key) {
            let set = located_data(name)?.load(split, None)?.to_device(self.device);
            self.data.insert(key.clone(), set);
        }
        Ok(&self.data[&key])
    }
}

impl RealExecutor {
    /// Loads the network a model reference names (a TorchScript model is checked on `probe`).
    pub fn load(&self, model: &ModelRef, probe: &tch::Tensor) -> Result<AnyModel> {
        let mut any = match &model.train {
            Some(_) => AnyModel::Native(checkpoint::load(&self.variants_dir.join(&model.name), self.device)?.0),
            None => AnyModel::load(&model.base, self.device, probe)?.0,
        };
        if let Some(q) = model.threshold {
            any.set_threshold(q)?;
        }
        if let Some(exits) = &model.exits {
            any.native_mut("exit placement (`exits`)")?.set_active_exits(exits.clone())?;
        }
        any.set_twin(model.twin)?;
        Ok(any)
    }

    /// The checkpoint a model reference reads: a trained variant's directory (`None` until the
    /// runner has trained it), a TorchScript file or a checkpoint directory.
    fn model_path(&self, model: &ModelRef) -> Result<Option<PathBuf>> {
        Ok(match &model.train {
            Some(_) => Some(self.variants_dir.join(&model.name)).filter(|dir| dir.is_dir()),
            None if dynrobust_models::any::is_torchscript(&model.base) => Some(checkpoint::locate_path(&model.base).unwrap_or_else(|| PathBuf::from(&model.base))),
            None => Some(checkpoint::resolve(&model.base)?),
        })
    }

    fn defense(&self, cell: &Cell) -> Result<(DefenseSpec, Adaptivity)> {
        let d = &cell.config.defense;
        let mut params = d.params.clone();
        seed_randomised(&d.name, &mut params, cell.config.seed);
        // trained defenses may name their checkpoint per model: "models/checkpoints/{model}-gate-consistency"
        if let Some(Value::String(path)) = params.get_mut("checkpoint") {
            *path = path.replace("{model}", &cell.config.model.base);
        }
        let spec = DefenseSpec::parse(&d.name, &params)?;
        let mode = match d.mode {
            Some(DefenseMode::Oblivious) => Adaptivity::Oblivious,
            _ => Adaptivity::Adaptive,
        };
        Ok((spec, mode))
    }

    /// The cell's attack as its config builds it, before a transfer cell wraps it.
    fn bare_attack(&self, cell: &Cell) -> Result<Box<dyn Attack>> {
        let c = &cell.config;
        let mut params = c.attack_params();
        // the cell's seed drives every attack that has one (random starts), unless the study
        // sets the attack's own
        if let Some(map) = params.as_object_mut().filter(|_| attacks::has_seed(&c.attack.name)) {
            map.entry("seed").or_insert(json!(c.seed));
        }
        attacks::build(&c.attack.name, &params)
    }

    fn attack(&self, cell: &Cell, probe: &tch::Tensor) -> Result<Box<dyn Attack>> {
        let c = &cell.config;
        let inner = self.bare_attack(cell)?;
        Ok(match &c.surrogate {
            Some(s) => Box::new(Transfer::new(inner, Box::new(self.load(s, probe)?))?),
            None => inner,
        })
    }
}

impl Executor for RealExecutor {
    type Worker = Worker;

    fn worker(&self) -> Result<Worker> {
        tch::set_num_threads(self.threads_per_worker);
        Ok(Worker { data: BTreeMap::new(), device: self.device })
    }

    /// Images × (attack iterations + 2 evaluation passes) × EOT samples of an adaptive attack
    /// on a randomised defense. Iterations are the attack config's `steps` or `iterations`
    /// (+ `warmup`); an attack without them (FGSM) counts 1, a `steps` left to the attack's own
    /// variant-dependent default (DeepSloth) counts 30.
    fn work(&self, cell: &Cell) -> f64 {
        let c = &cell.config;
        let config = self.bare_attack(cell).map(|a| a.config_json()).unwrap_or(Value::Null);
        let count = |key: &str| config.get(key).and_then(Value::as_f64);
        let iterations = count("steps").or_else(|| count("iterations")).unwrap_or(if config.get("steps").is_some() { 30.0 } else { 1.0 }) + count("warmup").unwrap_or(0.0);
        let eot = match c.defense.mode {
            Some(DefenseMode::Adaptive) => c.defense.params.get("eot").and_then(Value::as_f64).unwrap_or(1.0),
            _ => 1.0,
        };
        c.n as f64 * (iterations + 2.0) * eot.max(1.0)
    }

    fn run(&self, worker: &mut Worker, cell: &Cell) -> Result<CellOutput> {
        let c = &cell.config;
        tch::manual_seed(c.seed as i64);
        let (spec, mode) = self.defense(cell)?;
        let calibration = spec.calibration_images().map(|n| worker.data(&c.data, Split::Train).map(|d| d.take(n))).transpose()?;
        let test = worker.data(&c.data, Split::Test)?;
        if c.n as i64 > test.len() {
            return Err(dynrobust_core::Error::config("n", format!("{}: {} has only {} images", c.n, test.name, test.len())));
        }
        let data = test.take(c.n as i64);
        let probe = data.images.narrow(0, 0, data.len().min(8));
        // a training-time defense loads its own checkpoint (run_defended); `net` is the bare model
        let net = self.load(&c.model, &probe)?;
        let attack = self.attack(cell, &probe)?;
        prepare_fit(&*attack, |n| Ok(worker.data(&c.data, Split::Train)?.take(n)))?;
        let shareable = (c.surrogate.is_some() || crafts_on_bare_model(&spec, mode)) && attack.batch_independent();
        let crafting_weights = self.model_path(c.surrogate.as_ref().unwrap_or(&c.model))?.map(|p| checkpoint_digest(&p)).transpose()?;
        let data_digest = self.images_digest(&c.data, Split::Test, c.n as i64)?;
        let mut identity = craft_identity(c, crafting_weights, attack.config_json(), &data_digest, self.device);
        // an attack fitted on training images crafts other examples when they change
        if let Some(n) = attack.fit_images() {
            identity["fit_images"] = json!(self.images_digest(&c.data, Split::Train, n)?);
        }
        let attack = CraftCache::new(attack, self.craft_cache.as_deref().filter(|_| shareable), &identity);
        let load = || self.load(&c.model, &probe);
        let own = net.name();
        let outcome = run_defended(net, &load, &spec, mode, &attack, &data, calibration.as_ref(), c.batch as i64, &mut |_| {}).map_err(|e| e.for_model(&own, &c.model.name))?;
        let mut record = outcome.record;
        if attack.all_hits() {
            record["seconds"] = json!(attack.cached_seconds());
            record["craft_cache"] = json!("hit");
        }
        if attack.is_on() {
            // batches served from the cache made no passes now: they report those of their
            // crafting, unknown (null) for a cache file written before passes were counted
            let per_image = attack.passes().map(|p| p.per_image(record["n"].as_i64().unwrap_or(c.n as i64)));
            (record["forward_passes"], record["gradient_passes"]) = (json!(per_image.map(|p| p.0)), json!(per_image.map(|p| p.1)));
        }
        let extra = json!({
            "model": c.model.name,
            "label": c.attack.label,
            "attack": c.attack.name,
            "surrogate": c.surrogate.as_ref().map(|s| s.name.clone()),
            "seed": c.seed,
            "eps": c.eps.or_else(|| record.get("eps").and_then(Value::as_f64)),
            "steps": dynrobust_core::attack::iterations_in(&record["config"]),
            "defense_label": c.defense.label,
            "device": device_name(self.device),
        });
        if let (Some(r), Some(e)) = (record.as_object_mut(), extra.as_object()) {
            r.extend(e.clone());
        }
        Ok(CellOutput { record, per_sample_csv: per_sample_csv(&outcome.per_sample) })
    }

    /// Loads every distinct native checkpoint the cells read (model, surrogate, a trained
    /// defense's) once; the first that does not load stops the run, naming the file, its role
    /// and the study's name for it. A denoiser is loaded when the study's defenses are parsed,
    /// and TorchScript files when a cell loads them (their protocol check needs images).
    fn preflight(&self, cells: &[&Cell]) -> Result<()> {
        let mut checked = std::collections::BTreeSet::new();
        for cell in cells {
            for read in self.checkpoints_read(cell, Some(&self.defense(cell)?.0)) {
                let read = read?;
                let Some(dir) = read.path.filter(|p| read.native && p.is_dir() && checked.insert(p.clone())) else { continue };
                checkpoint::load(&dir, Device::Cpu).map_err(|e| unloadable(e, &read.role, &read.name))?;
            }
        }
        Ok(())
    }

    /// Digests of the model's, the surrogate's and the defense's checkpoints, of the attack's
    /// and the defense's settings as this build resolves them (defaults filled in), of the
    /// test images and labels the cell evaluates, and of the training images a detector
    /// calibrates on or an attack fits on. The first that cannot be digested is the error.
    fn inputs(&self, cell: &Cell) -> Result<Inputs> {
        self.digest_inputs(cell, true)
    }

    /// [`RealExecutor::inputs`] leaving out what cannot be digested now (a checkpoint that is
    /// gone, a defense this build refuses), so the rest is still compared.
    fn comparable_inputs(&self, cell: &Cell) -> Inputs {
        self.digest_inputs(cell, false).unwrap_or_default()
    }

    /// The keys of the attack's stored `config` (a transfer cell's `inner_config`) and of the
    /// defense's stored `defense_params` that this build resolves differently.
    fn settings_changes(&self, cell: &Cell, record: &Value) -> Vec<String> {
        let prefixed = |side: &str, keys: Vec<String>| keys.into_iter().map(|k| format!("{side}.{k}")).collect::<Vec<_>>();
        let mut changes = Vec::new();
        if let Ok(now) = self.bare_attack(cell).map(|a| a.config_json()) {
            let stored = &record["config"];
            changes.extend(prefixed("attack", changed_keys(stored.get("inner_config").unwrap_or(stored), &now)));
        }
        if let (Some(stored), Ok(now)) = (record.get("defense_params"), self.defense(cell).and_then(|(spec, _)| spec.settings())) {
            changes.extend(prefixed("defense", changed_keys(stored, &now)));
        }
        changes
    }

    fn versions(&self) -> BTreeMap<String, String> {
        let mut versions = crate::runner::dynrobust_versions();
        versions.extend([("tch".to_string(), dynrobust_core::TCH_VERSION.to_string()), ("libtorch".to_string(), dynrobust_core::LIBTORCH_VERSION.to_string())]);
        versions
    }
}

impl RealExecutor {
    /// The inputs of `cell` ([`Executor::inputs`]); with `strict`, the first that cannot be
    /// digested is the error, else it is left out. A data set that does not load is always
    /// left out: the cell's run says why, and a report on a machine without it still compares
    /// the rest.
    fn digest_inputs(&self, cell: &Cell, strict: bool) -> Result<Inputs> {
        let c = &cell.config;
        let mut inputs = Inputs::new();
        let mut put = |role: &str, digest: Result<String>| match digest {
            Ok(digest) => {
                inputs.insert(role.to_string(), digest);
                Ok(())
            }
            Err(e) if strict => Err(e),
            Err(_) => Ok(()),
        };
        let attack = self.bare_attack(cell);
        let spec = self.defense(cell).map(|(spec, _)| spec);
        // how many training images are read depends on both plugins: with either unresolved,
        // the count (and so the digest) is not the one the cell ran with
        let training_images = match (&attack, &spec) {
            (Ok(attack), Ok(spec)) => spec.calibration_images().into_iter().chain(attack.fit_images()).max(),
            _ => None,
        };
        put(ATTACK_SETTINGS, attack.map(|a| settings_digest(&a.config_json())))?;
        let spec = match spec {
            Ok(spec) => {
                put(DEFENSE_SETTINGS, spec.settings().map(|s| settings_digest(&s)))?;
                Some(spec)
            }
            Err(e) => {
                put(DEFENSE_SETTINGS, Err(e))?;
                None
            }
        };
        // each checkpoint on its own: one that is gone leaves the others compared
        for read in self.checkpoints_read(cell, spec.as_ref()) {
            match read {
                Ok(CheckpointRead { role, path: Some(path), .. }) => put(&role, checkpoint_digest(&path))?,
                Ok(_) => {}
                Err(e) if strict => return Err(e),
                Err(_) => {}
            }
        }
        if let Ok(digest) = self.images_digest(&c.data, Split::Test, c.n as i64) {
            put(DATA, Ok(digest))?;
        }
        if let Some(n) = training_images {
            if let Ok(digest) = self.images_digest(&c.data, Split::Train, n) {
                put(TRAINING_DATA, Ok(digest))?;
            }
        }
        Ok(inputs)
    }
}

/// A checkpoint a cell reads, by role (`model`, `surrogate`, `defense`), under the study's name
/// for it; `native` when it is a dynrobust checkpoint directory (`checkpoint::load` reads it),
/// not a denoiser.
struct CheckpointRead {
    role: String,
    name: String,
    path: Option<PathBuf>,
    native: bool,
}

impl RealExecutor {
    /// The checkpoints `cell` reads, each on its own (a checkpoint that cannot be located is
    /// that role's error): the model's and the surrogate's (paths when they are files or
    /// directories on disk), and the defense's `spec`'s (a trained defense's, or each
    /// denoiser: roles `defense`, `defense 2`, … in step order).
    fn checkpoints_read(&self, cell: &Cell, spec: Option<&DefenseSpec>) -> Vec<Result<CheckpointRead>> {
        let c = &cell.config;
        let mut reads = vec![
            self.model_path(&c.model).map(|path| CheckpointRead { role: "model".into(), name: c.model.name.clone(), path, native: true }),
            c.surrogate.as_ref().map(|s| self.model_path(s)).transpose().map(|path| CheckpointRead {
                role: "surrogate".into(),
                name: c.surrogate.as_ref().map_or_else(String::new, |s| s.name.clone()),
                path: path.flatten(),
                native: true,
            }),
        ];
        let Some(spec) = spec else { return reads };
        let native = matches!(spec, DefenseSpec::Trained { .. });
        match spec.checkpoint_paths() {
            Ok(paths) => reads.extend(paths.into_iter().enumerate().map(|(i, path)| {
                Ok(CheckpointRead { role: if i == 0 { "defense".into() } else { format!("defense {}", i + 1) }, name: c.defense.label.clone(), path: Some(path), native })
            })),
            Err(e) => reads.push(Err(e)),
        }
        reads
    }
}

/// A checkpoint that does not load, as [`RealExecutor::preflight`] reports it: the loader's
/// error (naming the file and the problem) with the study's role and name for it.
fn unloadable(e: Error, role: &str, name: &str) -> Error {
    let context = format!("the study's {role} `{name}`; no cell ran");
    match e {
        Error::Checkpoint { path, problem } => Error::Checkpoint { path, problem: format!("{problem} ({context})") },
        other => Error::config(role, format!("{context}: {other}")),
    }
}

/// True when the cell's examples are crafted on the bare model it names (undefended, a
/// detector, or any oblivious cell), so they equal those of every other such cell.
fn crafts_on_bare_model(spec: &DefenseSpec, mode: Adaptivity) -> bool {
    match spec {
        DefenseSpec::None | DefenseSpec::Monitor(_) => true,
        DefenseSpec::Squeeze(_) | DefenseSpec::Trained { .. } | DefenseSpec::Transform { .. } | DefenseSpec::Budget(_) => mode == Adaptivity::Oblivious,
    }
}

/// Everything the crafted examples depend on, the crafting model's weights included (a
/// retrained checkpoint must not be served the old network's examples) and the attack's
/// settings as this build resolves them (nor must a changed default), the digest of the test
/// images and labels (a data set edited in place), the commit the attack's code was built from
/// and the device it ran on (a cell computed by another commit, or on another device, crafts
/// its own). A transfer attack
/// crafts on its surrogate whatever the victim and its defense, so its cells share examples
/// across victims. `random_starts` names how seeded attacks draw their starts (one per batch
/// since 2026-12-02, [`dynrobust_core::rng::SeededRng::for_batch`]), so a cache written
/// before is not served to them.
fn craft_identity(c: &crate::study::CellConfig, crafting_weights: Option<String>, settings: Value, data_digest: &str, device: Device) -> Value {
    let crafting_model = c.surrogate.as_ref().unwrap_or(&c.model);
    json!({ "crafting_model": crafting_model, "weights": crafting_weights, "transfer": c.surrogate.is_some(), "attack": c.attack.name,
            "params": c.attack.params, "settings": settings, "eps": c.eps, "seed": c.seed, "data": c.data, "test_images": data_digest, "n": c.n,
            "batch": c.batch, "random_starts": "per-batch", "dynrobust_commit": dynrobust_core::build_source(), "device": device_name(device) })
}

/// Per-sample rows: index, costs, correctness, exits.
pub fn per_sample_csv(p: &PerSample) -> String {
    let mut out = String::from("index,clean_cost,adv_cost,clean_correct,adv_correct,clean_exit,adv_exit\n");
    for i in 0..p.clean_cost.len() {
        let exit = |v: &Vec<i64>| v.get(i).map_or(String::new(), |e| e.to_string());
        out.push_str(&format!(
            "{i},{},{},{},{},{},{}\n",
            p.clean_cost[i], p.adv_cost[i], p.clean_correct[i] as u8, p.adv_correct[i] as u8, exit(&p.clean_exit), exit(&p.adv_exit)
        ));
    }
    out
}

/// A variant's training table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantTrain {
    /// Family: static, sdn, gated or skipnet.
    pub model: String,
    pub target_rate: Option<f64>,
    pub threshold: Option<f64>,
    pub epochs: Option<i64>,
    /// Training images per class (default: the whole training split).
    pub per_class: Option<i64>,
    /// With `per_class`: draw them at random with this seed instead of taking the first of
    /// each class (one independent draw per seed).
    pub per_class_draw: Option<u64>,
    /// Data set it trains on (default: the cell's), e.g. `mnist` for a cross-data-set
    /// surrogate (DeepSloth's scenario 2).
    pub data: Option<String>,
    pub lr: Option<f64>,
    #[serde(default)]
    pub seed: u64,
}

impl VariantTrain {
    /// What serde cannot check: `per_class_draw` needs `per_class`.
    pub fn check(&self) -> Result<()> {
        if self.per_class_draw.is_some() && self.per_class.is_none() {
            return Err(Error::config("per_class_draw", "needs `per_class` (the images per class to draw)"));
        }
        if let Some(e) = self.epochs.filter(|&e| e < 1) {
            return Err(Error::config("epochs", format!("{e}: expected ≥ 1")));
        }
        if let Some(k) = self.per_class.filter(|&k| k < 1) {
            return Err(Error::config("per_class", format!("{k}: expected ≥ 1")));
        }
        if let Some(lr) = self.lr {
            dynrobust_core::attack::check_positive("lr", lr)?;
        }
        let takes = Mechanism::parameter_of(&self.model);
        if self.threshold.is_some() && takes != Some("threshold") {
            return Err(Error::config("threshold", format!("applies to an sdn, not to `{}`", self.model)));
        }
        if self.target_rate.is_some() && takes != Some("target_rate") {
            return Err(Error::config("target_rate", format!("applies to gated and skipnet, not to `{}`", self.model)));
        }
        if let Some(mechanism) = Mechanism::family(&self.model, self.threshold, self.target_rate) {
            mechanism.check()?;
        }
        if let Some(data) = &self.data {
            if let Some(dir) = located_data(data)?.dir().filter(|d| !d.exists()) {
                return Err(Error::config("data", format!("`{data}`: no directory {}", dir.display())));
            }
        }
        Ok(())
    }
}

/// Trains every variant of `study` that has a training table and no checkpoint yet in
/// `variants_dir`, one after another (each training uses every core).
pub fn prepare_variants(study: &Study, variants_dir: &Path) -> Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    for cell in &study.cells {
        for m in std::iter::once(&cell.config.model).chain(cell.config.surrogate.as_ref()) {
            if let Some(table) = &m.train {
                if seen.insert(m.name.clone()) {
                    let dir = variants_dir.join(&m.name);
                    // shards of one study (Slurm array tasks) start together: one trains, the
                    // others wait on the lock and then find the checkpoint (saved atomically,
                    // sidecar last, so "the sidecar exists" means "the checkpoint is whole")
                    if !dir.join(checkpoint::SIDECAR_FILE).is_file() {
                        let _lock = lock_variant(variants_dir, &m.name)?;
                        if !dir.join(checkpoint::SIDECAR_FILE).is_file() {
                            train_variant(&m.name, table, &cell.config.data, &dir)?;
                            let path = dir.join(VARIANT_TABLE_FILE);
                            let trained_from = with_data(table, &cell.config.data);
                            crate::store::write_atomic(&path, serde_json::to_string_pretty(&trained_from)?.as_bytes())?;
                        }
                    }
                    check_variant_table(&m.name, table, &cell.config.data, &dir)?;
                }
            }
        }
    }
    Ok(())
}

/// The training table a variant was trained from, saved beside its checkpoint.
const VARIANT_TABLE_FILE: &str = "variant-train.json";

/// A variant's training table with the data set it trains on written in: its own `data`, else
/// the study's (`study_data`), so a study whose data set changed does not reuse the variant.
fn with_data(table: &Value, study_data: &str) -> Value {
    let mut table = table.clone();
    if let Some(map) = table.as_object_mut() {
        map.entry("data").or_insert_with(|| json!(study_data));
    }
    table
}

/// Refuses a variant whose training table (with its data set, [`with_data`]) changed since its
/// checkpoint was trained (a study edited and forced over the same directory): its cells would
/// otherwise be evaluated on the old network under new cell ids. Checkpoints from before the
/// table was saved pass, and a table saved before its data set was written in is compared
/// without it.
fn check_variant_table(name: &str, table: &Value, study_data: &str, dir: &Path) -> Result<()> {
    let path = dir.join(VARIANT_TABLE_FILE);
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(()) };
    let trained: Value = serde_json::from_str(&text).map_err(|e| Error::data(&path, e.to_string()))?;
    let table = if trained.get("data").is_some() { with_data(table, study_data) } else { table.clone() };
    if trained != table {
        return Err(Error::config(
            format!("variants.{name}.train"),
            format!("{table} differs from {trained}, which {} was trained from: rename the variant, or delete that directory to retrain it", dir.display()),
        ));
    }
    Ok(())
}

/// An exclusive lock on `OUT/models/.<name>.lock`, released when the file is dropped (also
/// when the process dies).
fn lock_variant(variants_dir: &Path, name: &str) -> Result<std::fs::File> {
    std::fs::create_dir_all(variants_dir).map_err(|e| Error::io(variants_dir, e))?;
    let path = variants_dir.join(format!(".{name}.lock"));
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(|e| Error::io(&path, e))?;
    if file.try_lock().is_err() {
        eprintln!("variant {name}: another process is training it; waiting for {}", path.display());
        file.lock().map_err(|e| Error::io(&path, e))?;
    }
    Ok(file)
}

fn train_variant(name: &str, table: &Value, data: &str, dir: &Path) -> Result<()> {
    let field = format!("variants.{name}.train");
    let v: VariantTrain = serde_json::from_value(table.clone()).map_err(|e| Error::config(&field, e.to_string()))?;
    let mechanism = Mechanism::family(&v.model, v.threshold, v.target_rate)
        .ok_or_else(|| Error::config(format!("{field}.model"), format!("`{}`: expected static, sdn, gated or skipnet", v.model)))?;
    let source = located_data(v.data.as_deref().unwrap_or(data))?;
    let mut train_set = source.load(Split::Train, None)?;
    let config = config_for_data(mechanism.clone(), &source, &train_set)?;
    v.check()?;
    if let Some(k) = v.per_class {
        train_set = train_set.per_class_or_drawn(k, v.per_class_draw)?;
    }
    let defaults = TrainConfig::default_for(&mechanism);
    let epochs = v.epochs.unwrap_or_else(|| default_epochs(defaults.epochs, train_set.len(), defaults.batch_size));
    let cfg = TrainConfig { epochs, lr: v.lr.unwrap_or(defaults.lr), seed: v.seed, ..defaults }.validated()?;
    let test_set = source.load(Split::Test, None)?.take(2000);
    tch::manual_seed(v.seed as i64);
    let mut net = Net::new(config.clone(), Device::Cpu)?;
    // the committed static weights fit only the 1×28×28, 10-class backbone and were trained on
    // the whole Fashion-MNIST training split; other shapes and k-shot or other-data surrogates
    // train from scratch
    let init_from = if matches!(mechanism, Mechanism::Static) || !may_start_from_committed_static(&config, &source, v.per_class.is_some()) {
        None
    } else {
        checkpoint::init_from(&mut net, &checkpoint::committed_dir("static").join(checkpoint::WEIGHTS_FILE))?;
        Some("models/checkpoints/static".to_string())
    };
    eprintln!("training variant {name} ({}) on {} images", v.model, train_set.len());
    let (report, loss) = train_family(&mut net, &train_set, &cfg, init_from.is_some())?;
    // the sidecar's scores are those of the net as `checkpoint::load` returns it (folded)
    net.fold_batch_norm();
    let evaluation = evaluate(&net, &test_set, 256)?;
    let sidecar = Sidecar {
        architecture: config,
        training: train_record(&train_set, &cfg.schedule(), &report, loss, init_from, format!("study variant `{name}`: {table}")),
        evaluation,
    };
    checkpoint::save(&net, &sidecar, dir)
}

/// The architecture for `data`: ResNet-14n for 1×28×28 images, the ResNet-20 layout otherwise,
/// with the data set's normalisation inside the model and as many classes as its labels use.
pub fn config_for_data(mechanism: Mechanism, source: &DataSpec, train: &Dataset) -> Result<ModelConfig> {
    let (mean, std) = source.normalisation_for(train);
    let dims = train.images.size();
    let classes = (i64::try_from(train.labels.max())? + 1).max(2);
    ModelConfig::for_input(mechanism, dims[1], dims[2], classes, mean, std)
}

/// Gives every randomised transform of a defense — `noise`, alone or as a step of a `chain` —
/// the cell's seed unless the study sets its own, so cells that differ only by seed draw
/// different noise (as the cell's seed drives every attack's random start).
pub fn seed_randomised(name: &str, params: &mut Value, seed: u64) {
    let seed_noise = |params: &mut Value| {
        if params.is_null() {
            *params = json!({});
        }
        if let Some(map) = params.as_object_mut() {
            map.entry("seed").or_insert(json!(seed));
        }
    };
    match name {
        "noise" => seed_noise(params),
        "chain" => {
            for step in params.get_mut("steps").and_then(Value::as_array_mut).into_iter().flatten() {
                if step.get("name").and_then(Value::as_str) == Some("noise") {
                    if let Some(map) = step.as_object_mut() {
                        seed_noise(map.entry("params").or_insert(Value::Null));
                    }
                }
            }
        }
        _ => {}
    }
}

/// A study's data set, its directory (if any) found like a path-named checkpoint: as written,
/// else under the project root ([`dynrobust_models::checkpoint::locate_path`]).
fn located_data(name: &str) -> Result<DataSpec> {
    let spec = DataSpec::parse(name)?;
    Ok(match spec.dir().and_then(|d| dynrobust_models::checkpoint::locate_path(&d.display().to_string())) {
        Some(found) => spec.with_dir(found),
        None => spec,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_variant_table_is_saved_with_the_data_set_it_trains_on() {
        let table = json!({ "model": "gated", "epochs": 1 });
        assert_eq!(with_data(&table, "mnist"), json!({ "model": "gated", "epochs": 1, "data": "mnist" }), "the study's data set");
        let own = json!({ "model": "static", "data": "fashion-mnist" });
        assert_eq!(with_data(&own, "mnist"), own, "the table's own data set wins");
    }
}
