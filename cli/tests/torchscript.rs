//! A TorchScript model runs through `dynrobust attack` and `dynrobust run` exactly like a
//! native one: the committed `sdn`, exported with the same weights by
//! `examples/torchscript/export_native.py`, gives the same attack record (accuracy, cost,
//! exits, perturbation) natively and through the adapter, in both commands. The native net
//! runs with its batch norms folded into the convolutions and the export with conv → BN, so
//! the perturbation norms agree to float rounding (relative 1e-4) and everything else exactly.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn dynrobust(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dynrobust")).args(args).env_remove("LD_LIBRARY_PATH").output().expect("run dynrobust")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn export_native(out: &std::path::Path) -> PathBuf {
    let status = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("examples/torchscript/export_native.py"))
        .args(["--out", out.to_str().unwrap(), "--models", "sdn"])
        .status()
        .expect("the project's venv python (make setup)");
    assert!(status.success());
    out.join("sdn.pt")
}

const SAME: [&str; 9] = ["n", "clean_acc", "adv_acc", "clean_cost", "adv_cost", "recovery", "l2_mean", "linf_max", "adv_exit_hist"];

/// Exact agreement, except the perturbation norms: to float rounding.
fn assert_same(what: &str, key: &str, native: &Value, scripted: &Value) {
    if matches!(key, "l2_mean" | "linf_max") {
        let (a, b) = (native[key].as_f64().unwrap(), scripted[key].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-4 * a.abs().max(b.abs()), "{what} {key}: native {a} vs scripted {b}");
    } else {
        assert_eq!(native[key], scripted[key], "{what} {key}: native {} vs scripted {}", native[key], scripted[key]);
    }
}

#[test]
fn attack_on_the_scripted_sdn_equals_attack_on_the_native_one() {
    let tmp = tempfile::tempdir().unwrap();
    let script = export_native(tmp.path());
    let run = |model: &str| -> Value {
        let out = dynrobust(&["attack", "--model", model, "--attack", "deepsloth", "--eps", "8/255", "--steps", "5", "--n", "48", "--json"]);
        assert!(out.status.success(), "{model}: {}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let (native, scripted) = (run("sdn"), run(script.to_str().unwrap()));
    for key in SAME {
        assert_same("attack", key, &native, &scripted);
    }
    assert!(scripted["adv_cost"].as_f64().unwrap() > scripted["clean_cost"].as_f64().unwrap());
}

#[test]
fn a_study_runs_the_scripted_model_like_the_native_one() {
    let tmp = tempfile::tempdir().unwrap();
    let script = export_native(tmp.path());
    let study = tmp.path().join("ts.toml");
    std::fs::write(
        &study,
        format!(
            "name = \"ts\"\ndata = \"fashion-mnist\"\nn = 32\nbatch = 32\nseeds = [0]\neps = [\"8/255\"]\nmodels = [\"sdn\", \"{}\"]\n\n[[attacks]]\nname = \"deepsloth\"\nparams = {{ steps = 4 }}\n\n[[defenses]]\nname = \"none\"\n\n[[defenses]]\nname = \"bitdepth\"\nparams = {{ bits = 4 }}\n",
            script.display()
        ),
    )
    .unwrap();
    let out_dir = tmp.path().join("out");
    let out = dynrobust(&["run", study.to_str().unwrap(), "--out", out_dir.to_str().unwrap(), "--workers", "1", "--no-report"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let records: Vec<Value> = std::fs::read_dir(out_dir.join("cells"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| serde_json::from_str::<Value>(&std::fs::read_to_string(p).unwrap()).unwrap())
        .map(|v| v.get("record").cloned().unwrap_or(v))
        .collect();
    assert_eq!(records.len(), 4, "2 models × 2 defenses");
    for defense in ["none", "bitdepth"] {
        let pick = |native: bool| {
            records
                .iter()
                .find(|r| r["defense"] == defense && (r["model"] == "sdn") == native)
                .unwrap_or_else(|| panic!("no {defense} cell (native {native}) in {records:?}"))
        };
        let (native, scripted) = (pick(true), pick(false));
        for key in SAME {
            assert_same(defense, key, native, scripted);
        }
    }
}
