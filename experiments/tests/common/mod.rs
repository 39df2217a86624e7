//! Shared test helpers: the plugin names of the real crates, a fake executor (no tch) and a
//! small study.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};

use dynrobust_core::{Error, Result};
use dynrobust_experiments::{Cell, CellOutput, Executor, Registry, Study};

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The names of the real plugins (as `dynrobust list` prints them).
/// The real plugin names (the crates' registries).
pub fn registry() -> Registry {
    dynrobust_experiments::execute::registry()
}

pub const SMALL: &str = r#"
name = "small"
data = "fashion-mnist"
n = 8
seeds = [0, 1]
eps = ["8/255", "4/255"]
models = ["static", "sdn", "gated"]

[[attacks]]
name = "pgd-linf"
params = { steps = 2 }

[[attacks]]
name = "ilfo"

[[defenses]]
name = "none"

[[defenses]]
name = "bitdepth"
params = { bits = 4 }
modes = ["adaptive", "oblivious"]
"#;

pub fn small_study() -> Study {
    Study::parse(SMALL, "small.toml", &registry()).expect("the small study parses")
}

/// A deterministic executor: the record is a function of the cell; cells of `fail_model` fail,
/// and `panic_model` panics.
#[derive(Default)]
pub struct Fake {
    pub fail_model: Option<String>,
    pub panic_model: Option<String>,
    /// The model whose checkpoint is "retrained": its digest reads `v2` instead of `v1`.
    pub retrained: Option<String>,
    pub runs: AtomicUsize,
    pub workers: AtomicUsize,
}

impl Executor for Fake {
    type Worker = std::rc::Rc<String>; // deliberately not Send

    fn worker(&self) -> Result<Self::Worker> {
        self.workers.fetch_add(1, Ordering::SeqCst);
        Ok(std::rc::Rc::new("worker".into()))
    }

    fn inputs(&self, cell: &Cell) -> Result<dynrobust_experiments::provenance::Inputs> {
        let model = &cell.config.model.name;
        let version = if self.retrained.as_ref() == Some(model) { "v2" } else { "v1" };
        Ok([("model".to_string(), format!("{model}-{version}"))].into())
    }

    fn run(&self, _worker: &mut Self::Worker, cell: &Cell) -> Result<CellOutput> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let c = &cell.config;
        if self.fail_model.as_deref() == Some(c.model.name.as_str()) {
            return Err(Error::Model { model: c.model.name.clone(), problem: "fake failure".into() });
        }
        if self.panic_model.as_deref() == Some(c.model.name.as_str()) {
            panic!("fake panic");
        }
        let eps = c.eps.unwrap_or(0.0);
        let record = serde_json::json!({
            "model": c.model.name, "attack": c.attack.name, "label": c.attack.label,
            "defense": c.defense.name, "defense_mode": c.defense.mode, "surrogate": c.surrogate.as_ref().map(|s| &s.name),
            "eps": c.eps, "seed": c.seed, "n": c.n,
            "clean_acc": 0.9, "adv_acc": 0.9 - 10.0 * eps, "clean_cost": 0.5, "adv_cost": 0.5 + eps,
            "recovery": 2.0 * eps, "seconds": 0.01, "flags": [],
        });
        let csv = format!("sample,clean_correct,adv_correct\n0,true,{}\n1,true,true\n", eps > 0.02);
        Ok(CellOutput { record, per_sample_csv: csv })
    }
}
