//! Bring your own model: a `torch.jit.script`-ed PyTorch module exposed as a [`DynamicModel`].
//!
//! # The protocol (see also `examples/torchscript/README.md`)
//!
//! The module's `forward(x)` takes images `[B,C,H,W]` in [0,1] (normalisation lives inside the
//! model) and runs the **dense** pass: every unit computed for every sample, differentiable
//! with respect to `x` (hard gates pass their gradient straight through). It returns a
//! `Dict[str, List[Tensor]]` (or a tuple in the key order below) with
//!
//! | key | shape | meaning |
//! |---|---|---|
//! | `logits` | `[t]`, t `[B,K]` | the prediction after the exit/skip rule |
//! | `exit_logits` | list of `[B,K]` | one per internal classifier (empty without exits) |
//! | `gate_probs` | list of `[B]` | soft execute-probability per gate (empty without gates) |
//! | `executed` | `[t]`, t `[B,U]` | 1.0 where unit u ran for sample b |
//! | `macs` | `[t]`, t `[B]` | MACs spent per sample (= `executed @ unit_macs`) |
//! | `final_logits` | `[t]`, t `[B,K]` | the final head (required for exit models) |
//! | `exit_index` | `[t]`, t `[B]` int64 | exit that produced `logits` (optional) |
//!
//! plus the exported methods `unit_macs() -> Tensor` (`[U]` MACs per unit, required),
//! `unit_names() -> List[str]`, `unit_kinds() -> List[str]` (stem, shortcut, block, head,
//! gate, exit; units in execution order), `exit_threshold() -> float` (exit models), and
//! `forward_sparse(x)` (the really-skipping pass; without it the sparse pass is `forward` run
//! without gradients).
//!
//! [`ScriptModel::load`] checks the protocol on a probe batch: a missing key, a wrong shape,
//! non-finite values, MACs that disagree with `executed @ unit_macs` are errors; an executed
//! mask that is identical for every probe input of a gated or exit model — the sign of a
//! `torch.jit.trace`d model, whose data-dependent path was frozen at tracing time — is a
//! warning.
//!
//! Loading a TorchScript model switches libtorch's JIT profiling executor off for the process
//! (attacks alternate gradient and no-gradient calls, which made it re-specialise the graph:
//! 7× slower attacks, measured).

use std::path::{Path, PathBuf};

use dynrobust_core::{Error, Family, Pass, Result, Trace, Unit, UnitKind};
use dynrobust_core::DynamicModel;
use tch::{CModule, Device, IValue, Kind, Tensor};

/// Output keys in the order a tuple-returning module must use.
pub const OUTPUT_KEYS: [&str; 7] = ["logits", "exit_logits", "gate_probs", "executed", "macs", "final_logits", "exit_index"];

/// A TorchScript model that follows the dynrobust protocol.
pub struct ScriptModel {
    module: CModule,
    path: PathBuf,
    units: Vec<Unit>,
    family: Family,
    has_sparse: bool,
    exit_costs: Option<Vec<f64>>,
    warnings: Vec<String>,
    /// The logits' width on the load-time probe.
    classes: Option<i64>,
}

impl std::fmt::Debug for ScriptModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptModel").field("path", &self.path).field("family", &self.family).finish()
    }
}

/// The outputs of one call, before they become a [`Trace`].
struct Outputs {
    logits: Tensor,
    exit_logits: Vec<Tensor>,
    gate_probs: Vec<Tensor>,
    executed: Tensor,
    macs: Tensor,
    final_logits: Option<Tensor>,
    exit_index: Option<Tensor>,
}

