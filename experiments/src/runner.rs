//! The generic parallel runner: runs the unfinished cells of a grid on a pool of worker threads
//! and stores each result the moment it is done.
//!
//! The [`Executor`] (written by the caller; this crate knows no models or attacks) creates one
//! `Worker` per thread (loaded models etc.; it need not be `Send`) and runs one cell at a time
//! on it. Finished cells are skipped, so an interrupted run resumes where it stopped; a cell
//! that fails (error or panic) is reported in the [`RunSummary`] and not written, so a rerun
//! retries it while the other cells go on.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use dynrobust_core::{Error, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::provenance::{changed, Changed, Inputs, ATTACK_SETTINGS, DEFENSE_SETTINGS};
use crate::store::{Store, StoredCell};
use crate::study::Cell;

/// What an executor returns for one cell.
#[derive(Debug, Clone, PartialEq)]
pub struct CellOutput {
    /// The cell's record (a JSON object; see the report for the fields it reads).
    pub record: serde_json::Value,
    /// Per-sample rows as CSV text with a header line.
    pub per_sample_csv: String,
}

/// This crate's version and the source it was built from ([`dynrobust_core::build_source`]:
/// the commit, marked `+dirty.…` for uncommitted changes): what every executor stores with
/// its results.
pub fn dynrobust_versions() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("dynrobust".to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ("dynrobust_commit".to_string(), dynrobust_core::build_source().to_string()),
    ])
}

/// Runs cells. Shared by all worker threads, hence `Sync`.
pub trait Executor: Sync {
    /// Per-thread state (e.g. loaded models: tch tensors are not `Sync`).
    type Worker;
    /// Creates one worker; called once per thread (again after a panic in `run`).
    fn worker(&self) -> Result<Self::Worker>;
    /// Runs one cell.
    fn run(&self, worker: &mut Self::Worker, cell: &Cell) -> Result<CellOutput>;
    /// A rough relative amount of work in `cell` (e.g. images × attack iterations). The runner
    /// starts the largest cells first, so a grid does not end with one long cell on one core
    /// while the other workers idle. Only the order of the queue depends on it (every cell
    /// reseeds, so results do not); by default all cells weigh the same.
    fn work(&self, cell: &Cell) -> f64 {
        let _ = cell;
        1.0
    }
    /// Versions stored with every result; by default this crate's and the source it was built
    /// from ([`dynrobust_core::build_source`]).
    fn versions(&self) -> BTreeMap<String, String> {
        dynrobust_versions()
    }
    /// Checks, once and before any cell runs, what the cells to run read (e.g. each distinct
    /// checkpoint loads and its weights are sound), so a damaged input stops the run with one
    /// error instead of failing every cell that reads it. By default nothing.
    fn preflight(&self, cells: &[&Cell]) -> Result<()> {
        let _ = cells;
        Ok(())
    }
    /// A digest of every checkpoint `cell` reads, of its plugins' resolved settings and of its
    /// test images, by role ([`crate::provenance`]), stored with its result; a finished cell
    /// whose inputs have changed since is stale. By default none.
    fn inputs(&self, cell: &Cell) -> Result<Inputs> {
        let _ = cell;
        Ok(Inputs::new())
    }
    /// What of [`Executor::inputs`] can be digested now, for comparing a finished cell with:
    /// an input that cannot (its checkpoint is gone) is left out, so the rest is still
    /// compared. By default all of them, or none when one fails.
    fn comparable_inputs(&self, cell: &Cell) -> Inputs {
        self.inputs(cell).unwrap_or_default()
    }
    /// For a finished cell whose attack or defense settings resolve differently now, the
    /// settings that differ between its stored `record` and this build, as
    /// `attack.key: old → new` / `defense.key: …`. By default none named.
    fn settings_changes(&self, cell: &Cell, record: &serde_json::Value) -> Vec<String> {
        let _ = (cell, record);
        Vec::new()
    }
}

