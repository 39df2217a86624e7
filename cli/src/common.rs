//! Helpers shared by the subcommands: loading data and checkpoints from CLI options.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use dynrobust_core::data::{DataSpec, Dataset, Split};
use dynrobust_models::checkpoint;
use dynrobust_models::{AnyModel, ModelSource};
use tch::{Device, Tensor};

/// Data-set options.
#[derive(Args, Debug, Clone)]
pub struct DataArgs {
    /// Data set: fashion-mnist, mnist, cifar10-bin:DIR (CIFAR-10 binary batches),
    /// folder:DIR (ImageFolder tree of PNG/JPEG) or npy:DIR ({train,test}_{images,labels}.npy).
    #[arg(long, default_value = "fashion-mnist")]
    pub data: String,
    /// Directory holding the data files (default: searched, see `make data`).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

impl DataArgs {
    /// Loads `split`, keeping the first `n` samples when given.
    pub fn load(&self, split: Split, n: Option<i64>) -> Result<Dataset> {
        self.load_as("--n", split, n)
    }

    /// [`DataArgs::load`] with `n` given by the option `flag` (named in its errors).
    pub fn load_as(&self, flag: &str, split: Split, n: Option<i64>) -> Result<Dataset> {
        if let Some(n) = n.filter(|&n| n < 1) {
            bail!("{flag} {n}: expected ≥ 1");
        }
        let source = DataSpec::parse(&self.data)?;
        if let (Some(dir), Some(_)) = (&self.data_dir, source.dir()) {
            bail!("--data-dir {} with --data {}: --data-dir locates a shipped set (fashion-mnist, mnist); {} names its directory itself", dir.display(), self.data, self.data);
        }
        let set = source.load(split, self.data_dir.as_deref())?;
        Ok(match n {
            Some(n) => set.take(n),
            None => set,
        })
    }

    /// The first `n` images of `split` (all when `None`), refusing an `--n` larger than the
    /// split rather than quietly running fewer images than asked for.
    pub fn load_exactly(&self, split: Split, n: Option<i64>) -> Result<Dataset> {
        self.load_exactly_as("--n", split, n)
    }

    /// [`DataArgs::load_exactly`] with `n` given by the option `flag`.
    pub fn load_exactly_as(&self, flag: &str, split: Split, n: Option<i64>) -> Result<Dataset> {
        let set = self.load_as(flag, split, n)?;
        match n {
            Some(n) if n > set.len() => bail!("{flag} {n}: {} has only {} images", set.name, set.len()),
            _ => Ok(set),
        }
    }
}

/// Hands `attack` the training images it fits on, if it asks for any (DeepSloth's universal
/// perturbation: the first 250 training images by default), and says so on stderr.
pub fn prepare_attack_fit(attack: &dyn dynrobust_core::attack::Attack, data: &DataArgs) -> Result<()> {
    let Some(n) = attack.fit_images() else { return Ok(()) };
    let train = data.load(Split::Train, Some(n)).with_context(|| format!("{}: loading the training images it fits on", attack.name()))?;
    if n == i64::MAX {
        eprintln!("fitting     {} on its pick of the {} training images", attack.name(), train.len());
    } else {
        eprintln!("fitting     {} on the first {} training images", attack.name(), train.len());
    }
    // handed over on the CPU: the attack keeps what it fits on and moves that to the device
    attack.set_fit_data(&train.images, &train.labels)?;
    Ok(())
}

/// Device option.
#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// Where to run: cpu, cuda or cuda:N (fails at once when the device does not exist).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl DeviceArgs {
    /// The parsed, checked device.
    pub fn device(&self) -> Result<Device> {
        Ok(dynrobust_core::device::parse_device(&self.device)?)
    }
}

/// Loads a committed checkpoint by name, a checkpoint directory or a TorchScript `.pt` file
/// onto `device`; `probe` (a few images of the data) checks a TorchScript model's protocol.
/// Protocol warnings are printed.
pub fn load_model(model: &str, device: Device, probe: &Tensor) -> Result<(AnyModel, ModelSource)> {
    let probe = probe.narrow(0, 0, probe.size()[0].min(16));
    let (any, source) = AnyModel::load(model, device, &probe).with_context(|| format!("loading model `{model}`"))?;
    for w in any.warnings() {
        eprintln!("WARNING: {w}");
    }
    Ok((any, source))
}

