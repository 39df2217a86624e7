//! End-to-end tests of the `dynrobust` binary: JSON output, checkpoints written by `train`,
//! and clear errors for bad input.

use std::process::{Command, Output};

fn dynrobust(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dynrobust")).args(args).env_remove("LD_LIBRARY_PATH").output().expect("run dynrobust")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The source `dynrobust --version` names: `(commit X)` → X.
fn build_source() -> String {
    let out = dynrobust(&["--version"]);
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    line.split("(commit ").nth(1).and_then(|rest| rest.strip_suffix(')')).unwrap_or_else(|| panic!("no commit in {line:?}")).to_string()
}

/// `git` in the workspace root: its stdout, if it succeeds.
fn git(args: &[&str]) -> Option<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new("git").args(args).current_dir(root).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn version_names_the_commit_and_marks_a_build_from_uncommitted_sources() {
    let source = build_source();
    let Some(head) = git(&["rev-parse", "--short=12", "HEAD"]).map(|h| h.trim().to_string()) else {
        return assert_eq!(source, "unknown", "outside a git checkout");
    };
    // what goes into the binary (build-support/rpath.rs): every workspace member's sources and
    // manifest, the build set-up; untracked files only when they are Rust or TOML. The tree is
    // as it was built.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let manifest: toml::Table = std::fs::read_to_string(root.join("Cargo.toml")).unwrap().parse().unwrap();
    let members: Vec<&str> = manifest["workspace"]["members"].as_array().unwrap().iter().map(|m| m.as_str().unwrap()).collect();
    assert!(members.contains(&"cli") && members.contains(&"core"), "{members:?}");
    let mut args = vec!["--no-optional-locks", "status", "--porcelain", "-z", "--no-renames", "--untracked-files=all", "--", "Cargo.toml", "Cargo.lock", "build-support", ".cargo/config.toml"];
    let crates: Vec<[String; 2]> = members.iter().map(|c| [format!("{c}/src"), format!("{c}/Cargo.toml")]).collect();
    args.extend(crates.iter().flatten().map(String::as_str));
    let status = git(&args).expect("git status");
    let dirty = status.split('\0').filter(|e| e.len() > 3).any(|e| !e.starts_with("??") || e.ends_with(".rs") || e.ends_with(".toml"));
    match source.strip_prefix(&head) {
        Some("") => assert!(!dirty, "a build from uncommitted sources must say so: {source}"),
        Some(mark) => {
            assert!(dirty, "a clean tree is marked {mark}");
            let digits = mark.strip_prefix("+dirty.").unwrap_or_else(|| panic!("mark {mark:?}"));
            assert!(digits.len() == 8 && digits.chars().all(|c| c.is_ascii_hexdigit()), "{mark}");
        }
        None => panic!("built from {source}, HEAD is {head}"),
    }
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
fn eval_calibrates_the_sdn_threshold_and_evaluates_at_it() {
    let out = dynrobust(&["eval", "--model", "sdn", "--n", "300", "--no-latency", "--json", "--calibrate-rad", "15", "--calibrate-on", "test"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let c = &v["calibration"];
    assert_eq!(c["rad_percent"], 15.0);
    assert_eq!(c["n"], 300);
    assert_eq!(c["sweep"].as_array().unwrap().len(), 19);
    let q = c["chosen"].as_f64().expect("a threshold within 15 % of the final head");
    assert_eq!(v["threshold"].as_f64().unwrap(), q);
    // calibrated on the evaluated images: the evaluation is the sweep's point at q
    let point = c["sweep"].as_array().unwrap().iter().find(|p| p["threshold"].as_f64() == Some(q)).unwrap();
    assert_eq!(point["accuracy"], v["accuracy"]);
    assert_eq!(point["mean_cost"], v["mean_cost"]);
    assert!(stderr(&out).contains("← chosen"));
    // its options need --calibrate-rad
    let out = dynrobust(&["eval", "--model", "sdn", "--n", "10", "--calibrate-on", "test"]);
    assert!(!out.status.success() && stderr(&out).contains("--calibrate-rad"), "{}", stderr(&out));
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
    assert_eq!(side["training"]["source_commit"].as_str(), Some(build_source().as_str()), "the sidecar names the binary's source");
    // the new checkpoint loads and evaluates
    let out = dynrobust(&["eval", "--model", dir.to_str().unwrap(), "--n", "64", "--no-latency", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_k_shot_surrogate_trains_from_scratch_with_enough_steps() {
    // --per-class 2: 20 images; it must not start from the committed static (trained on all
    // 60,000), and the default schedule stretches to at least 300 optimiser steps
    let dir = std::env::temp_dir().join(format!("dynrobust-cli-kshot-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dynrobust(&["train", "--model", "gated", "--per-class", "2", "--eval-samples", "64", "--out", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let side: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("model.json")).unwrap()).unwrap();
    assert_eq!(side["training"]["train_samples"], 20);
    assert!(side["training"]["init_from"].is_null(), "a k-shot surrogate inherited weights: {}", side["training"]);
    assert_eq!(side["training"]["epochs"], 300, "one step per epoch at batch 128: 300 epochs");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn info_lists_units_with_macs() {
    let out = dynrobust(&["info", "--model", "skipnet"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("static MACs 5074368"), "{text}");
    assert!(text.contains("gate5") && text.contains("block2.shortcut"), "{text}");
    assert!(text.contains("gated (5 recurrent (SkipNet) gates)") && text.contains("trained on fashion-mnist/train"), "in words, not Rust's Debug: {text}");
}

#[test]
fn attack_json_has_the_schema_fields_and_saves_examples() {
    let dir = std::env::temp_dir().join(format!("dynrobust-cli-attack-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dynrobust(&["attack", "--model", "sdn", "--attack", "deepsloth", "--eps", "8/255", "--n", "32", "--json", "--save-examples", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.trim().lines().count(), 1, "one JSON object: {stdout}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    for field in ["model", "attack", "eps", "norm", "n", "clean_acc", "adv_acc", "clean_cost", "adv_cost", "recovery", "l2_mean", "linf_max", "mse", "seconds"] {
        assert!(v.get(field).is_some(), "field {field} missing in {v}");
    }
    assert_eq!(v["n"], 32);
    assert_eq!(v["data"], "fashion-mnist/test", "the images it was measured on");
    assert_eq!(v["iterations"], 30, "DeepSloth's default 30 iterations (its config leaves `steps` unset)");
    assert!((v["eps"].as_f64().unwrap() - 8.0 / 255.0).abs() < 1e-12);
    assert!(v["linf_max"].as_f64().unwrap() <= 8.0 / 255.0 + 1e-6);
    assert!(v["adv_cost"].as_f64().unwrap() > v["clean_cost"].as_f64().unwrap(), "DeepSloth raises cost: {v}");
    for f in ["examples.png", "x_adv.npy", "x_clean.npy", "y.npy"] {
        assert!(dir.join(f).is_file(), "{f} written");
    }
    let labels = tch::Tensor::read_npy(dir.join("y.npy")).unwrap();
    assert_eq!(labels.size(), [32], "one label per image");
    let png = std::fs::read(dir.join("examples.png")).unwrap();
    assert_eq!(&png[..4], b"\x89PNG");
}

#[test]
fn attack_errors_name_the_problem() {
    let out = dynrobust(&["attack", "--model", "static", "--attack", "deepsloth", "--n", "8"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("deepsloth") && err.contains("exits") && err.contains("static"), "{err}");

    let out = dynrobust(&["attack", "--model", "static", "--attack", "pgd-linf", "--set", "bogus=1", "--n", "8"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("bogus"), "{}", stderr(&out));

    let out = dynrobust(&["attack", "--model", "static", "--attack", "pgd-linf", "--eps=-1", "--n", "8"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("eps"), "{}", stderr(&out));

    let out = dynrobust(&["attack", "--model", "static", "--attack", "nosuch", "--n", "8"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("nosuch") && err.contains("gradmdm") && err.contains("deepsloth"), "{err}");

    let out = dynrobust(&["attack", "--model", "static", "--attack", "pgd-linf", "--steps", "0", "--n", "8"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("steps"), "{}", stderr(&out));

    for batch in ["0", "-3"] {
        let out = dynrobust(&["attack", "--model", "static", "--attack", "fgsm", "--n", "4", &format!("--batch={batch}")]);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(err.contains("batch") && err.contains("expected ≥ 1") && !err.contains("panicked"), "{err}");
    }

    let out = dynrobust(&["attack", "--model", "static", "--attack", "fgsm", "--n", "20000"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--n 20000") && stderr(&out).contains("only 10000 images"), "{}", stderr(&out));
}

#[test]
fn list_attacks_prints_every_attack_with_a_description() {
    let out = dynrobust(&["list", "attacks"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for name in ["deepsloth", "deepsloth-l2", "deepsloth-universal", "gradmdm", "gradauto", "ilfo", "fgsm", "pgd-linf", "pgd-l2", "mi-fgsm", "feature-pgd", "mechanism", "mechanism-stealthy"] {
        assert!(text.lines().any(|l| l.starts_with(name) && l.len() > name.len() + 20), "{name} listed with a description");
    }
}

#[test]
fn committed_models_are_found_in_the_checkout_the_binary_runs_in() {
    // one build serving several clones (a shared CARGO_TARGET_DIR): run inside a clone, the
    // binary must read that clone's checkpoints, not those of the clone it was built in
    let clone = tempfile::tempdir().unwrap();
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("models/checkpoints/static");
    let only_here = clone.path().join("models/checkpoints/static-only-in-this-clone");
    std::fs::create_dir_all(&only_here).unwrap();
    for file in ["model.safetensors", "model.json"] {
        std::fs::copy(here.join(file), only_here.join(file)).unwrap();
    }
    std::fs::write(clone.path().join("Cargo.toml"), "[workspace]\n").unwrap();
    let run_in = |dir: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_dynrobust"))
            .args(["info", "--model", "static-only-in-this-clone"])
            .current_dir(dir)
            .env_remove("DYNROBUST_HOME")
            .output()
            .expect("run dynrobust")
    };
    let inside = run_in(&clone.path().join("models"));
    assert!(inside.status.success(), "{}", stderr(&inside));
    assert!(String::from_utf8_lossy(&inside.stdout).contains("static MACs 5074368"));
    let elsewhere = tempfile::tempdir().unwrap();
    let outside = run_in(elsewhere.path());
    assert!(!outside.status.success(), "found a checkpoint that only the other clone has");
    assert!(stderr(&outside).contains("static-only-in-this-clone"), "{}", stderr(&outside));
}

#[test]
fn a_training_time_defense_is_evaluated_on_its_checkpoint() {
    // `--defense pgd-at` must attack the adversarially trained checkpoint (adaptive), or craft
    // on the bare model and evaluate the checkpoint (oblivious) — never the bare model alone
    let json_of = |args: &[&str]| {
        let mut all = vec!["attack", "--attack", "fgsm", "--n", "128", "--json"];
        all.extend_from_slice(args);
        let out = dynrobust(&all);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let defended = json_of(&["--model", "gated", "--defense", "pgd-at", "--defense-set", "checkpoint=gated-pgd-at"]);
    let direct = json_of(&["--model", concat!(env!("CARGO_MANIFEST_DIR"), "/../models/checkpoints/gated-pgd-at")]);
    let bare = json_of(&["--model", "gated"]);
    for key in ["clean_acc", "clean_cost", "adv_acc", "adv_cost"] {
        assert_eq!(defended[key], direct[key], "{key}: defended run = the checkpoint attacked directly");
    }
    assert_ne!(defended["clean_cost"], bare["clean_cost"], "the bare model was evaluated");
    let oblivious = json_of(&["--model", "gated", "--defense", "pgd-at", "--defense-set", "checkpoint=gated-pgd-at", "--oblivious"]);
    assert_eq!(oblivious["defense_mode"], "oblivious");
    assert_eq!(oblivious["data"], "fashion-mnist/test", "a defended record names its images too");
    assert_eq!(oblivious["clean_acc"], direct["clean_acc"], "evaluated on the checkpoint");
    assert_ne!(oblivious["adv_acc"], direct["adv_acc"], "crafted on the bare model, not on the checkpoint");
    // every defended record names the model as the undefended one does; the defense has its own fields
    for (defense, label) in [("bitdepth", "bitdepth(b=4)"), ("budget", "budget(3)")] {
        let record = json_of(&["--model", "gated", "--defense", defense]);
        assert_eq!((record["model"].as_str(), record["defense_label"].as_str()), (Some("gated"), Some(label)), "{defense}: {record}");
    }
    assert_eq!(defended["model"], "gated");
}

#[test]
fn defend_with_a_backbone_trains_the_sdns_classifiers_on_the_static_checkpoints_weights() {
    // DeepSloth's two stages: the committed adversarially trained static net as the backbone,
    // then IC-only training on it — the written backbone is that checkpoint's, bit for bit
    let out_dir = std::env::temp_dir().join(format!("dynrobust-test-{}-backbone", std::process::id()));
    let _ = std::fs::remove_dir_all(&out_dir);
    let out = dynrobust(&["defend", "--model", "sdn", "--recipe", "pgd-at", "--backbone", "static-pgd-at", "--per-class", "3", "--epochs", "1", "--eval-samples", "20", "--attack-set", "steps=2", "--out", out_dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let read = |p: std::path::PathBuf| -> std::collections::HashMap<String, tch::Tensor> { tch::Tensor::read_safetensors(p).unwrap().into_iter().collect() };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("models/checkpoints");
    let (written, backbone, sdn) = (read(out_dir.join("model.safetensors")), read(root.join("static-pgd-at/model.safetensors")), read(root.join("sdn/model.safetensors")));
    assert_eq!(written.len(), sdn.len());
    for (name, t) in &written {
        match backbone.get(name) {
            Some(b) => assert!(t.equal(b), "{name} is not the backbone's"),
            None => assert!(name.starts_with("exits."), "{name} is neither the backbone's nor an internal classifier's"),
        }
    }
    assert!(written.iter().any(|(n, t)| n.starts_with("exits.") && !t.equal(&sdn[n])), "the internal classifiers were not trained");
    let sidecar: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out_dir.join("model.json")).unwrap()).unwrap();
    assert!(sidecar["training"]["init_from"].as_str().unwrap().contains("backbone and final head from models/checkpoints/static-pgd-at"), "{}", sidecar["training"]);
    let _ = std::fs::remove_dir_all(&out_dir);
    // refused: a backbone that is not a static net, and a model without exits
    for (model, backbone, expect) in [("sdn", "gated", "expected a static checkpoint"), ("gated", "static-pgd-at", "applies to an SDN")] {
        let out = dynrobust(&["defend", "--model", model, "--recipe", "pgd-at", "--backbone", backbone, "--per-class", "1", "--out", "/tmp/never-written"]);
        assert!(!out.status.success() && stderr(&out).contains(expect), "{model} + {backbone}: {}", stderr(&out));
    }
}

/// Study mistakes read as their place in the file; `--dry-run` refuses a directory holding
/// another study as the run would; a cause the message already quotes is said once.
#[test]
fn study_mistakes_and_dry_runs_say_what_the_run_would() {
    let tmp = tempfile::tempdir().unwrap();
    let study = |name: &str, text: &str| {
        let path = tmp.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let missing = study("missing.toml", "name = \"t\"\nn = 8\nmodels = [\"static\"]\n[[attacks]]\nname = \"fgsm\"\n");
    let err = stderr(&dynrobust(&["run", &missing, "--dry-run"]));
    assert!(err.contains(&format!("{missing}:1:1: missing field `data`")) && !err.contains("(in `"), "{err}");
    let one = "name = \"t\"\ndata = \"fashion-mnist\"\nn = 8\nmodels = [\"static\"]\n[[attacks]]\nname = \"fgsm\"\n";
    let other = study("other.toml", &one.replace("n = 8", "n = 9"));
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("study.toml"), one).unwrap();
    let dry = |extra: &[&str]| {
        let mut args = vec!["run", other.as_str(), "--out", out.to_str().unwrap(), "--dry-run"];
        args.extend_from_slice(extra);
        dynrobust(&args)
    };
    let refused = dry(&[]);
    let err = stderr(&refused);
    assert!(!refused.status.success() && err.contains("the run would stop") && err.contains("they differ in: `n` (8 → 9)"), "{err}");
    assert!(dry(&["--force"]).status.success(), "--force replaces the copy, so the run would go on");
    let gone = tmp.path().join("gone");
    let err = stderr(&dynrobust(&["report", gone.to_str().unwrap()]));
    assert_eq!(err.matches("no cells/ directory").count(), 1, "said once: {err}");
}

/// `list attacks NAME` prints the attack's settings with their defaults, each after what it
/// means (and a named-value setting's values); a defense with a required setting lists it; a
/// near-miss name is answered with the right one.
#[test]
fn list_names_a_plugins_settings_with_their_defaults() {
    let out = dynrobust(&["list", "attacks", "pgd-linf"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("steps = 20\n") && text.contains("norm = \"linf\"\n") && text.contains("step_size = 0.0039"), "the step size in force: {text}");
    let out = dynrobust(&["list", "attacks", "gradauto"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("iterations = 300\n") && text.contains("# eps: unset (optional)"), "{text}");
    let out = dynrobust(&["list", "defenses", "bitdepth"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("bits = "), "{}", stderr(&out));
    let out = dynrobust(&["list", "attacks", "gradmdm"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("# Adam iterations.\niterations = 100\n"), "the doc comment above its setting: {text}");
    assert!(text.contains("\n# one of: \"faithful\" (as the authors' code does it, quirks included); \"fixed\" (the authors'"), "mode's values: {text}");
    assert!(text.contains("with --set KEY=VALUE"), "{text}");
    let out = dynrobust(&["list", "defenses", "pgd-at"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("# checkpoint: required (no default)") && text.contains("with --defense-set KEY=VALUE"), "{text}");
    let out = dynrobust(&["list", "attacks", "pgd-lnif"]);
    assert!(!out.status.success() && stderr(&out).contains("did you mean `pgd-linf`?"), "{}", stderr(&out));
}

#[test]
fn set_takes_eps_as_a_fraction_as_eps_does() {
    let eps_of = |args: &[&str]| {
        let mut all = vec!["attack", "--model", "static", "--attack", "fgsm", "--n", "8", "--json"];
        all.extend_from_slice(args);
        let out = dynrobust(&all);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["eps"].as_f64().unwrap()
    };
    assert_eq!(eps_of(&["--set", "eps=4/255"]), 4.0 / 255.0);
    assert_eq!(eps_of(&["--eps", "4/255"]), 4.0 / 255.0);
}

/// Refused before any work, naming the option: an output path under a regular file, a
/// thread count below 1, option values that would give broken results, an option given twice.
#[test]
fn bad_options_are_refused_at_once_naming_the_option() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("afile");
    std::fs::write(&file, "x").unwrap();
    let under_file = file.join("sub");
    let under = under_file.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["train", "--model", "static", "--train-samples", "64", "--eval-samples", "16", "--epochs", "1", "--out", under], "--out"),
        (vec!["attack", "--model", "gated", "--attack", "fgsm", "--n", "8", "--save-examples", under, "--json"], "--save-examples"),
        (vec!["train-denoiser", "--train-samples", "16", "--epochs", "1", "--out", under], "--out"),
        (vec!["train", "--model", "static", "--threads", "0", "--out", under], "--threads 0"),
        (vec!["train", "--model", "static", "--train-samples", "0", "--out", under], "--train-samples 0"),
        (vec!["train-denoiser", "--noise-sigma", "nan", "--out", under], "--noise-sigma"),
        (vec!["train-denoiser", "--epochs", "0", "--out", under], "--epochs 0"),
        (vec!["train-denoiser", "--attack-set", "steps=3", "--out", under], "--attack-set without --attack"),
        (vec!["eval", "--model", "sdn", "--threshold", "1.5", "--n", "8"], "0 < q ≤ 1"),
        (vec!["attack", "--model", "static", "--attack", "pgd-linf", "--eps", "0.1", "--set", "eps=0.2", "--n", "8"], "both given"),
        (vec!["attack", "--model", "static", "--attack", "pgd-linf", "--set", "steps=3", "--set", "steps=4", "--n", "8"], "given twice"),
        (vec!["attack", "--model", "static", "--attack", "fgsm", "--defense-set", "bits=4", "--n", "8"], "--defense-set without --defense"),
        (vec!["attack", "--model", "sdn", "--attack", "deepsloth", "--set", "variant=\"universal\"", "--n", "8"], "variant"),
        (vec!["attack", "--model", "static", "--attack", "apgd-t", "--set", "targets=0", "--n", "8"], "targeted attack: expected targets ≥ 1"),
        (vec!["attack", "--model", "static", "--attack", "fgsm", "--eps", "8", "--n", "8"], "L∞ budget above 1"),
        (vec!["attack", "--model", "static", "--attack", "fgsm", "--defense", "none", "--oblivious", "--n", "8"], "no defense to be oblivious of"),
        (vec!["train", "--model", "static", "--threshold", "0.5", "--out", under], "--threshold applies to --model sdn"),
        (vec!["train", "--model", "sdn", "--target-rate", "0.5", "--out", under], "--target-rate applies"),
        (vec!["train", "--model", "sdn", "--init", "gated", "--train-samples", "32", "--out", under], "a gated checkpoint"),
        (vec!["eval", "--model", "sdn", "--calibrate-rad", "5", "--calibrate-on", "test", "--calibrate-n", "50", "--n", "8"], "--calibrate-n with --calibrate-on test"),
        (vec!["bench", "sparse", "--reps", "0"], "--reps 0"),
        (vec!["eval", "--model", "gated", "--calibrate-rad", "5", "--n", "8", "--no-latency"], "--calibrate-rad sets an early-exit model's threshold; `gated` is gated"),
        (vec!["attack", "--model", "static", "--attack", "fgsm", "--eps", "-0.1", "--n", "8"], "expected a finite value ≥ 0"),
        (vec!["attack", "--model", "static", "--attack", "fgsm", "--n", "-5"], "--n -5: expected ≥ 1"),
        (vec!["attack", "--model", "static", "--attack", "ensemble", "--steps", "3", "--n", "8"], "--steps does not apply to `ensemble`: it has no `steps` setting"),
        (vec!["attack", "--model", "static", "--attack", "square", "--loss", "avg", "--n", "8"], "--loss does not apply to `square`"),
        (vec!["eval", "--model", "sdn", "--calibrate-rad", "5", "--twin", "--n", "8", "--no-latency"], "--twin evaluates `sdn` with no early exit"),
        (vec!["attack", "--model", "static", "--attack", "pgd-linf", "--steps", "-2", "--n", "8"], "invalid value '-2' for '--steps <STEPS>'"),
        (vec!["attack", "--model", "static", "--attack", "fgsm", "--eps", "8/0", "--n", "8"], "`8/0` divides by zero"),
        (vec!["attack", "--model", "static", "--attack", "fgsm", "--set", "eps=8/0", "--n", "8"], "--set eps=8/0: `8/0` divides by zero"),
        (vec!["attack", "--model", "static", "--attack", "fgsm", "--norm", "l2", "--n", "8"], "FGSM is the L∞ step"),
        (vec!["attack", "--model", "static", "--attack", "pgd-l2", "--norm", "linf", "--n", "8"], "`pgd-l2`'s name sets the norm"),
    ];
    for (args, says) in cases {
        let t0 = std::time::Instant::now();
        let out = dynrobust(&args);
        let err = stderr(&out);
        assert!(!out.status.success() && err.contains(says), "{args:?}: expected `{says}` in: {err}");
        assert!(!err.contains("panicked") && !err.contains("Exception raised"), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}: nothing on stdout");
        // refused before training or attacking: a few seconds at most even on a slow machine
        assert!(t0.elapsed().as_secs() < 60, "{args:?}: refused only after {:?}", t0.elapsed());
    }
}

/// A data set whose labels do not fit the model (11 class folders on a 10-class net) is refused
/// by name in `eval` and `attack`, not failed inside libtorch's cross-entropy.
#[test]
fn labels_beyond_the_models_classes_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for class in 0..11 {
        let dir = tmp.path().join(format!("c{class:02}"));
        std::fs::create_dir_all(&dir).unwrap();
        image::GrayImage::from_fn(28, 28, |x, _| image::Luma([(x * 9) as u8 ^ class as u8])).save(dir.join("0.png")).unwrap();
    }
    let spec = format!("folder:{}", tmp.path().display());
    // a checkpoint directory the user names by its path: the error names that path too
    let mine = tempfile::tempdir().unwrap();
    let my_gated = mine.path().join("my-gated");
    std::fs::create_dir_all(&my_gated).unwrap();
    for file in ["model.safetensors", "model.json"] {
        std::fs::copy(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/checkpoints/gated").join(file), my_gated.join(file)).unwrap();
    }
    let my_gated = my_gated.to_str().unwrap();
    for (cmd, named) in [
        (vec!["eval", "--model", "static", "--data", &spec, "--no-latency"], "static"),
        (vec!["attack", "--model", "static", "--attack", "pgd-linf", "--steps", "2", "--n", "11", "--data", &spec], "static"),
        (vec!["eval", "--model", my_gated, "--data", &spec, "--no-latency"], my_gated),
        (vec!["attack", "--model", my_gated, "--attack", "pgd-linf", "--steps", "2", "--n", "11", "--data", &spec], my_gated),
    ] {
        let out = dynrobust(&cmd);
        let err = stderr(&out);
        assert!(!out.status.success() && err.contains("label 10") && err.contains("10 classes"), "{cmd:?}: {err}");
        assert!(err.contains(&format!("model {named}")), "{cmd:?}: the error does not name `{named}`: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// A training-time defense's checkpoint must be of the attacked model's family and made by
/// that recipe, or another model would be attacked under the defense's name.
#[test]
fn a_training_time_defense_checkpoint_of_another_model_is_refused() {
    let args = |ckpt: &str| vec!["attack".to_string(), "--model".into(), "gated".into(), "--attack".into(), "fgsm".into(), "--n".into(), "8".into(), "--defense".into(), "pgd-at".into(), "--defense-set".into(), format!("checkpoint={ckpt}")];
    for (ckpt, says) in [("sdn-pgd-at", "family is early-exit"), ("gated", "not a `pgd-at` checkpoint")] {
        let a = args(ckpt);
        let out = dynrobust(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(!out.status.success() && stderr(&out).contains(says), "{ckpt}: {}", stderr(&out));
    }
}

/// A command refused after it has made its output directory removes it again (it was empty);
/// the checks a command can make before loading anything come before the directory.
#[test]
fn refused_commands_leave_no_output_directory_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let study = tmp.path().join("s.toml");
    std::fs::write(&study, "name = \"t\"\ndata = \"fashion-mnist\"\nn = 8\nmodels = [\"static\"]\n[[attacks]]\nname = \"fgsm\"\n").unwrap();
    let out = tmp.path().join("new/deeper");
    let out_arg = out.to_str().unwrap();
    let study_arg = study.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["defend", "--model", "static", "--recipe", "gate-consistency", "--out", out_arg], "`gate-consistency` does not apply to a `static` model"),
        (vec!["defend", "--model", "static", "--recipe", "pgd-at", "--attack", "deepslooth", "--out", out_arg], "did you mean `deepsloth`?"),
        (vec!["run", study_arg, "--workers", "0", "--out", out_arg], "--workers 0"),
        (vec!["slurm", study_arg, "--tasks", "0", "--out", out_arg], "`tasks`"),
        (vec!["slurm", study_arg, "--tasks", "1", "--time", "2h", "--out", out_arg], "`time`"),
        (vec!["attack", "--model", "static", "--attack", "fgsm", "--n", "8", "--set", "steps=2", "--save-examples", out_arg], "FGSM is one step"),
    ];
    for (args, expected) in cases {
        let output = dynrobust(&args);
        assert!(!output.status.success() && stderr(&output).contains(expected), "{args:?}: {}", stderr(&output));
        assert!(!tmp.path().join("new").exists(), "{args:?} left {} behind", tmp.path().join("new").display());
    }
    // a command that succeeds keeps its output directory, even one it leaves empty: the Slurm
    // tasks write their logs into OUT while the script lives elsewhere
    let script = tmp.path().join("job.sh");
    let output = dynrobust(&["slurm", study_arg, "--tasks", "1", "--out", out_arg, "--script", script.to_str().unwrap()]);
    assert!(output.status.success() && script.is_file() && out.is_dir(), "{}", stderr(&output));
}

/// `train`, `defend` and `train-denoiser` do not write over a checkpoint (without --out,
/// `train` and `train-denoiser` would replace a committed one), nor `attack --save-examples`
/// over saved examples, unless told to with --force.
#[test]
fn checkpoints_are_not_overwritten_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let taken = tmp.path().join("taken");
    std::fs::create_dir_all(&taken).unwrap();
    std::fs::write(taken.join("model.json"), "{}").unwrap();
    std::fs::write(taken.join("denoiser.json"), "{}").unwrap();
    let taken_arg = taken.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        // each also has a value refused after the overwrite check, so a regression fails
        // loudly here instead of replacing a committed checkpoint
        (vec!["train", "--model", "static", "--per-class", "1", "--epochs", "0"], "one of the committed ones"),
        (vec!["train-denoiser", "--train-samples", "0"], "one of the committed ones"),
        (vec!["train", "--model", "static", "--per-class", "1", "--epochs", "0", "--out", taken_arg], "already holds a checkpoint (model.json); pass --force"),
        (vec!["defend", "--model", "static", "--recipe", "pgd-at", "--epochs", "0", "--out", taken_arg], "already holds a checkpoint (model.json); pass --force"),
        (vec!["train-denoiser", "--train-samples", "0", "--out", taken_arg], "already holds a checkpoint (denoiser.json); pass --force"),
    ];
    for (args, expected) in cases {
        let output = dynrobust(&args);
        assert!(!output.status.success() && stderr(&output).contains(expected), "{args:?}: {}", stderr(&output));
    }
    assert_eq!(std::fs::read_to_string(taken.join("model.json")).unwrap(), "{}", "left as it was");
    // saved examples likewise
    std::fs::write(taken.join("x_adv.npy"), "x").unwrap();
    let out = dynrobust(&["attack", "--model", "static", "--attack", "fgsm", "--n", "8", "--save-examples", taken_arg]);
    assert!(!out.status.success() && stderr(&out).contains("already holds saved examples (x_adv.npy); pass --force"), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(taken.join("x_adv.npy")).unwrap(), "x", "left as it was");
    let out = dynrobust(&["attack", "--model", "static", "--attack", "fgsm", "--n", "8", "--save-examples", taken_arg, "--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_ne!(std::fs::read(taken.join("x_adv.npy")).unwrap(), b"x", "--force replaces them");
    let out = dynrobust(&["train", "--model", "static", "--train-samples", "32", "--eval-samples", "16", "--epochs", "1", "--out", taken_arg, "--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_ne!(std::fs::read_to_string(taken.join("model.json")).unwrap(), "{}", "--force replaces it");
}
