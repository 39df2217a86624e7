//! The TorchScript adapter (`dynrobust_models::torchscript`) against PyTorch itself.
//!
//! `examples/torchscript/models/` holds a SkipNet-style gated model and an SDN-style exit model
//! that `examples/torchscript/make_models.py` trained (300 steps, seed 0), scripted and saved.
//! They are committed rather than trained at test time because a short CPU training run is
//! deterministic on one CPU model, not across them: the same seed and 150 steps gave gated
//! models of 64.10 % and 60.65 % on two AMD EPYC VMs, and faithful ILFO lowered the cost of one
//! and raised the other's, so a test that trained its own model tested a different model on
//! each machine. PyTorch's outputs on the probe batch are recomputed here from the committed
//! files (`--reference-from`), since another CPU's kernels may round differently.
//!
//! Loaded through [`ScriptModel`], the dense outputs must equal PyTorch's (1e-5), the sparse
//! pass must agree with the dense one, and an energy attack must raise each model's cost. The
//! script itself is still run, briefly (`--train-steps 30`), and its files must equal PyTorch
//! the same way. `protocol_violations.py` writes modules that each break the protocol one way;
//! each must give an error (or, for a traced model, a warning) that names the problem.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use dynrobust_core::data::project_root;
use dynrobust_core::{cost_of, DynamicModel, Family, Pass};
use dynrobust_models::torchscript::ScriptModel;
use tch::{Device, Kind, Tensor};

fn python() -> PathBuf {
    project_root().join(".venv/bin/python")
}

/// Runs an example script once per test binary into a temp dir that lives for the process.
fn built(script: &str, extra: &[&str]) -> PathBuf {
    let out = std::env::temp_dir().join(format!("dynrobust-ts-{}-{}", std::process::id(), script.trim_end_matches(".py")));
    let status = Command::new(python())
        .arg(project_root().join("examples/torchscript").join(script))
        .arg("--out")
        .arg(&out)
        .args(extra)
        .status()
        .expect("run the project's venv python (make setup)");
    assert!(status.success(), "{script} failed");
    out
}

/// The committed example models (see `examples/torchscript/models/models.json`).
fn models_dir() -> PathBuf {
    project_root().join("examples/torchscript/models")
}

/// PyTorch's outputs of the committed models, computed on this machine (`make_models.py
/// --reference-from`): the committed `reference.safetensors` came from one CPU, and another
/// CPU's kernels may round differently.
fn fresh_reference_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let models = models_dir();
        built("make_models.py", &["--reference-from", models.to_str().expect("a UTF-8 path")])
    })
}

/// `make_models.py` run at test time with a short training (30 steps, a few seconds): what the
/// script writes now.
fn briefly_trained_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| built("make_models.py", &["--train-steps", "30"]))
}

fn violations_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| built("protocol_violations.py", &[]))
}

