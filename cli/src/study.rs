//! `dynrobust run`, `report`, `merge`, `slurm`: the study runner's front end.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use dynrobust_core::atomic_file::{sweep_stale_temporaries, STALE_TEMPORARY_AGE};
use dynrobust_experiments::execute::{prepare_variants, registry, RealExecutor};
use dynrobust_experiments::{merge, parse_shard, run_cells, shard, slurm_script, stale_cell, stale_cells, write_partial_report, write_report, Cell, Store, Study};

/// Options of `dynrobust run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Study file (TOML), e.g. experiments/quick.toml.
    study: PathBuf,
    /// Output directory (default: runs/<study name>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run only shard i of n (0-based), e.g. 3/16.
    #[arg(long)]
    shard: Option<String>,
    /// Parallel workers (default: 2 when the machine — or the Slurm task, SLURM_CPUS_PER_TASK —
    /// has ≥ 2 cores).
    #[arg(long, allow_negative_numbers = true)]
    workers: Option<usize>,
    /// Do not write the report at the end (shards: `dynrobust merge` writes it).
    #[arg(long)]
    no_report: bool,
    /// Run into a directory that holds results of a different study file.
    #[arg(long)]
    force: bool,
    /// Print the cells, each with what a run would do with it (todo / done / stale), and exit.
    #[arg(long)]
    dry_run: bool,
    /// Recompute finished cells whose checkpoints, attack/defense settings or test images changed since they ran (their results move
    /// to OUT/cells/stale/); without it such a run stops and names them.
    #[arg(long)]
    rerun_stale: bool,
    #[command(flatten)]
    device: crate::common::DeviceArgs,
    /// Do not share crafted examples between cells that craft on the bare model (oblivious and
    /// undefended cells; stored in OUT/craft-cache).
    #[arg(long)]
    no_craft_cache: bool,
}

fn load_study(path: &Path) -> Result<Study> {
    Ok(Study::load(path, &registry())?)
}

fn out_dir(study: &Study, out: &Option<PathBuf>) -> PathBuf {
    out.clone().unwrap_or_else(|| PathBuf::from("runs").join(&study.name))
}

/// Runs `dynrobust run`.
pub fn run(args: RunArgs) -> Result<()> {
    let device = args.device.device()?;
    let study = load_study(&args.study)?;
    let out = out_dir(&study, &args.out);
    let shard_spec = args.shard.as_deref().map(parse_shard).transpose()?;
    let cells = match shard_spec {
        Some((i, n)) => shard(&study.cells, i, n),
        None => study.cells.clone(),
    };
    if args.dry_run {
        return dry_run(&cells, &out, (!args.force).then_some(study.source.as_str()));
    }
    if args.workers == Some(0) {
        anyhow::bail!("--workers 0: expected ≥ 1");
    }
    // the directory is claimed before anything in it changes (with --force, the study copy)
    std::fs::create_dir_all(&out).with_context(|| format!("--out {}: cannot create the directory", out.display()))?;
    let _run_lock = Store::at(&out).lock_run(shard_spec)?;
    let store = Store::open(&out, &study.source, args.force)?;
    let variant_dirs = std::fs::read_dir(out.join("models")).into_iter().flatten().flatten().map(|e| e.path()).filter(|p| p.is_dir());
    sweep_interrupted_writes(&[store.cells_dir(), out.join("craft-cache")].into_iter().chain(variant_dirs).collect::<Vec<_>>())?;
    // inside a Slurm task, the CPUs Slurm granted it; else the machine's
    let slurm_cpus = std::env::var("SLURM_CPUS_PER_TASK").ok().and_then(|v| v.parse::<usize>().ok()).filter(|&c| c > 0);
    let cores = slurm_cpus.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let workers = args.workers.unwrap_or(cores.min(2));
    if workers > cores {
        eprintln!("warning: --workers {workers} on {cores} core(s): the workers share the cores (one libtorch thread each), so expect no speed-up over {cores}");
    }
    let threads = (cores / workers).max(1) as i32;
    let variants = out.join("models");
    prepare_variants(&study, &variants)?;
    eprintln!("study {}: {} cells into {} ({} workers × {} libtorch threads)", study.name, cells.len(), out.display(), workers, threads);
    let exec = RealExecutor::new(variants, threads, device, (!args.no_craft_cache).then(|| out.join("craft-cache")));
    if args.rerun_stale {
        dynrobust_experiments::runner::set_aside_damaged(&store)?;
        retire_stale(&exec, &cells, &store)?;
    }
    let summary = run_cells(&exec, &cells, &store, workers, true)?;
    eprintln!("finished {} cells, skipped {} already done, {} failed, in {:.0} s", summary.finished, summary.skipped, summary.failures.len(), summary.seconds);
    for f in &summary.failures {
        eprintln!("FAILED {} ({}): {}", f.id, f.cell, f.error);
    }
    if !args.no_report && args.shard.is_none() {
        report_dir(&out, &study.name)?;
    }
    if !summary.failures.is_empty() {
        bail!("{} cells failed (rerun the same command to retry them; finished cells are kept)", summary.failures.len());
    }
    Ok(())
}

