//! Cells that craft on the bare model (undefended, oblivious) share their crafted examples
//! through OUT/craft-cache: the results equal a run without the cache, field for field, and
//! the cells served from the cache say so.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

const STUDY: &str = r#"
name = "cache"
data = "fashion-mnist"
n = 32
batch = 16
seeds = [0]
eps = ["8/255"]
models = ["sdn"]

[[attacks]]
name = "deepsloth"
params = { steps = 3 }

[[defenses]]
name = "none"

[[defenses]]
name = "bitdepth"
params = { bits = 4 }
modes = ["adaptive", "oblivious"]

[[defenses]]
name = "median"
params = { kernel = 3 }
modes = ["oblivious"]
"#;

fn dynrobust(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dynrobust")).args(args).env_remove("LD_LIBRARY_PATH").output().expect("run dynrobust")
}

fn records(out: &Path) -> Vec<(String, Value)> {
    let mut v: Vec<(String, Value)> = std::fs::read_dir(out.join("cells"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let cell: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            (cell["id"].as_str().unwrap().to_string(), cell["record"].clone())
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

const TRANSFER: &str = r#"
name = "cache-transfer"
data = "fashion-mnist"
n = 32
batch = 32
seeds = [0]
eps = ["8/255"]
models = ["static", "sdn", "skipnet"]

[[attacks]]
name = "pgd-linf"
params = { steps = 2 }
surrogates = ["gated"]

[[defenses]]
name = "none"
"#;

/// (cell id, record) of every stored cell.
type Records = Vec<(String, Value)>;

fn run_both(tmp: &Path, text: &str) -> (Records, Records) {
    let study = tmp.join("study.toml");
    std::fs::write(&study, text).unwrap();
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.join(name);
        let mut args = vec!["run", study.to_str().unwrap(), "--out", out.to_str().unwrap(), "--workers", "1", "--no-report"];
        args.extend_from_slice(extra);
        let o = dynrobust(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        records(&out)
    };
    (run("cached", &[]), run("fresh", &["--no-craft-cache"]))
}

fn assert_same(cached: &[(String, Value)], fresh: &[(String, Value)]) {
    assert_eq!(cached.iter().map(|c| &c.0).collect::<Vec<_>>(), fresh.iter().map(|c| &c.0).collect::<Vec<_>>());
    for ((id, a), (_, b)) in cached.iter().zip(fresh.iter()) {
        for key in ["clean_acc", "adv_acc", "clean_cost", "adv_cost", "recovery", "l2_mean", "linf_max", "mse", "adv_exit_hist", "flags", "forward_passes", "gradient_passes"] {
            assert_eq!(a[key], b[key], "cell {id} ({} {}): {key}", a["defense_label"], a["defense_mode"]);
        }
        assert!(b.get("craft_cache").is_none(), "no cache, no hit");
    }
}

#[test]
fn cached_crafting_gives_the_results_of_crafting_every_time() {
    let tmp = tempfile::tempdir().unwrap();
    let (cached, fresh) = run_both(tmp.path(), STUDY);
    assert_eq!(cached.len(), 4);
    assert_same(&cached, &fresh);
    let hits: Vec<&Value> = cached.iter().map(|c| &c.1).filter(|r| r["craft_cache"] == "hit").collect();
    // none, bitdepth-oblivious and median-oblivious craft the same examples: the first crafts,
    // the other two read; the adaptive bitdepth cell crafts through the defense and never reads
    assert_eq!(hits.len(), 2, "{cached:?}");
    assert!(hits.iter().all(|r| r["defense_mode"] == "oblivious" || r["defense"] == "none"));
    assert!(hits.iter().all(|r| r["seconds"].as_f64().unwrap() > 0.0), "the original crafting time is reported");
    assert!(cached.iter().any(|c| c.1["defense"] == "bitdepth" && c.1["defense_mode"] == "adaptive" && c.1.get("craft_cache").is_none()));
    assert_eq!(std::fs::read_dir(tmp.path().join("cached/craft-cache")).unwrap().count(), 2, "one file per batch");
    // a cell served from the cache reports the passes its examples took to craft: 3 steps
    assert!(cached.iter().all(|c| c.1["gradient_passes"] == 3.0 && c.1["forward_passes"] == 3.0), "{cached:?}");
}

#[test]
fn transfer_cells_share_the_surrogate_examples_across_victims() {
    let tmp = tempfile::tempdir().unwrap();
    let (cached, fresh) = run_both(tmp.path(), TRANSFER);
    assert_eq!(cached.len(), 3);
    assert_same(&cached, &fresh);
    let hits = cached.iter().filter(|c| c.1["craft_cache"] == "hit").count();
    assert_eq!(hits, 2, "crafted once on gated, read for the other two victims: {cached:?}");
    // the victims are never queried: the examples are crafted on the surrogate
    assert!(cached.iter().all(|c| c.1["forward_passes"] == 0.0), "{cached:?}");
    assert_eq!(std::fs::read_dir(tmp.path().join("cached/craft-cache")).unwrap().count(), 1);
}
