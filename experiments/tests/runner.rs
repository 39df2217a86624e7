//! The runner and the store: skip finished cells, collect failures, shards + merge = one run,
//! crash leftovers ignored, a different study refused.

mod common;

use std::fs;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use common::{small_study, Fake, SMALL};
use dynrobust_experiments::{merge, run_cells, shard, stale_cells, Store, StoredCell};

fn without_times(mut cells: Vec<StoredCell>) -> Vec<StoredCell> {
    for c in &mut cells {
        c.finished_at.clear();
    }
    cells
}

#[test]
fn a_run_stores_every_cell_and_a_rerun_skips_them() {
    let dir = tempfile::tempdir().unwrap();
    let study = small_study();
    let store = Store::open(dir.path(), SMALL, false).unwrap();
    let fake = Fake::default();
    let s = run_cells(&fake, &study.cells, &store, 2, false).unwrap();
    assert_eq!((s.total, s.skipped, s.finished, s.failures.len()), (study.cells.len(), 0, study.cells.len(), 0));
    assert!(fake.workers.load(Ordering::SeqCst) <= 2, "one worker per thread");
    assert_eq!(store.finished_ids().unwrap(), study.ids());

    let again = Fake::default();
    let s = run_cells(&again, &study.cells, &store, 2, false).unwrap();
    assert_eq!((s.skipped, s.finished), (study.cells.len(), 0));
    assert_eq!(again.runs.load(Ordering::SeqCst), 0, "finished cells are not run again");

    let all = store.load_all().unwrap();
    assert_eq!(all.len(), study.cells.len());
    assert!(all.windows(2).all(|w| w[0].id < w[1].id), "sorted by id");
    let csv = store.per_sample_csv(&all[0].id).unwrap().unwrap();
    assert!(csv.starts_with("sample,"));
    assert_eq!(all[0].versions["dynrobust"], env!("CARGO_PKG_VERSION"));
    // a library's caller that sets no build source records the bare commit
    assert_eq!(all[0].versions["dynrobust_commit"], dynrobust_core::SOURCE_COMMIT);
}

#[test]
fn failing_cells_are_collected_and_retried_later() {
    let dir = tempfile::tempdir().unwrap();
    let study = small_study();
    let store = Store::open(dir.path(), SMALL, false).unwrap();
    let bad = Fake { fail_model: Some("sdn".into()), panic_model: Some("gated".into()), ..Default::default() };
    let s = run_cells(&bad, &study.cells, &store, 2, false).unwrap();
    let failing = study.cells.iter().filter(|c| c.config.model.name != "static").count();
    assert_eq!(s.failures.len(), failing);
    assert_eq!(s.finished, study.cells.len() - failing);
    assert!(s.failures.iter().any(|f| f.error.contains("fake failure") && f.cell.contains("model=sdn")));
    assert!(s.failures.iter().any(|f| f.error.contains("panicked: fake panic")));

    let good = Fake::default();
    let s = run_cells(&good, &study.cells, &store, 1, false).unwrap();
    assert_eq!((s.skipped, s.finished, s.failures.len()), (study.cells.len() - failing, failing, 0));
    assert_eq!(good.runs.load(Ordering::SeqCst), failing, "only the failed cells run again");
}