/// Says on stderr which stored cells ran with checkpoints, settings or test images that have changed since (the report
/// still shows them: they are what was measured, with the weights of that time).
fn warn_stale(dir: &Path, cells: &[dynrobust_experiments::StoredCell]) {
    let exec = inspector(dir);
    let stale: Vec<_> = cells.iter().filter_map(|c| stale_cell(&exec, &Cell { id: c.id.clone(), config: c.cell.clone() }, c)).collect();
    if !stale.is_empty() {
        let ids: Vec<&str> = stale.iter().take(5).map(|s| s.id.as_str()).collect();
        eprintln!(
            "report: warning: {} cell(s) ran with a checkpoint, plugin settings or test images that have changed since ({}{}); `dynrobust run STUDY --out {} --rerun-stale` recomputes them",
            stale.len(),
            ids.join(", "),
            if stale.len() > 5 { ", …" } else { "" },
            dir.display()
        );
    }
}

/// An executor that only digests the inputs (checkpoints, settings, test images) of the cells
/// of the run directory `out` (for `--dry-run` and the report's warning; it runs nothing).
fn inspector(out: &Path) -> RealExecutor {
    RealExecutor::new(out.join("models"), 1, tch::Device::Cpu, None)
}

/// `--dry-run`: every cell with what a run into `out` would do with it — `todo`, `done`
/// (skipped), or `stale` (finished with a checkpoint, plugin settings or test images that have
/// changed since). With `study_text` (no `--force`), first refuses as the run would when `out`
/// holds a different study.
fn dry_run(cells: &[Cell], out: &Path, study_text: Option<&str>) -> Result<()> {
    if let Some(text) = study_text {
        Store::at(out).check_study(text).context("the run would stop")?;
    }
    let (done, stale) = match Store::open_existing(out) {
        Ok(store) => {
            let stale: std::collections::BTreeSet<String> = stale_cells(&inspector(out), cells, &store)?.into_iter().map(|s| s.id).collect();
            (store.finished_ids()?, stale)
        }
        Err(_) => Default::default(),
    };
    let status = |id: &String| if stale.contains(id) { "stale" } else if done.contains(id) { "done " } else { "todo " };
    for c in cells {
        println!("{}  {}  {}", c.id, status(&c.id), c.config.summary());
    }
    let finished = cells.iter().filter(|c| done.contains(&c.id)).count();
    eprintln!("{} cells: {} finished in {} ({} of them stale), {} to run", cells.len(), finished, out.display(), stale.len(), cells.len() - finished);
    Ok(())
}

/// Moves the finished cells whose checkpoints, settings or test images changed since they ran to `cells/stale/`, so
/// that the run recomputes them.
fn retire_stale(exec: &RealExecutor, cells: &[Cell], store: &Store) -> Result<()> {
    let stale = stale_cells(exec, cells, store)?;
    for cell in &stale {
        let moved = store.retire(&cell.id)?;
        let what: Vec<String> = cell.changed.iter().map(|c| c.what()).collect();
        eprintln!("stale: cell {} ({}): changed since it ran: {}{}; its result moved to {}", cell.id, cell.cell, what.join(", "), cell.settings_note(), moved.display());
    }
    Ok(())
}

/// Removes the temporary files that writers killed mid-write (a Slurm time limit, Ctrl-C,
/// SIGKILL) left in `dirs` (the cells, the craft cache, each trained variant's checkpoint
/// folder): at once when the writer ran on this machine and is gone, else once they are
/// [`STALE_TEMPORARY_AGE`] old. Finished files are never touched.
fn sweep_interrupted_writes(dirs: &[PathBuf]) -> Result<()> {
    let removed = dirs.iter().map(|d| sweep_stale_temporaries(d, STALE_TEMPORARY_AGE)).sum::<dynrobust_core::Result<usize>>()?;
    if removed > 0 {
        eprintln!("removed {removed} temporary files left by interrupted writes");
    }
    Ok(())
}

