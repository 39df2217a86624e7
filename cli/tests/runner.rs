//! The study runner end to end, on a small real study (static and SDN models, FGSM and 2-step
//! PGD, no defense and bit-depth adaptive/oblivious, two ε, two seeds; 48 cells of 16 images):
//!
//! - a run killed with SIGKILL mid-way and rerun holds every cell exactly once, equal to an
//!   uninterrupted run (timings aside), and no partial file;
//! - two shards into one directory, then `merge`, equal one run; `merge` refuses an incomplete
//!   set, naming the missing cells;
//! - the same through a real single-node Slurm cluster (slurmctld + slurmd), when root: a
//!   4-task job array, merged, equal cell by cell. Skipped with the reason otherwise.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const STUDY: &str = r#"
name = "tiny"
data = "fashion-mnist"
n = 16
batch = 16
seeds = [0, 1]
eps = ["8/255", "4/255"]
models = ["static", "sdn"]

[[attacks]]
name = "fgsm"

[[attacks]]
name = "pgd-linf"
params = { steps = 2 }

[[defenses]]
name = "none"

[[defenses]]
name = "bitdepth"
params = { bits = 4 }
modes = ["adaptive", "oblivious"]
"#;

const CELLS: usize = 2 * 3 * 2 * 2 * 2;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_dynrobust")
}

fn dynrobust(args: &[&str]) -> Output {
    Command::new(bin()).args(args).env_remove("LD_LIBRARY_PATH").output().expect("run dynrobust")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dynrobust-runner-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn study_file(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.toml");
    std::fs::write(&path, STUDY).unwrap();
    path
}

fn run(study: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["run", study.to_str().unwrap(), "--out", out.to_str().unwrap(), "--workers", "2"];
    args.extend_from_slice(extra);
    dynrobust(&args)
}

/// Stored records by cell id, without the fields that measure time or depend on scheduling
/// (`craft_cache`: whether this cell or another one sharing its examples crafted them first),
/// each with its per-sample CSV under `per_sample_csv` (checked for its header and one row per
/// image), so runs compare sample by sample too.
fn records(out: &Path) -> BTreeMap<String, Value> {
    let mut map = BTreeMap::new();
    for entry in std::fs::read_dir(out.join("cells")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(!name.contains(".tmp"), "leftover temporary file {name}");
        if !name.ends_with(".json") {
            continue;
        }
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap_or_else(|e| panic!("{name} is not valid JSON: {e}"));
        let id = v["id"].as_str().unwrap().to_string();
        assert_eq!(format!("{id}.json"), name);
        for key in ["seconds", "rapl_attack_j", "rapl_note", "craft_cache"] {
            v["record"].as_object_mut().unwrap().remove(key);
        }
        v.as_object_mut().unwrap().remove("finished_at");
        let csv = std::fs::read_to_string(out.join("cells").join(format!("{id}.csv"))).unwrap_or_else(|e| panic!("cell {id}: its per-sample CSV: {e}"));
        let mut rows = csv.lines();
        assert_eq!(rows.next(), Some("index,clean_cost,adv_cost,clean_correct,adv_correct,clean_exit,adv_exit"), "cell {id}");
        let indices: Vec<String> = rows.map(|row| row.split(',').next().unwrap().to_string()).collect();
        let n = v["record"]["n"].as_u64().unwrap_or_else(|| panic!("cell {id}: no n in {}", v["record"]));
        assert_eq!(indices, (0..n).map(|i| i.to_string()).collect::<Vec<_>>(), "cell {id}: one row per image, in order");
        v["per_sample_csv"] = Value::String(csv);
        assert!(map.insert(id, v).is_none());
    }
    map
}

fn assert_same(a: &BTreeMap<String, Value>, b: &BTreeMap<String, Value>, what: &str) {
    assert_eq!(a.len(), CELLS, "reference run incomplete");
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{what}: different cell sets");
    for (id, v) in a {
        assert_eq!(v, &b[id], "{what}: cell {id} differs");
    }
}

/// One uninterrupted run, shared by the tests of this binary.
fn reference() -> &'static BTreeMap<String, Value> {
    static REF: std::sync::OnceLock<BTreeMap<String, Value>> = std::sync::OnceLock::new();
    REF.get_or_init(|| {
        let dir = scratch("reference");
        let out = dir.join("out");
        let o = run(&study_file(&dir), &out, &[]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(out.join("report.md").is_file());
        let records = records(&out);
        // every cell names the build that computed it: the source `--version` names, the
        // tch and libtorch it was built with
        let version = String::from_utf8_lossy(&dynrobust(&["--version"]).stdout).trim().to_string();
        for cell in records.values() {
            let versions = &cell["versions"];
            assert!(version.ends_with(&format!("(commit {})", versions["dynrobust_commit"].as_str().unwrap())), "{versions} vs {version}");
            assert_eq!(versions["tch"], "0.26.0");
            assert!(versions["libtorch"].as_str().is_some_and(|v| v == "2.13.0" || v.starts_with("2.13.0+")), "{versions}");
        }
        records
    })
}

#[test]
fn killed_run_resumes_to_the_same_results() {
    let reference = reference();
    let dir = scratch("kill");
    let (study, out) = (study_file(&dir), dir.join("out"));
    let mut child = Command::new(bin())
        .args(["run", study.to_str().unwrap(), "--out", out.to_str().unwrap(), "--workers", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let finished = || std::fs::read_dir(out.join("cells")).map(|d| d.filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "json")).count()).unwrap_or(0);
    while finished() < 10 && start.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let partial = finished();
    eprintln!("killed after {partial} of {CELLS} cells");
    assert!((10..CELLS).contains(&partial), "the kill should land mid-run ({partial} cells)");
    // what the kill leaves when it lands mid-write (it does now and then): a temporary file of
    // the dead writer beside the record it was writing; planted so every run checks the sweep
    let planted = out.join(format!("cells/0123456789abcdef.json.tmp.{}.{}.0badf00d.7", dynrobust_core::atomic_file::host_tag(), child.id()));
    std::fs::write(&planted, b"{\"half").unwrap();
    let o = run(&study, &out, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(!planted.exists() && err.contains("temporary files left by interrupted writes"), "{err}");
    assert!(err.contains(&format!("skipped {partial} already done")), "the rerun should skip exactly the {partial} finished cells: {err}");
    assert_same(reference, &records(&out), "killed and resumed run");
    let lines = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), CELLS, "results.jsonl holds every cell exactly once");
}