/// A cell that did not finish.
#[derive(Debug, Clone, PartialEq)]
pub struct CellFailure {
    pub id: String,
    /// [`crate::CellConfig::summary`] of the cell.
    pub cell: String,
    pub error: String,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    /// Distinct cells asked for.
    pub total: usize,
    /// Already finished before the run.
    pub skipped: usize,
    /// Finished and stored by this run.
    pub finished: usize,
    pub failures: Vec<CellFailure>,
    pub seconds: f64,
}

/// State shared by the worker threads of one run.
struct Shared<'a, E: Executor> {
    exec: &'a E,
    store: &'a Store,
    todo: Vec<&'a Cell>,
    next: AtomicUsize,
    finished: AtomicUsize,
    failures: Mutex<Vec<CellFailure>>,
    worker_errors: Mutex<Vec<String>>,
    versions: BTreeMap<String, String>,
    bar: ProgressBar,
    /// No bar on screen (stderr is not a terminal: a log file, a Slurm job): one line per
    /// finished cell instead, so a log shows progress.
    log_lines: bool,
}

/// A finished cell computed with a checkpoint, plugin settings or test images that have changed
/// since.
#[derive(Debug, Clone, PartialEq)]
pub struct StaleCell {
    pub id: String,
    /// [`crate::CellConfig::summary`] of the cell.
    pub cell: String,
    pub changed: Vec<Changed>,
    /// The settings that differ, `attack.key: old → new` ([`Executor::settings_changes`]; empty
    /// when no settings changed or the executor cannot say which).
    pub settings_changes: Vec<String>,
}

impl StaleCell {
    /// ` (attack.steps: 5 → 1, …)` after a list of what changed, or nothing when no settings
    /// are named.
    pub fn settings_note(&self) -> String {
        if self.settings_changes.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.settings_changes.join(", "))
        }
    }
}

/// The finished cells among `cells` whose stored inputs differ from
/// [`Executor::comparable_inputs`] now (see [`crate::provenance::changed`]). An input that
/// cannot be digested now (its checkpoint is gone) is not compared; the others still are.
pub fn stale_cells<E: Executor>(exec: &E, cells: &[Cell], store: &Store) -> Result<Vec<StaleCell>> {
    let done = store.finished_ids()?;
    let mut seen = BTreeSet::new();
    let mut stale = Vec::new();
    for cell in cells.iter().filter(|c| done.contains(&c.id) && seen.insert(c.id.as_str())) {
        stale.extend(stale_cell(exec, cell, &store.load(&cell.id)?));
    }
    Ok(stale)
}

/// `cell` as a [`StaleCell`] when the inputs its `stored` result ran with differ from
/// [`Executor::comparable_inputs`] now; `None` when those that can be compared agree (see
/// [`stale_cells`]).
pub fn stale_cell<E: Executor>(exec: &E, cell: &Cell, stored: &StoredCell) -> Option<StaleCell> {
    let changed = changed(&stored.inputs, &exec.comparable_inputs(cell));
    if changed.is_empty() {
        return None;
    }
    let settings_changed = changed.iter().any(|c| c.input == ATTACK_SETTINGS || c.input == DEFENSE_SETTINGS);
    let settings_changes = if settings_changed { exec.settings_changes(cell, &stored.record) } else { Vec::new() };
    Some(StaleCell { id: cell.id.clone(), cell: cell.config.summary(), changed, settings_changes })
}