/// Loads a native checkpoint (committed name or directory) onto `device`, with its sidecar and
/// directory — for commands that train or need the architecture (defend, bench).
pub fn load_checkpoint(model: &str, device: Device) -> Result<(dynrobust_models::Net, checkpoint::Sidecar, PathBuf)> {
    if dynrobust_models::any::is_torchscript(model) {
        bail!("`{model}` is a TorchScript file: this command needs a native dynrobust checkpoint (a name or a directory)");
    }
    let dir = checkpoint::resolve(model)?;
    let (net, sidecar) = checkpoint::load(&dir, device).with_context(|| format!("loading model `{model}`"))?;
    Ok((net, sidecar, dir))
}

/// `dynrobust list WHAT`.
pub fn list(what: &str, name: Option<&str>) -> Result<()> {
    if let Some(name) = name {
        return list_settings(what, name);
    }
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
            let width = dynrobust_attacks::registry::ATTACKS.iter().map(|(name, _, _)| name.len()).max().unwrap_or(0);
            for (name, goal, about) in dynrobust_attacks::registry::ATTACKS {
                println!("{name:<width$} {goal:<8} {about}");
            }
        }
        "defenses" => {
            let width = dynrobust_defenses::registry::DEFENSES.iter().map(|(name, _, _)| name.len()).max().unwrap_or(0);
            for (name, kind, about) in dynrobust_defenses::registry::DEFENSES {
                println!("{name:<width$} {:<10} {about}", kind.to_string());
            }
        }
        other => bail!("unknown list `{other}`: expected models, attacks or defenses"),
    }
    Ok(())
}

/// `dynrobust list attacks NAME` / `list defenses NAME`: the plugin's settings with every
/// default filled in, one `key = value` line each (an unset optional one, or a required one
/// with no default, as a comment), each after what it means and, for a setting with named
/// values, the values it takes.
fn list_settings(what: &str, name: &str) -> Result<()> {
    let (docs, defaults) = match what {
        "attacks" => (dynrobust_attacks::registry::setting_docs(name)?, dynrobust_attacks::registry::build(name, &serde_json::json!({})).map(|a| a.config_json())),
        "defenses" => (dynrobust_defenses::registry::setting_docs(name)?, dynrobust_defenses::registry::DefenseSpec::parse(name, &serde_json::json!({})).and_then(|d| d.settings())),
        other => bail!("`list {other} {name}`: settings are listed for attacks and defenses only"),
    };
    // a defense with a setting that has no default cannot be built from `{}`
    let no_defaults = what == "defenses" && !dynrobust_defenses::registry::has_defaults(name);
    let defaults = match defaults {
        Ok(settings) => settings,
        Err(_) if no_defaults => serde_json::json!({}),
        Err(e) => return Err(e.into()),
    };
    let defaults = defaults.as_object().cloned().unwrap_or_default();
    let flag = if what == "attacks" { "--set" } else { "--defense-set" };
    println!("# {name}: settings and their defaults, values in JSON notation (change them with {flag} KEY=VALUE or a study's params)");
    let doc_only = docs.keys().filter(|key| !defaults.contains_key(*key));
    for key in defaults.keys().chain(doc_only) {
        println!();
        match docs.get(key) {
            Some(doc) => print_setting_doc(doc),
            None => print_comment("(reported with the results; not a setting)"),
        }
        match defaults.get(key) {
            Some(serde_json::Value::Null) => println!("# {key}: unset (optional)"),
            Some(value) => println!("{key} = {value}"),
            None if no_defaults => println!("# {key}: required (no default)"),
            None => println!("# {key}: at its default (left out of the results while unchanged)"),
        }
    }
    Ok(())
}

/// A setting's meaning and, when it has named values, the values.
fn print_setting_doc(doc: &dynrobust_core::settings_doc::SettingDoc) {
    print_comment(&doc.description);
    if !doc.choices.is_empty() {
        let choices = doc.choices.iter().map(|(value, about)| if about.is_empty() { value.clone() } else { format!("{value} ({})", lowercase_first(about.trim_end_matches('.'))) });
        print_comment(&format!("one of: {}", choices.collect::<Vec<_>>().join("; ")));
    }
}