fn reference(dir: &Path) -> Vec<(String, Tensor)> {
    let path = dir.join("reference.safetensors");
    Tensor::read_safetensors(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn get(reference: &[(String, Tensor)], key: &str) -> Option<Tensor> {
    reference.iter().find(|(k, _)| k == key).map(|(_, t)| t.shallow_clone())
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

fn load_from(dir: &Path, name: &str, probe: &Tensor) -> ScriptModel {
    let path = dir.join(format!("{name}.pt"));
    ScriptModel::load(&path, Device::Cpu, probe).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn load(name: &str, probe: &Tensor) -> ScriptModel {
    load_from(&models_dir(), name, probe)
}

#[test]
fn dense_outputs_equal_pytorch() {
    let _guard = dynrobust_core::testing::torch_lock();
    dense_outputs_equal_pytorch_in(&models_dir(), fresh_reference_dir(), true);
}

/// The briefly trained models' exits may all fire at the head on the probe batch (the adapter
/// then warns, rightly), so warnings are not checked here.
#[test]
fn the_script_still_writes_models_that_equal_pytorch() {
    let _guard = dynrobust_core::testing::torch_lock();
    dense_outputs_equal_pytorch_in(briefly_trained_dir(), briefly_trained_dir(), false);
}

/// The committed reference and one computed here agree on everything but float rounding.
#[test]
fn the_committed_reference_matches_pytorch_here() {
    let (committed, fresh) = (reference(&models_dir()), reference(fresh_reference_dir()));
    assert_eq!(committed.len(), fresh.len());
    for (key, t) in &fresh {
        let c = get(&committed, key).unwrap_or_else(|| panic!("{key} missing in the committed reference"));
        let tolerance = if t.kind() == Kind::Float { 1e-4 } else { 0.0 };
        assert!(max_abs(&c, t) <= tolerance, "{key}: {}", max_abs(&c, t));
    }
}

fn dense_outputs_equal_pytorch_in(models: &Path, reference_dir: &Path, check_warnings: bool) {
    let reference = reference(reference_dir);
    let x = get(&reference, "x").expect("probe x");
    for name in ["gated", "sdn"] {
        let model = load_from(models, name, &x);
        assert!(!check_warnings || model.warnings().is_empty(), "{name}: {:?}", model.warnings());
        let trace = tch::no_grad(|| model.forward_trace(&x, Pass::Dense)).unwrap();
        let want = |k: &str| get(&reference, &format!("{name}.{k}")).unwrap_or_else(|| panic!("{name}.{k} missing in reference"));
        assert!(max_abs(&trace.logits, &want("logits")) <= 1e-5, "{name} logits");
        assert_eq!(max_abs(&trace.executed, &want("executed")), 0.0, "{name} executed");
        assert_eq!(max_abs(&trace.macs, &want("macs")), 0.0, "{name} macs");
        let units: Vec<i64> = model.units().iter().map(|u| u.macs as i64).collect();
        assert_eq!(Tensor::from_slice(&units), want("unit_macs").to_kind(Kind::Int64), "{name} unit_macs");
        for (i, g) in trace.gate_probs.iter().enumerate() {
            assert!(max_abs(g, &want(&format!("gate_probs.{i}"))) <= 1e-5, "{name} gate {i}");
        }
        for (i, e) in trace.exit_logits.iter().enumerate() {
            assert!(max_abs(e, &want(&format!("exit_logits.{i}"))) <= 1e-5, "{name} exit {i}");
        }
        match (name, model.family()) {
            ("gated", Family::Gated { gates, .. }) => assert_eq!(gates, trace.gate_probs.len()),
            ("sdn", Family::EarlyExit { exits, threshold }) => {
                assert_eq!(exits, trace.exit_logits.len());
                assert!(threshold > 0.0 && threshold <= 1.0);
                let idx = trace.exit_index.as_ref().expect("exit_index");
                assert_eq!(idx, &want("exit_index").to_kind(Kind::Int64));
            }
            (n, f) => panic!("{n}: unexpected family {f:?}"),
        }
    }
}

#[test]
fn sparse_pass_agrees_with_dense() {
    let _guard = dynrobust_core::testing::torch_lock();
    let images = dynrobust_core::testing::test_images(256).images;
    for name in ["gated", "sdn"] {
        let model = load(name, &images);
        assert!(model.has_sparse_pass(), "{name} exports forward_sparse");
        let dense = tch::no_grad(|| model.forward_trace(&images, Pass::Dense)).unwrap();
        let sparse = model.forward_trace(&images, Pass::Sparse).unwrap();
        assert_eq!(dense.executed, sparse.executed, "{name} executed");
        assert_eq!(dense.macs, sparse.macs, "{name} macs");
        assert_eq!(dense.logits.argmax(1, false), sparse.logits.argmax(1, false), "{name} predictions");
        assert!(max_abs(&dense.logits, &sparse.logits) <= 1e-4, "{name} logits");
    }
}

#[test]
fn energy_attacks_raise_the_cost_of_scripted_models() {
    let _guard = dynrobust_core::testing::torch_lock();
    let data = dynrobust_core::testing::test_images(64);
    let (images, labels) = (data.images, data.labels);
    for (name, attack, params) in [
        ("gated", "ilfo", serde_json::json!({"steps": 100})),
        ("gated", "gradauto", serde_json::json!({"iterations": 50})),
        ("sdn", "deepsloth", serde_json::json!({"eps": 8.0 / 255.0, "steps": 10, "seed": 1})),
    ] {
        let model = load(name, &images);
        let attack = dynrobust_attacks::registry::build(attack, &params).unwrap();
        let x_adv = attack.perturb(&model, &images, &labels).unwrap();
        let clean = cost_of(&model.forward_trace(&images, Pass::Sparse).unwrap(), &model).mean(Kind::Double).double_value(&[]);
        let adv = cost_of(&model.forward_trace(&x_adv, Pass::Sparse).unwrap(), &model).mean(Kind::Double).double_value(&[]);
        eprintln!("{name} {}: cost {clean:.4} -> {adv:.4}", attack.name());
        assert!(adv > clean, "{name} {}: cost {clean:.4} -> {adv:.4}", attack.name());
    }
}

fn load_err(file: &str) -> String {
    let probe = dynrobust_core::testing::test_images(8).images;
    match ScriptModel::load(&violations_dir().join(file), Device::Cpu, &probe) {
        Ok(_) => panic!("{file} loaded without error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn protocol_violations_are_named() {
    let _guard = dynrobust_core::testing::torch_lock();
    for (file, needle) in [
        ("missing_key.pt", "no key `executed`"),
        ("wrong_shape.pt", "`executed` has shape"),
        ("non_finite.pt", "non-finite"),
        ("no_unit_macs.pt", "unit_macs()"),
    ] {
        let err = load_err(file);
        assert!(err.contains(needle) && err.contains(file), "{file}: {err}");
    }
    assert!(load_err("does_not_exist.pt").contains("no such TorchScript file"));
}

#[test]
fn a_traced_model_gets_a_warning_and_a_valid_one_none() {
    let _guard = dynrobust_core::testing::torch_lock();
    let probe = dynrobust_core::testing::test_images(32).images;
    let traced = ScriptModel::load(&violations_dir().join("traced.pt"), Device::Cpu, &probe).expect("traced.pt loads");
    assert!(traced.warnings().iter().any(|w| w.contains("identical") && w.contains("torch.jit.script")), "{:?}", traced.warnings());
    let ok = ScriptModel::load(&violations_dir().join("ok.pt"), Device::Cpu, &probe).expect("ok.pt loads");
    assert!(ok.warnings().is_empty(), "{:?}", ok.warnings());
}

fn native_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| built("export_native.py", &[]))
}

/// dynrobust's own `static` and `sdn`, exported by `export_native.py` with the same weights,
/// agree with the native networks through the adapter: outputs, masks, MACs, exit costs.
#[test]
fn the_native_checkpoints_exported_to_torchscript_agree_with_the_native_networks() {
    let _guard = dynrobust_core::testing::torch_lock();
    let images = dynrobust_core::testing::test_images(512).images;
    for name in ["static", "sdn"] {
        let native = dynrobust_models::checkpoint::load_committed(name);
        let script = ScriptModel::load(&native_dir().join(format!("{name}.pt")), Device::Cpu, &images.narrow(0, 0, 16)).unwrap();
        assert_eq!(script.family(), native.family(), "{name}");
        assert_eq!(script.static_macs(), native.static_macs(), "{name}");
        assert_eq!(script.exit_costs(), native.exit_costs(), "{name} exit costs");
        for pass in [Pass::Dense, Pass::Sparse] {
            let (a, b) = tch::no_grad(|| (native.forward_trace(&images, pass).unwrap(), script.forward_trace(&images, pass).unwrap()));
            assert_eq!(a.macs, b.macs, "{name} {pass:?} macs");
            assert_eq!(a.logits.argmax(1, false), b.logits.argmax(1, false), "{name} {pass:?} predictions");
            assert!(max_abs(&a.logits, &b.logits) <= 1e-5, "{name} {pass:?} logits {}", max_abs(&a.logits, &b.logits));
            for (i, (x, y)) in a.exit_logits.iter().zip(&b.exit_logits).enumerate() {
                assert!(max_abs(x, y) <= 1e-5, "{name} {pass:?} exit {i}");
            }
            assert_eq!(a.exit_index, b.exit_index, "{name} {pass:?} exit index");
        }
    }
}
