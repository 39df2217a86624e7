//! Helpers shared by the subcommands: loading data and checkpoints from CLI options.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use dynrobust_core::data::{DataSource, Dataset, Split};
use dynrobust_models::checkpoint::{self, Sidecar};
use dynrobust_models::Net;
use tch::Device;

/// Data-set options.
#[derive(Args, Debug, Clone)]
pub struct DataArgs {
    /// Data set: fashion-mnist or mnist.
    #[arg(long, default_value = "fashion-mnist")]
    pub data: String,
    /// Directory holding the data files (default: searched, see `make data`).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

impl DataArgs {
    /// Loads `split`, keeping the first `n` samples when given.
    pub fn load(&self, split: Split, n: Option<i64>) -> Result<Dataset> {
        let source = DataSource::parse(&self.data)?;
        let set = source.load(split, self.data_dir.as_deref())?;
        Ok(match n {
            Some(n) if n < 1 => bail!("--n {n}: expected ≥ 1"),
            Some(n) => set.take(n),
            None => set,
        })
    }
}

/// Loads a committed checkpoint by name or a checkpoint directory.
pub fn load_model(model: &str) -> Result<(Net, Sidecar, PathBuf)> {
    let dir = checkpoint::resolve(model)?;
    let (net, sidecar) = checkpoint::load(&dir, Device::Cpu).with_context(|| format!("loading model `{model}`"))?;
    Ok((net, sidecar, dir))
}

/// `dynrobust list WHAT`.
pub fn list(what: &str) -> Result<()> {
    match what {
        "models" => {
            for (name, about) in [
                ("static", "ResNet-14n, every block, final head (the static twin)"),
                ("sdn", "Shallow-Deep Network: frozen static weights + an internal classifier after every block; exit at max-softmax ≥ q"),
                ("gated", "ConvNet-AIG: a gate per block computed from the block input; execute iff p > 0.5"),
                ("skipnet", "SkipNet: a shared-LSTM recurrent gate decides whether the next block runs; execute iff p > 0.5"),
            ] {
                let dir = checkpoint::committed_dir(name);
                let status = if dir.join(checkpoint::SIDECAR_FILE).is_file() { "committed" } else { "not trained" };
                println!("{name:<8} {about} [{status}]");
            }
        }
        "attacks" => {
            for (name, goal, about) in dynrobust_attacks::registry::ATTACKS {
                println!("{name:<20} {goal:<8} {about}");
            }
        }
        "defenses" => {
            for (name, kind, about) in dynrobust_defenses::registry::DEFENSES {
                println!("{name:<17} {:<10} {about}", format!("{kind:?}").to_lowercase());
            }
        }
        other => bail!("unknown list `{other}`: expected models, attacks or defenses"),
    }
    Ok(())
}