impl ScriptModel {
    /// Loads `path` onto `device` and checks the protocol on `probe` (a batch of ≥ 2 images
    /// of the shape the model expects, in [0,1]).
    pub fn load(path: &Path, device: Device, probe: &Tensor) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::checkpoint(path, "no such TorchScript file"));
        }
        // The profiling executor re-profiles and re-specialises the graph as inputs alternate
        // between requiring gradients (attack steps) and not (evaluation): measured DeepSloth on
        // 128 images through the scripted `sdn`, 67 s with it, 9.1 s without (native: 9.6 s).
        tch::jit::set_profiling_mode(false);
        let mut module = CModule::load_on_device(path, device).map_err(|e| Error::checkpoint(path, format!("not a loadable TorchScript module: {}", dynrobust_core::error::libtorch_message(&e.to_string()))))?;
        module.f_set_eval()?;
        for (_, p) in module.named_parameters()? {
            let _ = p.set_requires_grad(false);
        }
        let has_sparse = module.method_is::<IValue>("forward_sparse", &[IValue::Tensor(probe.narrow(0, 0, 1).to_device(device))]).is_ok();
        let units = read_units(&module, path)?;
        let mut model = ScriptModel { module, path: path.to_path_buf(), units, family: Family::Static, has_sparse, exit_costs: None, warnings: Vec::new(), classes: None };
        model.check_protocol(&probe.to_device(device))?;
        Ok(model)
    }

    /// Where the module was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Protocol warnings found by the probe (e.g. a traced model's frozen mask).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// True when the module exports `forward_sparse`.
    pub fn has_sparse_pass(&self) -> bool {
        self.has_sparse
    }

    fn problem(&self, what: impl Into<String>) -> Error {
        Error::checkpoint(&self.path, format!("TorchScript protocol: {}", what.into()))
    }

    fn call(&self, x: &Tensor, pass: Pass) -> Result<Outputs> {
        let input = [IValue::Tensor(x.shallow_clone())];
        let out = match (pass, self.has_sparse) {
            (Pass::Sparse, true) => tch::no_grad(|| self.module.method_is("forward_sparse", &input)),
            (Pass::Sparse, false) => tch::no_grad(|| self.module.forward_is(&input)),
            (Pass::Dense, _) => self.module.forward_is(&input),
        }
        .map_err(|e| self.problem(format!("forward failed on input {:?}: {e}", x.size())))?;
        self.parse(out, x.size()[0])
    }

    fn parse(&self, out: IValue, batch: i64) -> Result<Outputs> {
        let mut fields: Vec<(String, Vec<Tensor>)> = match out {
            IValue::GenericDict(entries) => entries
                .into_iter()
                .map(|(k, v)| match k {
                    IValue::String(key) => Ok((key.clone(), tensors_of(v).map_err(|t| self.problem(format!("key `{key}` holds a {t}: expected a list of tensors")))?)),
                    other => Err(self.problem(format!("dict key {other:?}: expected strings"))),
                })
                .collect::<Result<_>>()?,
            IValue::Tuple(items) => items
                .into_iter()
                .zip(OUTPUT_KEYS)
                .map(|(v, key)| Ok((key.to_string(), tensors_of(v).map_err(|t| self.problem(format!("tuple field `{key}` holds a {t}")))?)))
                .collect::<Result<_>>()?,
            other => return Err(self.problem(format!("forward returned {}: expected a Dict[str, List[Tensor]] with keys {:?}", ivalue_kind(&other), &OUTPUT_KEYS[..5]))),
        };
        let mut take = |key: &str| fields.iter().position(|(k, _)| k == key).map(|i| fields.swap_remove(i).1);
        let mut single = |key: &str, required: bool| -> Result<Option<Tensor>> {
            match take(key) {
                None if required => Err(self.problem(format!("output has no key `{key}` (required keys: {:?})", &OUTPUT_KEYS[..5]))),
                None => Ok(None),
                Some(mut v) if v.len() == 1 => Ok(v.pop()),
                Some(v) => Err(self.problem(format!("`{key}` holds {} tensors: expected exactly one", v.len()))),
            }
        };
        let logits = single("logits", true)?.unwrap();
        let executed = single("executed", true)?.unwrap();
        let macs = single("macs", true)?.unwrap();
        let final_logits = single("final_logits", false)?;
        let exit_index = single("exit_index", false)?;
        let exit_logits = take("exit_logits").ok_or_else(|| self.problem("output has no key `exit_logits` (an empty list when the model has no exits)"))?;
        let gate_probs = take("gate_probs").ok_or_else(|| self.problem("output has no key `gate_probs` (an empty list when the model has no gates)"))?;
        let outputs = Outputs { logits, exit_logits, gate_probs, executed, macs, final_logits, exit_index };
        self.check_shapes(&outputs, batch)?;
        Ok(outputs)
    }

    fn check_shapes(&self, o: &Outputs, batch: i64) -> Result<()> {
        let classes = o.logits.size().get(1).copied().unwrap_or(0);
        let expect = |name: &str, t: &Tensor, shape: &[i64]| {
            if t.size() == shape {
                Ok(())
            } else {
                Err(self.problem(format!("`{name}` has shape {:?}: expected {shape:?} (batch {batch})", t.size())))
            }
        };
        if o.logits.dim() != 2 || o.logits.size()[0] != batch {
            return Err(self.problem(format!("`logits` has shape {:?}: expected [{batch}, classes]", o.logits.size())));
        }
        expect("executed", &o.executed, &[batch, self.units.len() as i64])?;
        expect("macs", &o.macs, &[batch])?;
        for (i, t) in o.exit_logits.iter().enumerate() {
            expect(&format!("exit_logits[{i}]"), t, &[batch, classes])?;
        }
        for (i, t) in o.gate_probs.iter().enumerate() {
            expect(&format!("gate_probs[{i}]"), t, &[batch])?;
        }
        if let Some(t) = &o.final_logits {
            expect("final_logits", t, &[batch, classes])?;
        }
        if let Some(t) = &o.exit_index {
            expect("exit_index", t, &[batch])?;
        }
        Ok(())
    }

    /// Runs the probe: shapes, finiteness, MACs consistency, the family, the traced-model sign.
    fn check_protocol(&mut self, probe: &Tensor) -> Result<()> {
        let batch = probe.size()[0];
        let out = tch::no_grad(|| self.call(probe, Pass::Dense))?;
        self.classes = out.logits.size().get(1).copied();
        let named: Vec<(String, &Tensor)> = [("logits".to_string(), &out.logits), ("executed".into(), &out.executed), ("macs".into(), &out.macs)]
            .into_iter()
            .chain(out.exit_logits.iter().enumerate().map(|(i, t)| (format!("exit_logits[{i}]"), t)))
            .chain(out.gate_probs.iter().enumerate().map(|(i, t)| (format!("gate_probs[{i}]"), t)))
            .collect();
        for (name, t) in named {
            if !bool::try_from(t.to_kind(Kind::Double).isfinite().all())? {
                return Err(self.problem(format!("`{name}` has non-finite values on the probe batch")));
            }
        }
        let executed = out.executed.to_kind(Kind::Double);
        if !bool::try_from(executed.eq(0.0).logical_or(&executed.eq(1.0)).all())? {
            return Err(self.problem("`executed` must hold only 0.0 and 1.0"));
        }
        let expected = dynrobust_core::macs_from_executed(&executed, &self.units);
        let diff = f64::try_from((expected - out.macs.to_kind(Kind::Double)).abs().max())?;
        if diff > 0.5 {
            return Err(self.problem(format!("`macs` differs from executed @ unit_macs by up to {diff:.1} MACs on the probe batch")));
        }
        self.family = self.family_of(&out)?;
        self.exit_costs = self.compute_exit_costs();
        let dynamic = !matches!(self.family, Family::Static);
        if dynamic && batch > 1 && bool::try_from(out.executed.eq_tensor(&out.executed.narrow(0, 0, 1)).all())? {
            self.warnings.push(format!(
                "{}: the executed mask is identical for all {batch} probe inputs — a traced model (torch.jit.trace) freezes the data-dependent path; script it with torch.jit.script",
                self.path.display()
            ));
        }
        Ok(())
    }

    fn family_of(&self, out: &Outputs) -> Result<Family> {
        let (exits, gates) = (out.exit_logits.len(), out.gate_probs.len());
        if exits > 0 && gates > 0 {
            return Err(self.problem(format!("{exits} exits and {gates} gates: dynrobust supports either exits or gates in one model")));
        }
        if exits > 0 {
            if out.final_logits.is_none() {
                return Err(self.problem("exit models must return `final_logits` (the final head's logits)"));
            }
            let threshold = match self.module.method_is::<IValue>("exit_threshold", &[]) {
                Ok(IValue::Double(q)) => q,
                Ok(other) => return Err(self.problem(format!("exit_threshold() returned {}: expected a float", ivalue_kind(&other)))),
                Err(_) => f64::NAN,
            };
            let expected = self.units.iter().filter(|u| u.kind == UnitKind::Exit).count();
            if expected != exits {
                return Err(self.problem(format!("{exits} exit_logits but unit_kinds() lists {expected} `exit` units")));
            }
            return Ok(Family::EarlyExit { threshold, exits });
        }
        if gates > 0 {
            return Ok(Family::Gated { gates, recurrent: false });
        }
        Ok(Family::Static)
    }

    /// Cost of leaving at each exit (final head last): the units listed up to and including
    /// that exit ran (units are listed in execution order, as the protocol asks); the final
    /// head costs every unit.
    fn compute_exit_costs(&self) -> Option<Vec<f64>> {
        if !matches!(self.family, Family::EarlyExit { .. }) {
            return None;
        }
        let stat = dynrobust_core::static_macs(&self.units) as f64;
        let mut costs = Vec::new();
        let mut spent = 0u64;
        for unit in &self.units {
            spent += unit.macs;
            if unit.kind == UnitKind::Exit {
                costs.push(spent as f64 / stat);
            }
        }
        let all_but_exits: u64 = self.units.iter().map(|u| u.macs).sum();
        costs.push(all_but_exits as f64 / stat);
        Some(costs)
    }
}