#[test]
fn shards_merge_to_the_same_results_and_merge_names_missing_cells() {
    let reference = reference();
    let dir = scratch("shards");
    let (study, out) = (study_file(&dir), dir.join("out"));
    let o = run(&study, &out, &["--shard", "0/2", "--no-report"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = dynrobust(&["merge", out.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "merge accepted half the cells");
    let missing: Vec<&String> = reference.keys().filter(|id| !out.join("cells").join(format!("{id}.json")).exists()).collect();
    assert_eq!(missing.len(), CELLS / 2);
    assert!(missing.iter().all(|id| err.contains(id.as_str())), "merge error does not name the missing cells: {err}");
    let o = run(&study, &out, &["--shard", "1/2", "--no-report"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = dynrobust(&["merge", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("report.md").is_file());
    assert_same(reference, &records(&out), "two shards merged");
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

#[test]
fn slurm_job_array_merges_to_the_same_results() {
    if !is_root() {
        eprintln!("SKIPPED slurm_job_array_merges_to_the_same_results: starting slurmctld/slurmd needs root");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let script = root.join("scripts/slurm-local.sh");
    let start = Command::new(&script).arg("start").output().unwrap();
    // as root the test must run: only a missing root is a reason to skip (the issue's rule)
    assert!(start.status.success(), "could not start a local Slurm as root: {}", String::from_utf8_lossy(&start.stderr));
    let reference = reference();
    let dir = scratch("slurm");
    let (study, out) = (study_file(&dir), dir.join("out"));
    let sbatch_script = dir.join("tiny.sbatch");
    let o = dynrobust(&["slurm", study.to_str().unwrap(), "--tasks", "4", "--cpus", "1", "--out", out.to_str().unwrap(), "--script", sbatch_script.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let submit = Command::new("sbatch").args(["--parsable", sbatch_script.to_str().unwrap()]).current_dir(&dir).output().unwrap();
    assert!(submit.status.success(), "sbatch: {}", String::from_utf8_lossy(&submit.stderr));
    let job = String::from_utf8_lossy(&submit.stdout).trim().split(';').next().unwrap().to_string();
    let begin = Instant::now();
    loop {
        let q = Command::new("squeue").args(["-h", "-j", &job]).output().unwrap();
        if String::from_utf8_lossy(&q.stdout).trim().is_empty() {
            break;
        }
        assert!(begin.elapsed() < Duration::from_secs(900), "job array {job} still queued/running after 15 min");
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("slurm job array {job} finished in {:.0} s", begin.elapsed().as_secs_f64());
    let logs: Vec<PathBuf> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().path()).filter(|p| p.to_string_lossy().contains("slurm-")).collect();
    assert_eq!(logs.len(), 4, "one log per array task: {logs:?}");
    let o = dynrobust(&["merge", out.to_str().unwrap()]);
    let logs_text: String = logs.iter().map(|p| std::fs::read_to_string(p).unwrap_or_default()).collect();
    assert!(o.status.success(), "merge after the job array: {}\ntask logs:\n{logs_text}", String::from_utf8_lossy(&o.stderr));
    assert_same(reference, &records(&out), "Slurm job array merged");
}

#[test]
fn a_run_sweeps_temporary_files_that_interrupted_writers_left_behind() {
    let dir = scratch("sweep");
    let study = dir.join("one.toml");
    std::fs::write(&study, "name = \"one\"\ndata = \"fashion-mnist\"\nn = 8\nbatch = 8\neps = [\"8/255\"]\nmodels = [\"static\"]\n\n[[attacks]]\nname = \"fgsm\"\n\n[[defenses]]\nname = \"none\"\n").unwrap();
    let out = dir.join("out");
    // what a writer killed mid-write leaves beside the file it was writing, in the older
    // NAME.tmp.PID.NONCE.N form (no host: only their age can tell they are stale)
    let old = [out.join("cells/abc.json.tmp.4242.0badf00d.0"), out.join("craft-cache/k-0.safetensors.tmp.4242.0badf00d.1"), out.join("models/v/model.safetensors.tmp.7.deadbeef.2")];
    let fresh = out.join("cells/def.json.tmp.4343.0badf00d.0");
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    for path in old.iter().chain([&fresh]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"half").unwrap();
    }
    for path in &old {
        std::fs::File::options().write(true).open(path).unwrap().set_modified(two_hours_ago).unwrap();
    }
    let o = dynrobust(&["run", study.to_str().unwrap(), "--out", out.to_str().unwrap(), "--no-report"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("removed 3 temporary files left by interrupted writes"), "{err}");
    for path in &old {
        assert!(!path.exists(), "{} survived the sweep", path.display());
    }
    assert!(fresh.exists(), "a temporary file under a minute old may belong to a live writer: kept");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Copies a committed checkpoint directory to `to`.
fn copy_checkpoint(name: &str, to: &Path) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/checkpoints").join(name);
    std::fs::create_dir_all(to).unwrap();
    for file in ["model.json", "model.safetensors"] {
        std::fs::copy(from.join(file), to.join(file)).unwrap();
    }
}

/// `DIR/model` (a copy of `static`), `DIR/defended` (of `static-pgd-at`) and `DIR/NAME.toml`:
/// FGSM at each of `eps` (TOML strings) on the model, undefended and behind `pgd-at` with that
/// checkpoint. Returns (model, defended, study).
fn fgsm_study(dir: &Path, name: &str, eps: &str) -> (PathBuf, PathBuf, PathBuf) {
    let (model, defended) = (dir.join("model"), dir.join("defended"));
    copy_checkpoint("static", &model);
    copy_checkpoint("static-pgd-at", &defended);
    let study = dir.join(format!("{name}.toml"));
    let text = format!(
        "name = \"{name}\"\ndata = \"fashion-mnist\"\nn = 8\nbatch = 8\neps = [{eps}]\nmodels = [\"{}\"]\n\n[[attacks]]\nname = \"fgsm\"\n\n\
         [[defenses]]\nname = \"none\"\n\n[[defenses]]\nname = \"pgd-at\"\nparams = {{ checkpoint = \"{}\" }}\n",
        model.display(),
        defended.display()
    );
    std::fs::write(&study, text).unwrap();
    (model, defended, study)
}

/// A damaged checkpoint stops a study before any cell runs, with one error that names the
/// role, the file and the problem, instead of failing every cell that reads it.
#[test]
fn a_damaged_checkpoint_stops_the_run_before_any_cell() {
    let dir = scratch("damaged");
    let (model, defended, study) = fgsm_study(&dir, "four", "\"4/255\", \"8/255\"");
    let weights = model.join("model.safetensors");
    let tensors = tch::Tensor::read_safetensors(&weights).unwrap();
    let nan: Vec<(String, tch::Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), if n == "head.weight" { t.fill(f64::NAN) } else { t.shallow_clone() })).collect();
    tch::Tensor::write_safetensors(&nan, &weights).unwrap();
    let out = dir.join("out");
    let o = run(&study, &out, &["--no-report"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    let named = format!("the study's model `{}`; no cell ran", model.display());
    assert!(err.contains("model.safetensors") && err.contains("`head.weight`") && err.contains("non-finite") && err.contains(&named), "{err}");
    assert_eq!(err.matches("non-finite").count(), 1, "one error, not one per cell: {err}");
    assert!(!err.contains("FAILED"), "{err}");
    assert!(!out.join("cells").exists() || records(&out).is_empty(), "no cell ran");

    // the model repaired, the trained defense's weights cut short: the same, naming the defense
    copy_checkpoint("static", &model);
    let defended_weights = defended.join("model.safetensors");
    let bytes = std::fs::read(&defended_weights).unwrap();
    std::fs::write(&defended_weights, &bytes[..bytes.len() / 2]).unwrap();
    let o = run(&study, &out, &["--no-report"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("the study's defense `pgd-at`; no cell ran") && err.contains("not a readable safetensors file"), "{err}");
    assert!(!out.join("cells").exists() || records(&out).is_empty(), "no cell ran");
}

/// A cell's id hashes its parameters as the study writes them, so a default changed by a new
/// build leaves it unchanged; the record's digests of the resolved settings catch it. Here two
/// records are given what an older build with other defaults would have stored.
#[test]
fn settings_that_resolve_differently_now_make_a_finished_cell_stale() {
    use dynrobust_experiments::provenance::{settings_digest, ATTACK_SETTINGS, DEFENSE_SETTINGS};
    let dir = scratch("settings");
    let (_, _, study) = fgsm_study(&dir, "settings", "\"8/255\"");
    let out = dir.join("out");
    let o = run(&study, &out, &["--no-report"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let before = records(&out);
    for record in before.values() {
        // the digests describe what ran: the stored config and defense params, defaults filled in
        assert_eq!(record["inputs"][ATTACK_SETTINGS].as_str(), Some(settings_digest(&record["record"]["config"]).as_str()), "{record}");
        assert_eq!(record["inputs"][DEFENSE_SETTINGS].as_str(), Some(settings_digest(&record["record"]["defense_params"]).as_str()), "{record}");
    }
    let id_of = |defense: &str| before.iter().find(|(_, v)| v["cell"]["defense"]["name"] == defense).map(|(id, _)| id.clone()).unwrap();
    let (plain, defended) = (id_of("none"), id_of("pgd-at"));
    // as an older build would have stored them: FGSM in 5 steps, the defense's checkpoint spelled otherwise
    let rewrite = |id: &str, edit: &dyn Fn(&mut Value)| {
        let path = out.join("cells").join(format!("{id}.json"));
        let mut stored: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(&mut stored);
        std::fs::write(&path, serde_json::to_string_pretty(&stored).unwrap()).unwrap();
    };
    rewrite(&plain, &|v| {
        v["inputs"][ATTACK_SETTINGS] = Value::from("00000000000000ff");
        v["record"]["config"]["steps"] = Value::from(5);
    });
    rewrite(&defended, &|v| {
        v["inputs"][DEFENSE_SETTINGS] = Value::from("00000000000000ee");
        v["record"]["defense_params"]["checkpoint"] = Value::from("old");
    });

    let o = run(&study, &out, &["--no-report"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "cells run with other settings were skipped silently: {err}");
    assert!(err.contains("2 finished cell(s)") && err.contains("resolves a default differently") && err.contains(&plain) && err.contains(&defended), "{err}");
    assert!(err.contains("attack settings 00000000000000ff →") && err.contains("(attack.steps: 5 → 1)"), "{err}");
    assert!(err.contains("defense settings 00000000000000ee →") && err.contains("(defense.checkpoint: \"old\" → \""), "{err}");
    let o = run(&study, &out, &["--no-report", "--rerun-stale"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains(&format!("stale: cell {plain}")) && err.contains("changed since it ran: attack settings (attack.steps: 5 → 1);"), "{err}");
    assert_eq!(records(&out), before, "recomputed as they were");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_checkpoint_changed_under_a_finished_cell_stops_the_run_until_it_is_rerun() {
    let dir = scratch("stale");
    let (_, defended, study) = fgsm_study(&dir, "two", "\"8/255\"");
    let out = dir.join("out");
    let o = run(&study, &out, &["--no-report"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let before = records(&out);
    assert!(before.values().all(|v| v["inputs"]["model"].is_string()), "inputs stored: {before:?}");

    // the defense's checkpoint changes (its normalisation): the run stops and names the cell
    let sidecar = defended.join("model.json");
    let mut value: Value = serde_json::from_str(&std::fs::read_to_string(&sidecar).unwrap()).unwrap();
    value["architecture"]["mean"] = serde_json::json!([0.3]);
    std::fs::write(&sidecar, value.to_string()).unwrap();
    let o = run(&study, &out, &["--no-report"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a stale cell was skipped silently: {err}");
    let stale_id = before.iter().find(|(_, v)| v["cell"]["defense"]["name"] == "pgd-at").map(|(id, _)| id.clone()).unwrap();
    assert!(err.contains("1 finished cell(s)") && err.contains("defense checkpoint") && err.contains(&stale_id) && err.contains("--rerun-stale"), "{err}");
    assert_eq!(records(&out), before, "nothing stored is touched");
    let o = dynrobust(&["run", study.to_str().unwrap(), "--out", out.to_str().unwrap(), "--dry-run"]);
    let (listing, summary) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success() && listing.contains(&format!("{stale_id}  stale")) && listing.matches("  done ").count() == 1, "{listing}");
    assert!(summary.contains("2 cells: 2 finished") && summary.contains("(1 of them stale), 0 to run"), "{summary}");

    let o = dynrobust(&["report", out.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("warning: 1 cell(s) ran with a checkpoint, plugin settings or test images that have changed") && err.contains(&stale_id), "{err}");

    let o = run(&study, &out, &["--no-report", "--rerun-stale"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains(&format!("stale: cell {stale_id}")), "{err}");
    let after = records(&out);
    assert_eq!(after.len(), 2);
    assert_ne!(after[&stale_id]["inputs"]["defense"], before[&stale_id]["inputs"]["defense"], "rerun with the new checkpoint");
    let kept: Vec<_> = std::fs::read_dir(out.join("cells/stale")).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(kept.len(), 2, "the old result is kept: {kept:?}");
    assert!(kept.iter().all(|name| name.starts_with(&stale_id)), "{kept:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