/// `text` with its first letter lower-cased when the rest of its first word is lower-case
/// letters (`Bugs` → `bugs`; `APGD`, `L1`, `L∞` and `DeepSloth's` stay), to read as a
/// parenthesis.
fn lowercase_first(text: &str) -> String {
    let word = text.split_whitespace().next().unwrap_or("");
    let mut chars = word.chars();
    let first = chars.next();
    let rest: Vec<char> = chars.take_while(|c| c.is_alphabetic()).collect();
    match first {
        Some(first) if first.is_uppercase() && !rest.is_empty() && rest.iter().all(|c| c.is_lowercase()) => first.to_lowercase().chain(text.chars().skip(1)).collect(),
        _ => text.to_string(),
    }
}

/// `text` as `# ` comment lines of at most about 96 characters.
fn print_comment(text: &str) {
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.chars().count() + word.chars().count() > 94 {
            println!("# {line}");
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        println!("# {line}");
    }
}

/// The command line as a sidecar records it: `dynrobust` and the arguments (not the path the
/// binary was started from, which differs between machines and build directories).
pub fn command_line() -> String {
    std::iter::once("dynrobust".to_string()).chain(std::env::args().skip(1)).collect::<Vec<_>>().join(" ")
}

/// `dir` relative to the project root when it lies inside it (how sidecars name the
/// checkpoint a model was initialised from), else as given.
pub fn project_relative(dir: &Path) -> String {
    let root = dynrobust_core::data::project_root();
    dir.strip_prefix(&root).unwrap_or(dir).display().to_string()
}

/// Makes sure `dir` can hold the command's output before any work starts: creates it (and its
/// parents), or fails naming `flag` and the path when a file is in the way, so a typo in an
/// output path does not throw away a finished training run or attack. Keep the returned guard
/// until the output is written: if the command fails first, the directories it created are
/// removed again while they are still empty (nothing of the user's is touched).
pub fn prepare_out_dir(flag: &str, dir: &Path) -> Result<CreatedDirs> {
    if let Some(file) = dir.ancestors().find(|a| a.is_file()) {
        bail!("{flag} {}: {} is a file, expected a directory (or a path that does not exist yet)", dir.display(), file.display());
    }
    let created: Vec<PathBuf> = dir.ancestors().take_while(|a| !a.as_os_str().is_empty() && !a.exists()).map(Path::to_path_buf).collect();
    std::fs::create_dir_all(dir).with_context(|| format!("{flag} {}: cannot create the directory", dir.display()))?;
    Ok(CreatedDirs(created))
}

/// Refuses to write over the `holds` (`a checkpoint`, `saved examples`) that `dir` already
/// has (its `marker` file is there) unless `force`: a retrained committed checkpoint would silently
/// make every study cell stored with it stale, and another run's model would be lost.
pub fn refuse_overwrite(flag: &str, dir: &Path, (marker, holds): (&str, &str), force: bool) -> Result<()> {
    if force || !dir.join(marker).is_file() {
        return Ok(());
    }
    let committed = dir.canonicalize().ok().zip(dynrobust_models::checkpoint::committed_dir("").canonicalize().ok()).is_some_and(|(d, root)| d.starts_with(root));
    bail!(
        "{flag} {}: already holds {holds} ({marker}){}; pass --force to replace it, or another {flag}",
        dir.display(),
        if committed { ", one of the committed ones that the demo, the tests and stored study cells use" } else { "" }
    )
}

/// The directories [`prepare_out_dir`] created, deepest first; on drop, removed while empty
/// — unless the command succeeded and said so with [`CreatedDirs::keep`] (an output directory
/// that is meant to start empty, as `slurm --script elsewhere` leaves it for the tasks' logs).
#[must_use = "the output directory is removed again when the guard drops while it is empty"]
pub struct CreatedDirs(Vec<PathBuf>);

impl CreatedDirs {
    /// The command succeeded: keep the directories, empty or not.
    pub fn keep(mut self) {
        self.0.clear();
    }
}

impl Drop for CreatedDirs {
    fn drop(&mut self) {
        for dir in &self.0 {
            if std::fs::remove_dir(dir).is_err() {
                break; // not empty (the output is there) or gone: leave it and its parents
            }
        }
    }
}

/// Sets libtorch's intra-op thread count, refusing a count below 1 (libtorch would abort).
pub fn set_threads(threads: Option<i32>) -> Result<()> {
    if let Some(t) = threads {
        if t < 1 {
            bail!("--threads {t}: expected ≥ 1");
        }
        tch::set_num_threads(t);
    }
    Ok(())
}