#[test]
fn cells_of_a_retrained_checkpoint_are_refused_then_rerun_once_retired() {
    let dir = tempfile::tempdir().unwrap();
    let study = small_study();
    let store = Store::open(dir.path(), SMALL, false).unwrap();
    run_cells(&Fake::default(), &study.cells, &store, 2, false).unwrap();
    assert!(store.load_all().unwrap().iter().all(|c| c.inputs["model"] == format!("{}-v1", c.cell.model.name)), "inputs stored");

    // sdn retrained: the run refuses, names the sdn cells and what changed, runs nothing
    let retrained = Fake { retrained: Some("sdn".into()), ..Default::default() };
    let err = run_cells(&retrained, &study.cells, &store, 2, false).unwrap_err().to_string();
    let sdn: Vec<&str> = study.cells.iter().filter(|c| c.config.model.name == "sdn").map(|c| c.id.as_str()).collect();
    assert!(err.contains(&format!("{} finished cell(s)", sdn.len())) && err.contains("model checkpoint sdn-v1 → sdn-v2"), "{err}");
    assert!(err.contains(sdn[0]) && err.contains("--rerun-stale") && err.contains("stale"), "{err}");
    assert!(!err.contains("resolves a default differently"), "only a checkpoint changed, no settings: {err}");
    assert!(!study.cells.iter().filter(|c| c.config.model.name != "sdn").any(|c| err.contains(&c.id)), "only sdn cells are stale: {err}");
    assert_eq!(retrained.runs.load(Ordering::SeqCst), 0);
    assert_eq!(store.finished_ids().unwrap(), study.ids(), "nothing is lost");

    // retired: moved aside (kept), then exactly these run again with the new inputs
    let stale = stale_cells(&retrained, &study.cells, &store).unwrap();
    assert_eq!(stale.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), sdn);
    for cell in &stale {
        let moved = store.retire(&cell.id).unwrap();
        assert!(moved.starts_with(store.stale_dir()) && moved.is_file() && moved.with_extension("csv").is_file());
    }
    let s = run_cells(&retrained, &study.cells, &store, 2, false).unwrap();
    assert_eq!((s.finished, s.skipped), (sdn.len(), study.cells.len() - sdn.len()));
    assert!(store.load_all().unwrap().iter().filter(|c| c.cell.model.name == "sdn").all(|c| c.inputs["model"] == "sdn-v2"));
    assert_eq!(std::fs::read_dir(store.stale_dir()).unwrap().count(), 2 * sdn.len(), "old results kept");

    // a cell stored before inputs were recorded cannot be compared, so it is not stale
    let old_format = store.cells_dir().join(format!("{}.json", sdn[0]));
    let mut value: serde_json::Value = serde_json::from_str(&fs::read_to_string(&old_format).unwrap()).unwrap();
    value.as_object_mut().unwrap().remove("inputs");
    fs::write(&old_format, value.to_string()).unwrap();
    assert!(stale_cells(&Fake::default(), &study.cells, &store).unwrap().iter().all(|s| s.id != sdn[0]));
}

#[test]
fn two_shards_then_merge_equal_one_run() {
    let study = small_study();
    let sharded = tempfile::tempdir().unwrap();
    for i in 0..2 {
        let store = Store::open(sharded.path(), SMALL, false).unwrap();
        let s = run_cells(&Fake::default(), &shard(&study.cells, i, 2), &store, 2, false).unwrap();
        assert!(s.failures.is_empty());
    }
    let single = tempfile::tempdir().unwrap();
    let store = Store::open(single.path(), SMALL, false).unwrap();
    run_cells(&Fake::default(), &study.cells, &store, 1, false).unwrap();

    let a = without_times(merge(sharded.path(), &study.cells).unwrap());
    let b = without_times(merge(single.path(), &study.cells).unwrap());
    assert_eq!(a.len(), study.cells.len());
    assert_eq!(a, b);
}

#[test]
fn merge_names_the_missing_cells() {
    let study = small_study();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), SMALL, false).unwrap();
    run_cells(&Fake::default(), &shard(&study.cells, 0, 3), &store, 2, false).unwrap();
    let err = merge(dir.path(), &study.cells).unwrap_err().to_string();
    let missing: Vec<_> = shard(&study.cells, 1, 3).into_iter().chain(shard(&study.cells, 2, 3)).collect();
    assert!(err.contains(&format!("{} of {} cells are missing", missing.len(), study.cells.len())), "{err}");
    for c in &missing {
        assert!(err.contains(&c.id), "{err}");
    }
    assert!(err.contains("model=") && err.contains("attack=") && err.contains("defense="), "{err}");
    assert!(merge(tempfile::tempdir().unwrap().path(), &study.cells).is_err(), "not a result directory");
    // every cell present but one lost its per-sample CSV: still incomplete, and named
    run_cells(&Fake::default(), &study.cells, &store, 2, false).unwrap();
    assert!(merge(dir.path(), &study.cells).is_ok());
    fs::remove_file(store.cells_dir().join(format!("{}.csv", study.cells[0].id))).unwrap();
    let err = merge(dir.path(), &study.cells).unwrap_err().to_string();
    assert!(err.contains("1 of") && err.contains(&study.cells[0].id) && err.contains("per-sample CSV is not"), "{err}");
    // as the message says, a rerun recomputes that cell (its record is moved aside, kept)
    let summary = run_cells(&Fake::default(), &study.cells, &store, 2, false).unwrap();
    assert_eq!(summary.finished, 1);
    assert!(merge(dir.path(), &study.cells).is_ok());
    assert_eq!(fs::read_dir(store.corrupt_dir()).unwrap().count(), 1);
}