fn read_units(module: &CModule, path: &Path) -> Result<Vec<Unit>> {
    let problem = |what: String| Error::checkpoint(path, format!("TorchScript protocol: {what}"));
    let macs = match module.method_is::<IValue>("unit_macs", &[]) {
        Ok(IValue::Tensor(t)) if t.dim() == 1 => Vec::<i64>::try_from(t.to_kind(Kind::Int64))?,
        Ok(IValue::IntList(v)) => v,
        Ok(other) => return Err(problem(format!("unit_macs() returned {}: expected a 1-d int64 tensor [U]", ivalue_kind(&other)))),
        Err(e) => return Err(problem(format!("no exported method unit_macs() (add `@torch.jit.export def unit_macs(self) -> Tensor`): {}", first_line(&e.to_string())))),
    };
    if macs.is_empty() || macs.iter().any(|&m| m < 0) {
        return Err(problem(format!("unit_macs() = {macs:?}: expected one or more non-negative counts")));
    }
    let strings = |method: &str| -> Result<Option<Vec<String>>> {
        match module.method_is::<IValue>(method, &[]) {
            Ok(IValue::StringList(v)) if v.len() == macs.len() => Ok(Some(v)),
            Ok(IValue::GenericList(v)) if v.len() == macs.len() && v.iter().all(|i| matches!(i, IValue::String(_))) => {
                Ok(Some(v.into_iter().filter_map(|i| if let IValue::String(s) = i { Some(s) } else { None }).collect()))
            }
            Ok(other) => Err(problem(format!("{method}() returned {}: expected List[str] of {} entries", ivalue_summary(&other), macs.len()))),
            Err(_) => Ok(None),
        }
    };
    let names = strings("unit_names")?.unwrap_or_else(|| (0..macs.len()).map(|i| format!("unit{i}")).collect());
    let kinds = match strings("unit_kinds")? {
        Some(kinds) => kinds.iter().map(|k| unit_kind(k).ok_or_else(|| problem(format!("unit_kinds(): `{k}` is not one of stem, shortcut, block, head, gate, exit")))).collect::<Result<Vec<_>>>()?,
        None => vec![UnitKind::Block; macs.len()],
    };
    Ok(names.into_iter().zip(kinds).zip(macs).map(|((name, kind), macs)| Unit { name, kind, macs: macs as u64, params: 0, activations: 0 }).collect())
}

