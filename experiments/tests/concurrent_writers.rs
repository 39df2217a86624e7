//! Several writers of the same file at once — the worker threads of one `dynrobust run`, or
//! the shards of a Slurm array sharing one output directory — must each succeed and leave a
//! whole file: two cells that craft the same examples (an undefended and an oblivious cell)
//! may finish the same craft-cache batch at the same moment.

use std::sync::{Arc, Barrier};

use dynrobust_core::attack::{Attack, Goal, Norm, Requirements};
use dynrobust_core::{DynamicModel, Result};
use dynrobust_experiments::craft_cache::CraftCache;
use dynrobust_experiments::store::write_atomic;
use dynrobust_models::{Mechanism, ModelConfig, Net};
use serde_json::json;
use tch::{Device, Kind, Tensor};

/// A deterministic stand-in attack: x + 0.1, clipped to [0,1], after a pause that keeps the
/// cells in step, so they miss the cache together and store the same batch together.
struct Shift;

impl Attack for Shift {
    fn name(&self) -> &'static str {
        "shift"
    }
    fn goal(&self) -> Goal {
        Goal::Accuracy
    }
    fn requirements(&self) -> Requirements {
        Requirements::default()
    }
    fn config_json(&self) -> serde_json::Value {
        json!({})
    }
    fn budget(&self) -> Option<(f64, Norm)> {
        None
    }
    fn perturb(&self, _model: &dyn DynamicModel, x: &Tensor, _y: &Tensor) -> Result<Tensor> {
        std::thread::sleep(std::time::Duration::from_millis(2));
        Ok((x + 0.1).clamp(0.0, 1.0))
    }
}

const WRITERS: usize = 4;
const ROUNDS: usize = 40;

#[test]
fn concurrent_atomic_writes_of_one_file_all_succeed_and_leave_a_whole_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cell.json");
    let start = Arc::new(Barrier::new(WRITERS));
    let handles: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (path, start) = (path.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                for round in 0..ROUNDS {
                    let body = format!("{{\"writer\": {w}, \"round\": {round}, \"pad\": \"{}\"}}", "x".repeat(4096));
                    write_atomic(&path, body.as_bytes()).unwrap_or_else(|e| panic!("writer {w}, round {round}: {e}"));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("a writer failed");
    }
    let text = std::fs::read_to_string(&path).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).expect("the file is one writer's whole record");
    assert_eq!(v["round"], json!(ROUNDS - 1));
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).filter(|n| n != "cell.json").collect();
    assert!(leftovers.is_empty(), "temporary files left behind: {leftovers:?}");
}

#[test]
fn concurrent_cells_crafting_the_same_batches_all_succeed_and_agree() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("craft-cache");
    let start = Arc::new(Barrier::new(WRITERS));
    let handles: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (cache, start) = (cache.clone(), start.clone());
            std::thread::spawn(move || {
                tch::set_num_threads(1);
                let net = Net::new(ModelConfig::resnet14n(Mechanism::Static, 0.286, 0.353).unwrap(), Device::Cpu).unwrap();
                let attack = CraftCache::new(Box::new(Shift), Some(&cache), &json!({"same": "identity"}));
                let y = Tensor::zeros([8], (Kind::Int64, Device::Cpu));
                start.wait();
                let values = (0..ROUNDS)
                    .map(|batch| {
                        let x = Tensor::full([8, 1, 28, 28], batch as f64 / ROUNDS as f64, (Kind::Float, Device::Cpu));
                        let x_adv = attack.perturb(&net, &x, &y).unwrap_or_else(|e| panic!("cell {w}, batch {batch}: {e}"));
                        x_adv.double_value(&[0, 0, 0, 0])
                    })
                    .collect::<Vec<f64>>();
                assert_eq!(attack.store_failures(), 0, "cell {w} could not store some batches");
                values
            })
        })
        .collect();
    let results: Vec<Vec<f64>> = handles.into_iter().map(|h| h.join().expect("a cell failed")).collect();
    for (batch, value) in results[0].iter().enumerate() {
        let expected = (batch as f64 / ROUNDS as f64 + 0.1).min(1.0);
        assert!((value - expected).abs() < 1e-6, "batch {batch}: {value} vs {expected}");
    }
    assert!(results.iter().all(|r| r == &results[0]), "the cells disagree");
    let leftovers: Vec<_> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| !n.ends_with(".safetensors")).collect();
    assert!(leftovers.is_empty(), "temporary files left behind: {leftovers:?}");
}

/// Two runs of the same cells into one directory: a second whole run, or a shard beside a
/// whole run, is refused while the first holds the directory (naming the host and process);
/// the shards of one study run side by side, but not the same shard twice nor a whole run
/// beside them; the locks are free again once their holders are dropped.
#[test]
fn a_second_run_into_the_same_directory_is_refused_while_the_first_runs() {
    let dir = tempfile::tempdir().unwrap();
    let store = dynrobust_experiments::Store::open(dir.path(), "name = \"t\"\n", false).unwrap();
    let whole = store.lock_run(None).unwrap();
    let err = store.lock_run(None).err().expect("a second whole run").to_string();
    assert!(err.contains("another `dynrobust run` of these cells is writing into this directory") && err.contains(&format!(":{})", std::process::id())), "{err}");
    assert!(store.lock_run(Some((0, 2))).is_err(), "a shard beside the whole run");
    drop(whole);
    let shard_0 = store.lock_run(Some((0, 2))).expect("a shard");
    let shard_1 = store.lock_run(Some((1, 2))).expect("the other shard beside it");
    assert!(store.lock_run(Some((0, 2))).is_err(), "not the same shard twice");
    let err = store.lock_run(None).err().expect("not a whole run beside the shards").to_string();
    assert!(err.contains("(shards of a Slurm array)"), "{err}");
    drop((shard_0, shard_1));
    store.lock_run(None).expect("free again once the shards end");
}
