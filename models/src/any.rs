//! [`AnyModel`]: a native dynrobust network or a user's TorchScript model, behind one type, so
//! the CLI, defenses and the study runner load either from one `--model` string.
//!
//! `--model` is a committed checkpoint name (`sdn`), a checkpoint directory, or a path to a
//! `.pt`/`.pth` TorchScript file (see [`crate::torchscript`]).

use std::path::{Path, PathBuf};

use dynrobust_core::{CutTrace, DynamicModel, Error, Family, Pass, Result, Trace, Unit};
use tch::{Device, Tensor};

use crate::checkpoint::{self, Sidecar};
use crate::net::Net;
use crate::torchscript::ScriptModel;

/// A native network or a TorchScript model.
// few, long-lived values: boxing the larger variant would buy nothing
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum AnyModel {
    /// A dynrobust [`Net`] loaded from a checkpoint directory.
    Native(Net),
    /// A user's scripted PyTorch module.
    Script(ScriptModel),
}

/// Where a model came from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A checkpoint directory and its sidecar.
    Checkpoint { dir: PathBuf, sidecar: Box<Sidecar> },
    /// A TorchScript file.
    TorchScript { path: PathBuf },
}

impl ModelSource {
    /// The directory or file.
    pub fn path(&self) -> &Path {
        match self {
            ModelSource::Checkpoint { dir, .. } => dir,
            ModelSource::TorchScript { path } => path,
        }
    }
}

/// True when `model` names a TorchScript file (by extension).
pub fn is_torchscript(model: &str) -> bool {
    let ext = Path::new(model).extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    matches!(ext.as_deref(), Some("pt" | "pth" | "ts" | "jit"))
}

impl AnyModel {
    /// Loads `model` (a committed name, a checkpoint directory or a TorchScript file) onto
    /// `device`. `probe` (a few images of the data the model will see) checks a TorchScript
    /// model's protocol; native models ignore it.
    pub fn load(model: &str, device: Device, probe: &Tensor) -> Result<(AnyModel, ModelSource)> {
        if is_torchscript(model) {
            let path = checkpoint::locate_path(model).unwrap_or_else(|| PathBuf::from(model));
            let script = ScriptModel::load(&path, device, probe)?;
            return Ok((AnyModel::Script(script), ModelSource::TorchScript { path }));
        }
        let dir = checkpoint::resolve(model)?;
        let (net, sidecar) = checkpoint::load(&dir, device)?;
        Ok((AnyModel::Native(net), ModelSource::Checkpoint { dir, sidecar: Box::new(sidecar) }))
    }

    /// The native network, or an error saying `what` needs one.
    pub fn native_mut(&mut self, what: &str) -> Result<&mut Net> {
        match self {
            AnyModel::Native(net) => Ok(net),
            AnyModel::Script(s) => Err(Error::Model {
                model: s.name(),
                problem: format!("{what} needs a native dynrobust model; this is a TorchScript model ({})", s.path().display()),
            }),
        }
    }

    /// The native network, if it is one.
    pub fn as_native(&self) -> Option<&Net> {
        match self {
            AnyModel::Native(net) => Some(net),
            AnyModel::Script(_) => None,
        }
    }

    /// Protocol warnings (TorchScript models only).
    pub fn warnings(&self) -> Vec<String> {
        match self {
            AnyModel::Native(_) => Vec::new(),
            AnyModel::Script(s) => s.warnings().to_vec(),
        }
    }

    /// Sets the exit threshold q (native exit models only).
    pub fn set_threshold(&mut self, q: f64) -> Result<()> {
        self.native_mut("--threshold")?.set_threshold(q)
    }

    /// Switches to the static twin (native models only; `false` is always accepted).
    pub fn set_twin(&mut self, twin: bool) -> Result<()> {
        match self {
            AnyModel::Native(net) => {
                net.set_twin(twin);
                Ok(())
            }
            AnyModel::Script(_) if !twin => Ok(()),
            AnyModel::Script(_) => self.native_mut("the static twin").map(|_| ()),
        }
    }

    fn inner(&self) -> &dyn DynamicModel {
        match self {
            AnyModel::Native(net) => net,
            AnyModel::Script(s) => s,
        }
    }
}

impl DynamicModel for AnyModel {
    fn name(&self) -> String {
        self.inner().name()
    }
    fn forward_trace(&self, x: &Tensor, pass: Pass) -> Result<Trace> {
        self.inner().forward_trace(x, pass)
    }
    fn units(&self) -> &[Unit] {
        match self {
            AnyModel::Native(net) => net.units(),
            AnyModel::Script(s) => s.units(),
        }
    }
    fn family(&self) -> Family {
        self.inner().family()
    }
    fn static_macs(&self) -> u64 {
        self.inner().static_macs()
    }
    fn classes(&self) -> Option<i64> {
        self.inner().classes()
    }
    fn exit_costs(&self) -> Option<Vec<f64>> {
        self.inner().exit_costs()
    }
    fn features(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        self.inner().features(x)
    }
    fn forward_cut(&self, x: &Tensor) -> Result<Option<CutTrace>> {
        self.inner().forward_cut(x)
    }
    fn eot_samples(&self) -> usize {
        self.inner().eot_samples()
    }
    fn input_std(&self) -> Option<Vec<f64>> {
        self.inner().input_std()
    }
    fn input_mean(&self) -> Option<Vec<f64>> {
        self.inner().input_mean()
    }
}

impl From<Net> for AnyModel {
    fn from(net: Net) -> Self {
        AnyModel::Native(net)
    }
}
