//! `dynrobust` — the command-line front end. No logic of its own: it parses arguments and
//! calls the library crates. Human text goes to stderr; `--json` prints one JSON object on
//! stdout.

mod attack;
mod bench;
mod common;
mod defend;
mod eval;
mod study;
mod train;

use clap::{Parser, Subcommand};

/// Robustness evaluation of dynamic (early-exit, gated) neural networks against energy and
/// accuracy attacks, side by side with their static twins.
#[derive(Parser)]
#[command(name = "dynrobust", version = VERSION_LINE, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model and write a checkpoint directory (weights + sidecar).
    Train(train::TrainArgs),
    /// Attack a model and measure accuracy, cost, recovery, perturbation size, energy.
    Attack(attack::AttackArgs),
    /// Build a training-time defense: fine-tune a checkpoint with adversarial examples.
    Defend(defend::DefendArgs),
    /// Train the learned input denoiser (a defense).
    TrainDenoiser(defend::DenoiserArgs),
    /// Run a study file (models × defenses × attacks grid) into a result directory.
    Run(study::RunArgs),
    /// Write report.md and plots for a result directory.
    Report(study::ReportArgs),
    /// Check a sharded run is complete and write its report.
    Merge(study::MergeArgs),
    /// Write an sbatch job-array script that runs a study in shards.
    Slurm(study::SlurmArgs),
    /// Evaluate a checkpoint: accuracy, cost, exits/gates, latency.
    Eval(eval::EvalArgs),
    /// Print a model's units and their MACs.
    Info(eval::InfoArgs),
    /// Benchmarks: sparse-pass speed vs cost, attack time per iteration, TorchScript overhead.
    Bench(bench::BenchArgs),
    /// List what dynrobust knows: models, attacks, defenses.
    List {
        /// models | attacks | defenses
        what: String,
        /// With `attacks` or `defenses`: print this one's settings — what each means, the
        /// values it takes, its default (what `--set` / `--defense-set` and a study's `params`
        /// may change).
        name: Option<String>,
    },
}

/// `0.1.0 (commit 1a2b3c4d5e6f)`, or `0.1.0 (commit 1a2b3c4d5e6f+dirty.0badc0de)` for a build
/// from uncommitted changes (see `build-support/rpath.rs`): what `dynrobust --version` prints.
const VERSION_LINE: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("DYNROBUST_BUILD_SOURCE"), ")");

fn main() {
    // first: every result, sidecar and cache key names this build's source
    dynrobust_core::set_build_source(env!("DYNROBUST_BUILD_SOURCE"));
    dynrobust_core::process::default_sigpipe();
    dynrobust_core::process::install_panic_hook();
    let cli = Cli::parse();
    // before any worker thread or tensor exists: keep freed tensor buffers for reuse
    dynrobust_core::allocator::keep_freed_memory();
    if let Err(e) = dispatch(cli.command) {
        // anyhow's own report, each cause with libtorch's C++ stack cut away
        let mut causes = e.chain().map(|c| dynrobust_core::error::libtorch_message(&c.to_string()));
        let first = causes.next().unwrap_or_default();
        eprintln!("Error: {first}");
        // a cause its message already quotes (`path: No such file …` then `No such file …`) is
        // not repeated
        let mut said = first;
        let rest: Vec<String> = causes
            .filter(|c| {
                let repeated = said.contains(c.as_str());
                said = c.clone();
                !repeated
            })
            .collect();
        if !rest.is_empty() {
            eprintln!("\nCaused by:");
            for (i, c) in rest.iter().enumerate() {
                eprintln!("    {i}: {c}");
            }
        }
        std::process::exit(1);
    }
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Train(a) => train::run(a),
        Command::Attack(a) => attack::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Defend(a) => defend::run(a),
        Command::Run(a) => study::run(a),
        Command::Report(a) => study::report(a),
        Command::Merge(a) => study::merge_cmd(a),
        Command::Slurm(a) => study::slurm(a),
        Command::TrainDenoiser(a) => defend::train_denoiser(a),
        Command::Info(a) => eval::info(a),
        Command::Bench(a) => bench::run(a),
        Command::List { what, name } => common::list(&what, name.as_deref()),
    }
}