#[test]
fn leftover_temporary_files_are_ignored_and_stale_ones_removed() {
    let study = small_study();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), SMALL, false).unwrap();
    let cells = store.cells_dir();
    let id = &study.cells[0].id;
    // A crash between writing the temporary JSON and renaming it: the cell is not finished.
    let stale = cells.join(format!("{id}.json.tmp.4242"));
    fs::write(&stale, "{ half a rec").unwrap();
    let old = SystemTime::now() - Duration::from_secs(3600);
    fs::File::options().write(true).open(&stale).unwrap().set_modified(old).unwrap();
    let fresh = cells.join(format!("{id}.csv.tmp.4343"));
    fs::write(&fresh, "sample\n").unwrap();
    fs::write(cells.join("notes.txt"), "not a cell").unwrap();

    assert!(store.finished_ids().unwrap().is_empty());
    assert!(!stale.exists(), "a stale temporary file is deleted");
    assert!(fresh.exists(), "a fresh one may belong to a concurrent shard and is kept");

    let s = run_cells(&Fake::default(), &study.cells, &store, 2, false).unwrap();
    assert_eq!(s.finished, study.cells.len());
    assert_eq!(store.load_all().unwrap().len(), study.cells.len());
}

#[test]
fn a_corrupt_record_is_reported_by_file() {
    let study = small_study();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), SMALL, false).unwrap();
    run_cells(&Fake::default(), &study.cells[..2], &store, 1, false).unwrap();
    let path = store.cells_dir().join(format!("{}.json", study.cells[1].id));
    fs::write(&path, "{ not json").unwrap();
    let err = store.load_all().unwrap_err().to_string();
    assert!(err.contains(&path.display().to_string()) && err.contains("corrupt"), "{err}");
    assert!(err.contains("dynrobust run") && err.contains("cells/corrupt"), "says how to recover: {err}");
    // a rerun moves the record aside (kept, not deleted) and computes the cell again
    let summary = run_cells(&Fake::default(), &study.cells[..2], &store, 1, false).unwrap();
    assert_eq!((summary.skipped, summary.finished), (1, 1));
    assert_eq!(without_times(store.load_all().unwrap()).len(), 2);
    let kept: Vec<String> = fs::read_dir(store.corrupt_dir()).unwrap().map(|e| fs::read_to_string(e.unwrap().path()).unwrap()).collect();
    assert!(kept.contains(&"{ not json".to_string()), "{kept:?}");
}

/// Records that still parse but were edited or damaged outside dynrobust: `load` (report,
/// merge) refuses each naming the file and the field, and a rerun sets them aside (kept) and
/// computes them again.
#[test]
fn an_edited_record_or_damaged_csv_is_refused_then_recomputed() {
    let study = small_study();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), SMALL, false).unwrap();
    let cells = &study.cells[..4];
    run_cells(&Fake::default(), cells, &store, 1, false).unwrap();
    let json = |i: usize| store.cells_dir().join(format!("{}.json", cells[i].id));
    let edit = |i: usize, f: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value = serde_json::from_str(&fs::read_to_string(json(i)).unwrap()).unwrap();
        f(&mut v);
        fs::write(json(i), v.to_string()).unwrap();
    };
    edit(0, &|v| v["record"]["adv_acc"] = serde_json::json!(7.5));
    edit(1, &|v| v["cell"]["n"] = serde_json::json!(17));
    edit(2, &|v| v["record"]["clean_cost"] = serde_json::json!("high"));
    fs::write(store.cells_dir().join(format!("{}.csv", cells[3].id)), "sample,clean_correct,adv_correct\n0,true\n").unwrap();
    for (i, says) in [(0, "record.adv_acc = 7.5"), (1, "hashes to"), (2, "record.clean_cost = \"high\""), (3, "line 2 has 2 fields")] {
        let err = store.load(&cells[i].id).unwrap_err().to_string();
        assert!(err.contains(&json(i).display().to_string()) && err.contains(says) && err.contains("cells/corrupt"), "{err}");
    }
    assert!(store.load_all().is_err());
    let summary = run_cells(&Fake::default(), cells, &store, 1, false).unwrap();
    assert_eq!((summary.skipped, summary.finished), (0, 4));
    assert_eq!(store.load_all().unwrap().len(), 4);
    assert_eq!(fs::read_dir(store.corrupt_dir()).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "json")).count(), 4);
}

