//! End-to-end tests of the `dynrobust` binary: JSON output, checkpoints written by `train`,
//! and clear errors for bad input.

use std::process::{Command, Output};

fn dynrobust(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dynrobust")).args(args).env_remove("LD_LIBRARY_PATH").output().expect("run dynrobust")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn eval_json_prints_one_object_with_the_schema_fields() {
    let out = dynrobust(&["eval", "--model", "sdn", "--n", "200", "--no-latency", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.trim().lines().count(), 1, "exactly one JSON line: {stdout}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    for field in ["model", "data", "n", "accuracy", "mean_cost", "static_macs", "exit_histogram", "family"] {
        assert!(v.get(field).is_some(), "field {field} missing in {v}");
    }
    assert_eq!(v["n"], 200);
    assert_eq!(v["static_macs"], 5_074_368);
    let hist: Vec<i64> = serde_json::from_value(v["exit_histogram"].clone()).unwrap();
    assert_eq!(hist.len(), 7);
    assert_eq!(hist.iter().sum::<i64>(), 200);
    let cost = v["mean_cost"].as_f64().unwrap();
    assert!(cost > 0.0 && cost < 1.1);
}

#[test]
fn eval_twin_costs_exactly_one() {
    let out = dynrobust(&["eval", "--model", "gated", "--n", "100", "--no-latency", "--twin", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["mean_cost"].as_f64().unwrap(), 1.0);
    assert_eq!(v["model"], "gated(twin)");
}

#[test]
fn eval_reports_latency_at_batch_1_and_128() {
    let out = dynrobust(&["eval", "--model", "gated", "--n", "256", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["latency_ms_per_image_batch1"].as_f64().unwrap() > 0.0);
    assert!(v["latency_ms_per_image_batch128"].as_f64().unwrap() > 0.0);
}

#[test]
fn unknown_model_is_refused_naming_the_choices() {
    let out = dynrobust(&["eval", "--model", "nosuchmodel", "--n", "10"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("nosuchmodel") && err.contains("static, sdn, gated, skipnet"), "{err}");
}

#[test]
fn missing_data_directory_says_how_to_install() {
    let out = dynrobust(&["eval", "--model", "static", "--data-dir", "/nonexistent/fmnist", "--n", "10"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("/nonexistent/fmnist") && err.contains("make data"), "{err}");
}

#[test]
fn threshold_on_a_gated_model_is_refused() {
    let out = dynrobust(&["eval", "--model", "gated", "--threshold", "0.5", "--n", "10"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("threshold"), "{}", stderr(&out));
}

#[test]
fn train_writes_a_checkpoint_with_its_sidecar() {
    let dir = std::env::temp_dir().join(format!("dynrobust-cli-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dynrobust(&[
        "train", "--model", "gated", "--train-samples", "256", "--eval-samples", "128", "--epochs", "1", "--seed", "3",
        "--out", dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(dir.join("model.safetensors").is_file());
    let side: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("model.json")).unwrap()).unwrap();
    assert_eq!(side["architecture"]["mechanism"]["kind"], "gated");
    assert_eq!(side["training"]["seed"], 3);
    assert_eq!(side["training"]["train_samples"], 256);
    assert_eq!(side["evaluation"]["n"], 128);
    assert_eq!(side["evaluation"]["gate_rates"].as_array().unwrap().len(), 6);
    // the new checkpoint loads and evaluates
    let out = dynrobust(&["eval", "--model", dir.to_str().unwrap(), "--n", "64", "--no-latency", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn info_lists_units_with_macs() {
    let out = dynrobust(&["info", "--model", "skipnet"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("static MACs 5074368"), "{text}");
    assert!(text.contains("gate5") && text.contains("block2.shortcut"), "{text}");
}