/// The error for stale cells: which ones (the first five), what changed, what to do.
fn stale_error(store: &Store, stale: &[StaleCell]) -> Error {
    let listed: Vec<String> = stale
        .iter()
        .take(5)
        .map(|s| {
            let what: Vec<String> = s.changed.iter().map(|c| format!("{} {} → {}", c.what(), c.stored, c.now)).collect();
            format!("  {} ({}): {}{}", s.id, s.cell, what.join(", "), s.settings_note())
        })
        .collect();
    let more = if stale.len() > 5 { format!("\n  … and {} more", stale.len() - 5) } else { String::new() };
    let settings = stale.iter().any(|s| s.changed.iter().any(|c| c.input == ATTACK_SETTINGS || c.input == DEFENSE_SETTINGS));
    let why_settings = if settings { "(settings change when this build resolves a default differently) " } else { "" };
    Error::data(
        store.cells_dir(),
        format!(
            "{} finished cell(s) were computed with a checkpoint, plugin settings or test images that have changed since:\n{}{more}\n\
             {why_settings}restore what changed, or recompute the cells (`dynrobust run … --rerun-stale` moves their results to {}, then runs them)",
            stale.len(),
            listed.join("\n"),
            store.stale_dir().display()
        ),
    )
}

/// Moves damaged records aside ([`Store::set_aside_corrupt`]), saying so on stderr: their
/// cells count as unfinished and run again.
pub fn set_aside_damaged(store: &Store) -> Result<()> {
    for (from, to, why) in store.set_aside_corrupt()? {
        eprintln!("warning: {} is damaged ({why}); moved to {}, the cell runs again", from.display(), to.display());
    }
    Ok(())
}

/// Runs every unfinished cell of `cells` with `workers` threads, storing each result at once
/// with its [`Executor::inputs`]. Refuses to go on, naming them, when finished cells are stale
/// (their checkpoints, settings or test images changed since; [`Store::retire`] moves them aside to be run again).
/// Damaged records are moved aside first ([`set_aside_damaged`]), and [`Executor::preflight`]
/// checks the inputs of the cells to run before any runs. With `progress`, a progress
/// bar on stderr when it is a terminal, else a line per cell.
pub fn run_cells<E: Executor>(exec: &E, cells: &[Cell], store: &Store, workers: usize, progress: bool) -> Result<RunSummary> {
    let start = Instant::now();
    set_aside_damaged(store)?;
    let stale = stale_cells(exec, cells, store)?;
    if !stale.is_empty() {
        return Err(stale_error(store, &stale));
    }
    let done = store.finished_ids()?;
    let mut seen = BTreeSet::new();
    let distinct: Vec<&Cell> = cells.iter().filter(|c| seen.insert(c.id.as_str())).collect();
    let todo = largest_first(exec, distinct.iter().copied().filter(|c| !done.contains(&c.id)).collect());
    exec.preflight(&todo)?;
    let skipped = distinct.len() - todo.len();
    if skipped > 0 {
        eprintln!("skipping {skipped} finished cell(s) of {} in {}", distinct.len(), store.dir().display());
    }
    let shared = Shared {
        exec,
        store,
        next: AtomicUsize::new(0),
        finished: AtomicUsize::new(0),
        failures: Mutex::new(Vec::new()),
        worker_errors: Mutex::new(Vec::new()),
        versions: exec.versions(),
        bar: progress_bar(todo.len(), progress),
        log_lines: progress && !std::io::IsTerminal::is_terminal(&std::io::stderr()),
        todo,
    };
    if !shared.todo.is_empty() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(workers.max(1).min(shared.todo.len()))
            .thread_name(|i| format!("dynrobust-cell-{i}"))
            .build()
            .map_err(|e| Error::config("workers", format!("cannot start {workers} worker threads: {e}")))?;
        pool.broadcast(|_| worker_loop(&shared));
        shared.fail_unattempted();
    }
    shared.bar.finish_and_clear();
    let mut failures = shared.failures.into_inner().unwrap_or_else(|p| p.into_inner());
    failures.sort_by(|a, b| a.id.cmp(&b.id));
    let finished = shared.finished.into_inner();
    Ok(RunSummary { total: distinct.len(), skipped, finished, failures, seconds: start.elapsed().as_secs_f64() })
}