fn unit_kind(name: &str) -> Option<UnitKind> {
    Some(match name {
        "stem" => UnitKind::Stem,
        "shortcut" => UnitKind::Shortcut,
        "block" => UnitKind::Block,
        "head" => UnitKind::Head,
        "gate" => UnitKind::Gate,
        "exit" => UnitKind::Exit,
        _ => return None,
    })
}

fn tensors_of(v: IValue) -> std::result::Result<Vec<Tensor>, &'static str> {
    match v {
        IValue::Tensor(t) => Ok(vec![t]),
        IValue::TensorList(ts) => Ok(ts),
        IValue::GenericList(items) => items.into_iter().map(|i| match i {
            IValue::Tensor(t) => Ok(t),
            other => Err(ivalue_kind(&other)),
        }).collect(),
        other => Err(ivalue_kind(&other)),
    }
}

fn ivalue_kind(v: &IValue) -> &'static str {
    match v {
        IValue::None => "None",
        IValue::Tensor(_) => "Tensor",
        IValue::Double(_) => "float",
        IValue::Int(_) => "int",
        IValue::Bool(_) => "bool",
        IValue::Tuple(_) => "tuple",
        IValue::String(_) => "str",
        IValue::GenericDict(_) => "dict",
        IValue::StringList(_) => "List[str]",
        IValue::TensorList(_) | IValue::GenericList(_) => "list",
        _ => "value of another type",
    }
}

fn ivalue_summary(v: &IValue) -> String {
    match v {
        IValue::StringList(l) => format!("List[str] of {} entries", l.len()),
        IValue::GenericList(l) => format!("a list of {} entries", l.len()),
        other => ivalue_kind(other).to_string(),
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

impl DynamicModel for ScriptModel {
    fn name(&self) -> String {
        self.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "torchscript".into())
    }

    fn classes(&self) -> Option<i64> {
        self.classes
    }

    fn forward_trace(&self, x: &Tensor, pass: Pass) -> Result<Trace> {
        let out = self.call(x, pass)?;
        let final_logits = out.final_logits.unwrap_or_else(|| out.logits.shallow_clone());
        Ok(Trace {
            logits: out.logits,
            final_logits,
            exit_logits: out.exit_logits,
            gate_probs: out.gate_probs,
            executed: out.executed.to_kind(Kind::Float),
            macs: out.macs.to_kind(Kind::Double),
            exit_index: out.exit_index.map(|t| t.to_kind(Kind::Int64)),
        })
    }

    fn units(&self) -> &[Unit] {
        &self.units
    }

    fn family(&self) -> Family {
        self.family.clone()
    }

    fn exit_costs(&self) -> Option<Vec<f64>> {
        self.exit_costs.clone()
    }
}