/// Writes the report of the run directory `dir` over the cells of its stored study (a
/// directory a changed study was forced over may still hold the old study's cells: they are
/// left out and counted); a study that no longer parses reports every stored cell.
fn report_dir(dir: &Path, title: &str) -> Result<()> {
    let store = Store::open_existing(dir)?;
    let mut cells = store.load_all()?;
    let mut planned = None;
    match store.study_text().and_then(|text| Study::parse(&text, store.study_path(), &registry())) {
        Ok(study) => {
            let wanted = study.ids();
            planned = Some(wanted.len());
            let stored = cells.len();
            cells.retain(|c| wanted.contains(&c.id));
            if cells.len() < stored {
                eprintln!("report: left out {} stored cells that are not in {} (from an earlier study forced over this directory)", stored - cells.len(), store.study_path().display());
            }
        }
        Err(e) => eprintln!("report: WARNING: the stored study does not load here ({e}); reporting every stored cell, including any of an earlier study forced over this directory"),
    }
    warn_stale(dir, &cells);
    let files = write_partial_report(dir, title, &cells, planned)?;
    match planned {
        Some(planned) if planned > cells.len() => eprintln!("report: {} ({} plots) — {} of the study's {planned} cells: the run is unfinished", files.markdown.display(), files.plots.len(), cells.len()),
        _ => eprintln!("report: {} ({} plots)", files.markdown.display(), files.plots.len()),
    }
    Ok(())
}

/// Options of `dynrobust report`.
#[derive(Args, Debug)]
pub struct ReportArgs {
    /// A run directory.
    dir: PathBuf,
}

/// Runs `dynrobust report`.
pub fn report(args: ReportArgs) -> Result<()> {
    let store = Store::open_existing(&args.dir)?;
    if store.finished_ids()?.is_empty() {
        anyhow::bail!("{}: no finished cells, nothing to report (an existing report.md is left as it is)", store.cells_dir().display());
    }
    let title = study_name(&store).unwrap_or_else(|| args.dir.display().to_string());
    report_dir(&args.dir, &title)
}

fn study_name(store: &Store) -> Option<String> {
    let text = store.study_text().ok()?;
    let value: toml::Value = toml::from_str(&text).ok()?;
    value.get("name")?.as_str().map(str::to_string)
}

/// Options of `dynrobust merge`.
#[derive(Args, Debug)]
pub struct MergeArgs {
    /// The shared output directory of the shards.
    dir: PathBuf,
}

/// Runs `dynrobust merge`: checks every cell of the stored study is present, then reports.
pub fn merge_cmd(args: MergeArgs) -> Result<()> {
    let store = Store::open_existing(&args.dir)?;
    let study = Study::parse(&store.study_text()?, store.study_path(), &registry())?;
    let cells = merge(&args.dir, &study.cells).with_context(|| format!("merging {}", args.dir.display()))?;
    eprintln!("all {} cells present", cells.len());
    warn_stale(&args.dir, &cells);
    let files = write_report(&args.dir, &study.name, &cells)?;
    eprintln!("report: {} ({} plots)", files.markdown.display(), files.plots.len());
    Ok(())
}

/// Options of `dynrobust slurm`.
#[derive(Args, Debug)]
pub struct SlurmArgs {
    /// Study file.
    study: PathBuf,
    /// Array tasks (shards).
    #[arg(long, allow_negative_numbers = true)]
    tasks: usize,
    /// Slurm partition to submit to (`#SBATCH --partition`; default: the cluster's).
    #[arg(long)]
    partition: Option<String>,
    /// Time limit per task, e.g. 02:00:00.
    #[arg(long)]
    time: Option<String>,
    /// CPUs per task (`#SBATCH --cpus-per-task`; each task's workers and libtorch threads).
    #[arg(long, default_value_t = 2, allow_negative_numbers = true)]
    cpus: usize,
    /// Output directory shared by all tasks (default: runs/<study name>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where to write the script (default: OUT/slurm.sh).
    #[arg(long)]
    script: Option<PathBuf>,
}

/// Runs `dynrobust slurm`: validates the study, writes the sbatch array script.
pub fn slurm(args: SlurmArgs) -> Result<()> {
    let study = load_study(&args.study)?;
    if args.tasks > study.cells.len() {
        anyhow::bail!("--tasks {}: the study has {} cells, so at most {} tasks would have work", args.tasks, study.cells.len(), study.cells.len());
    }
    let out = std::path::absolute(out_dir(&study, &args.out))?;
    let study_path = std::path::absolute(&args.study)?;
    let binary = std::env::current_exe()?;
    // the script first: it checks --tasks, --time and --cpus before anything is created
    let text = slurm_script(&study_path, &out, args.tasks, args.partition.as_deref(), args.time.as_deref(), args.cpus, &binary)?;
    let created = crate::common::prepare_out_dir("--out", &out)?;
    let script = args.script.unwrap_or_else(|| out.join("slurm.sh"));
    std::fs::write(&script, text).with_context(|| format!("writing {}", script.display()))?;
    eprintln!("wrote {} ({} cells in {} tasks); submit with: sbatch {}", script.display(), study.cells.len(), args.tasks, script.display());
    eprintln!("then: dynrobust merge {}", out.display());
    created.keep(); // the tasks write their logs and cells into it
    Ok(())
}