#[test]
fn a_different_study_is_refused_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    Store::open(dir.path(), SMALL, false).unwrap();
    Store::open(dir.path(), SMALL, false).expect("the same study reopens");
    let other = SMALL.replace("n = 8", "n = 9");
    let err = Store::open(dir.path(), &other, false).unwrap_err().to_string();
    assert!(err.contains("study.toml") && err.contains("different study") && err.contains("they differ in: `n` (8 → 9)"), "{err}");
    assert_eq!(Store::open_existing(dir.path()).unwrap().check_study(&other).unwrap_err().to_string(), err, "what --dry-run asks");
    // a nested change is named down to its key
    let nested = SMALL.replace("params = { steps = 2 }", "params = { steps = 3 }");
    assert_ne!(nested, SMALL);
    let err = Store::open(dir.path(), &nested, false).unwrap_err().to_string();
    assert!(err.contains("they differ in: `attacks[0].params.steps` (2 → 3)"), "{err}");
    // a comment, the layout or the description change no cell: the same study, its copy updated
    let annotated = format!("# tried again on Tuesday\ndescription = \"notes\"\n{}", SMALL.replace(" = ", "   =   "));
    let store = Store::open(dir.path(), &annotated, false).expect("the same study, annotated");
    assert_eq!(store.study_text().unwrap(), annotated);
    let store = Store::open(dir.path(), &other, true).unwrap();
    assert_eq!(store.study_text().unwrap(), other);
}

/// Runs cells on one worker and records the order; a cell's work is its attack's `steps`.
struct OrderRecorder {
    order: std::sync::Mutex<Vec<String>>,
}

impl dynrobust_experiments::Executor for OrderRecorder {
    type Worker = ();
    fn worker(&self) -> dynrobust_core::Result<()> {
        Ok(())
    }
    fn work(&self, cell: &dynrobust_experiments::Cell) -> f64 {
        cell.config.attack.params.get("steps").and_then(serde_json::Value::as_f64).unwrap_or(1.0)
    }
    fn run(&self, _: &mut (), cell: &dynrobust_experiments::Cell) -> dynrobust_core::Result<dynrobust_experiments::CellOutput> {
        self.order.lock().unwrap().push(cell.id.clone());
        Fake::default().run(&mut std::rc::Rc::new(String::new()), cell)
    }
}

#[test]
fn the_largest_cells_run_first_and_equal_ones_keep_grid_order() {
    let text = SMALL.replace("name = \"ilfo\"", "name = \"ilfo\"\nparams = { steps = 5 }");
    let study = dynrobust_experiments::Study::parse(&text, "small.toml", &common::registry()).unwrap();
    let cells = study.cells.clone();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &text, false).unwrap();
    let exec = OrderRecorder { order: Default::default() };
    run_cells(&exec, &cells, &store, 1, false).unwrap();
    let order = exec.order.into_inner().unwrap();
    let steps_of = |id: &str| cells.iter().find(|c| c.id == id).map(|c| dynrobust_experiments::Executor::work(&OrderRecorder { order: Default::default() }, c)).unwrap();
    let weights: Vec<f64> = order.iter().map(|id| steps_of(id)).collect();
    assert_eq!(order.len(), cells.len());
    assert!(weights.windows(2).all(|w| w[0] >= w[1]), "not largest first: {weights:?}");
    assert_eq!(weights.first(), Some(&5.0));
    // among equal weights, the grid's order
    let grid_positions = |w: f64| -> Vec<usize> { order.iter().filter(|id| steps_of(id) == w).map(|id| cells.iter().position(|c| &c.id == id).unwrap()).collect() };
    for w in [5.0, 2.0] {
        let positions = grid_positions(w);
        assert!(positions.windows(2).all(|p| p[0] < p[1]), "weight {w}: grid order lost {positions:?}");
    }
}
