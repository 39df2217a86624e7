//! Adversarial examples shared between cells that craft exactly the same thing.
//!
//! An oblivious cell crafts on the bare model — the same examples, bit for bit, as the
//! undefended cell of the same model, attack, ε, seed and data, and as every other oblivious
//! defense of that model. In `experiments/defenses.toml` that is 40 of 100 cells recomputing
//! an attack that already ran. A transfer cell crafts on its surrogate, whatever the victim:
//! the seed study's transfer matrices craft each surrogate's examples once. [`CraftCache`] wraps the attack of such a cell: each batch's
//! examples are stored under `OUT/craft-cache/<key>-<batch>.safetensors` (written atomically,
//! with the clean batch and the crafting time) the first time, and read back afterwards when
//! the clean batch is identical. A cell whose every batch came from the cache reports the
//! original crafting time and says `"craft_cache": "hit"` in its record. The model passes of
//! each batch are stored with it too, so a cell served from the cache reports the passes its
//! examples took to craft.

use std::cell::Cell;
use std::path::{Path, PathBuf};

use dynrobust_core::attack::Attack;
use dynrobust_core::queries::{Counted, PassCount};
use dynrobust_core::{DynamicModel, Error, Result};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use dynrobust_core::atomic_file::{replace_atomic, temporary_path};

/// An attack whose crafted batches are cached on disk.
pub struct CraftCache {
    inner: Box<dyn Attack>,
    /// `None`: the cache is off for this cell and the wrapper only passes calls through.
    dir: Option<PathBuf>,
    key: String,
    calls: Cell<usize>,
    hits: Cell<usize>,
    store_failures: Cell<usize>,
    cached_seconds: Cell<f64>,
    /// Model passes of every batch, counted when crafted and stored with it (`None` once a
    /// batch came from a cache file written before passes were counted).
    passes: Cell<Option<PassCount>>,
}

impl CraftCache {
    /// Wraps `inner`, caching in `dir` (`None`: no caching, calls pass through); `identity`
    /// must name everything the crafted examples depend on (crafting model and its weights,
    /// attack and its resolved settings, ε, seed, data and a digest of its test images, n,
    /// batch, build commit, device).
    pub fn new(inner: Box<dyn Attack>, dir: Option<&Path>, identity: &Value) -> Self {
        let digest = Sha256::digest(identity.to_string().as_bytes());
        let key: String = digest.iter().take(10).map(|b| format!("{b:02x}")).collect();
        CraftCache { inner, dir: dir.map(Path::to_path_buf), key, calls: Cell::new(0), hits: Cell::new(0), store_failures: Cell::new(0), cached_seconds: Cell::new(0.0), passes: Cell::new(Some(PassCount::default())) }
    }

    /// True when the cache is on for this cell.
    pub fn is_on(&self) -> bool {
        self.dir.is_some()
    }

    /// True when every batch crafted so far came from the cache.
    pub fn all_hits(&self) -> bool {
        self.calls.get() > 0 && self.hits.get() == self.calls.get()
    }

    /// Batches that could not be stored (each was reported on stderr; the cell went on).
    pub fn store_failures(&self) -> usize {
        self.store_failures.get()
    }

    /// The crafting seconds recorded with the cached batches.
    pub fn cached_seconds(&self) -> f64 {
        self.cached_seconds.get()
    }

    /// The model passes of every batch so far — crafted now or when the cached batch was
    /// crafted — when every batch's count is known (meaningful when [`CraftCache::is_on`]).
    pub fn passes(&self) -> Option<PassCount> {
        self.passes.get()
    }

    fn add_passes(&self, more: Option<PassCount>) {
        self.passes.set(self.passes.get().zip(more).map(|(a, b)| a + b));
    }

    fn path(&self, dir: &Path, batch: usize) -> PathBuf {
        dir.join(format!("{}-{batch}.safetensors", self.key))
    }

    fn lookup(&self, path: &Path, x: &Tensor) -> Option<(Tensor, f64, Option<PassCount>)> {
        let named = Tensor::read_safetensors(path).ok()?;
        let get = |k: &str| named.iter().find(|(n, _)| n == k).map(|(_, t)| t.shallow_clone());
        let (clean, adv, seconds) = (get("x")?, get("x_adv")?, get("seconds")?);
        if clean.size() != x.size() || !clean.equal(&x.to_device(Device::Cpu)) {
            return None;
        }
        let passes = get("passes").map(|p| PassCount { forward: p.int64_value(&[0]) as u64, gradient: p.int64_value(&[1]) as u64 });
        Some((adv.to_device(x.device()), seconds.double_value(&[0]), passes))
    }

    fn store(&self, dir: &Path, path: &Path, x: &Tensor, x_adv: &Tensor, seconds: f64, passes: PassCount) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        // a name of this writer's own: two cells may store the same batch at the same moment
        let cpu = |t: &Tensor| t.to_device(Device::Cpu).contiguous();
        let secs = Tensor::from_slice(&[seconds]).to_kind(Kind::Double);
        let passes = Tensor::from_slice(&[passes.forward as i64, passes.gradient as i64]);
        let named = [("x", cpu(x)), ("x_adv", cpu(x_adv)), ("seconds", secs), ("passes", passes)];
        replace_atomic(path, &temporary_path(path), |tmp| Ok(Tensor::write_safetensors(&named, tmp)?))
    }
}

impl Attack for CraftCache {
    dynrobust_core::delegate_attack!(inner; name, goal, requirements, config_json, iterations, budget, batch_independent, fit_images, set_fit_data);
    /// The inner attack's tally, unless a batch came from the cache (its counts were not
    /// made in this run, so the tally would cover only part of it).
    fn take_tally(&self) -> Option<Value> {
        let inner = self.inner.take_tally();
        if self.hits.get() > 0 {
            None
        } else {
            inner
        }
    }
    fn perturb(&self, model: &dyn DynamicModel, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let Some(dir) = &self.dir else { return self.inner.perturb(model, x, y) };
        let batch = self.calls.get();
        self.calls.set(batch + 1);
        let path = self.path(dir, batch);
        if let Some((x_adv, seconds, passes)) = self.lookup(&path, x) {
            self.hits.set(self.hits.get() + 1);
            self.cached_seconds.set(self.cached_seconds.get() + seconds);
            self.add_passes(passes);
            return Ok(x_adv);
        }
        let start = std::time::Instant::now();
        let counted = Counted::new(model);
        let x_adv = self.inner.perturb(&counted, x, y)?;
        let seconds = start.elapsed().as_secs_f64();
        self.cached_seconds.set(self.cached_seconds.get() + seconds);
        self.add_passes(Some(counted.count()));
        // the crafted batch is good whether or not it could be shared: a failed store only
        // means later cells craft it themselves
        if let Err(e) = self.store(dir, &path, x, &x_adv.detach(), seconds, counted.count()) {
            self.store_failures.set(self.store_failures.get() + 1);
            eprintln!("warning: craft cache: could not store {} ({e}); the cell goes on without it", path.display());
        }
        Ok(x_adv)
    }
}