/// `cells` ordered by [`Executor::work`], largest first (stable: equal cells keep grid order).
fn largest_first<'a, E: Executor>(exec: &E, cells: Vec<&'a Cell>) -> Vec<&'a Cell> {
    let mut weighed: Vec<(f64, &Cell)> = cells.into_iter().map(|c| (exec.work(c), c)).collect();
    weighed.sort_by(|a, b| b.0.total_cmp(&a.0));
    weighed.into_iter().map(|(_, c)| c).collect()
}

fn progress_bar(len: usize, visible: bool) -> ProgressBar {
    let target = if visible { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
    let bar = ProgressBar::with_draw_target(Some(len as u64), target);
    let style = ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} cells (eta {eta}) {wide_msg}")
        .expect("the progress template is valid")
        .progress_chars("=> ");
    bar.set_style(style);
    bar
}

/// One thread: create a worker, then take cells until none are left.
fn worker_loop<E: Executor>(shared: &Shared<E>) {
    let Some(mut worker) = shared.new_worker() else { return };
    loop {
        let i = shared.next.fetch_add(1, Ordering::SeqCst);
        let Some(cell) = shared.todo.get(i).copied() else { break };
        shared.bar.set_message(cell.config.summary());
        let started = Instant::now();
        // the inputs are digested before the cell reads them
        let outcome = catch_unwind(AssertUnwindSafe(|| shared.exec.inputs(cell).and_then(|inputs| Ok((shared.exec.run(&mut worker, cell)?, inputs)))));
        let panicked = outcome.is_err();
        match outcome {
            Ok(Ok((out, inputs))) => match shared.store.write_cell(cell, &out, &shared.versions, &inputs) {
                Ok(()) => {
                    let n = shared.finished.fetch_add(1, Ordering::SeqCst) + 1;
                    if shared.log_lines {
                        eprintln!("[{n}/{}] cell {} ({}) finished in {:.0} s", shared.todo.len(), cell.id, cell.config.summary(), started.elapsed().as_secs_f64());
                    }
                }
                Err(e) => shared.fail(cell, format!("storing the result failed: {e}")),
            },
            Ok(Err(e)) => shared.fail(cell, e.to_string()),
            Err(panic) => shared.fail(cell, format!("panicked: {}", dynrobust_core::process::panic_message(panic.as_ref()))),
        }
        shared.bar.inc(1);
        if panicked {
            // The worker's state may be inconsistent after a panic: start afresh.
            match shared.new_worker() {
                Some(w) => worker = w,
                None => return,
            }
        }
    }
}

impl<E: Executor> Shared<'_, E> {
    /// A message above the bar, or on stderr when there is no bar (a hidden bar's `println`
    /// prints nothing, and failures must reach the log).
    fn say(&self, line: String) {
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    fn new_worker(&self) -> Option<E::Worker> {
        match catch_unwind(AssertUnwindSafe(|| self.exec.worker())) {
            Ok(Ok(w)) => Some(w),
            Ok(Err(e)) => self.worker_failed(e.to_string()),
            Err(panic) => self.worker_failed(format!("panicked: {}", dynrobust_core::process::panic_message(panic.as_ref()))),
        }
    }

    fn worker_failed(&self, error: String) -> Option<E::Worker> {
        let error = dynrobust_core::error::libtorch_message(&error);
        self.say(format!("a worker could not start: {error}"));
        self.worker_errors.lock().unwrap_or_else(|p| p.into_inner()).push(error);
        None
    }

    fn fail(&self, cell: &Cell, error: String) {
        let error = dynrobust_core::error::libtorch_message(&error);
        self.say(format!("cell {} failed ({}): {error}", cell.id, cell.config.summary()));
        let failure = CellFailure { id: cell.id.clone(), cell: cell.config.summary(), error };
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).push(failure);
    }

    /// Cells no thread took because every worker failed to start.
    fn fail_unattempted(&self) {
        let taken = self.next.load(Ordering::SeqCst).min(self.todo.len());
        let errors = self.worker_errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let why = format!("not run: no worker could start ({})", errors.join("; "));
        for cell in &self.todo[taken..] {
            self.fail(cell, why.clone());
        }
    }
}

