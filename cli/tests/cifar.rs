//! CIFAR-shaped models end to end: a gated ResNet-20-layout model trains for one epoch on a
//! generated CIFAR-10-binary fixture, its checkpoint says 3×32×32, and an energy attack runs on
//! it; an ImageFolder fixture trains an SDN the same way. Also `--device`: asking for CUDA on
//! a machine without one fails at once. And MNIST from its CSV files (`--data mnist`).

use std::path::Path;
use std::process::{Command, Output};

fn dynrobust(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dynrobust")).args(args).env_remove("LD_LIBRARY_PATH").output().expect("run dynrobust")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `records` CIFAR-10 binary records whose class is visible in the image (a bright square
/// whose position depends on the label, on noise), so one epoch learns something.
fn cifar_records(records: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut out = Vec::with_capacity(records * 3073);
    for r in 0..records {
        let label = (r % 10) as u8;
        out.push(label);
        let (row0, col0) = (3 * (label as usize / 5) * 5, 3 * (label as usize % 5) + 4);
        for _channel in 0..3 {
            for y in 0..32 {
                for x in 0..32 {
                    let inside = (row0..row0 + 8).contains(&y) && (col0..col0 + 8).contains(&x);
                    out.push(if inside { 230 } else { (next() % 64) as u8 });
                }
            }
        }
    }
    out
}

fn write_cifar_fixture(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for b in 1..=5 {
        std::fs::write(dir.join(format!("data_batch_{b}.bin")), cifar_records(60, b)).unwrap();
    }
    std::fs::write(dir.join("test_batch.bin"), cifar_records(100, 99)).unwrap();
}

#[test]
fn a_cifar_shaped_gated_model_trains_one_epoch_and_is_attacked() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cifar");
    write_cifar_fixture(&data);
    let spec = format!("cifar10-bin:{}", data.display());
    let ckpt = tmp.path().join("gated-cifar");
    let out = dynrobust(&["train", "--model", "gated", "--data", &spec, "--epochs", "1", "--batch-size", "32", "--out", ckpt.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let sidecar: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ckpt.join("model.json")).unwrap()).unwrap();
    let arch = &sidecar["architecture"];
    assert_eq!((arch["in_channels"].as_i64(), arch["image_size"].as_i64()), (Some(3), Some(32)), "{arch}");
    assert_eq!(arch["widths"], serde_json::json!([16, 32, 64]));
    assert_eq!(arch["mean"], serde_json::json!([0.4914, 0.4822, 0.4465]), "CIFAR normalisation lives in the model");
    assert_eq!(sidecar["training"]["train_samples"], 300);
    assert_eq!(sidecar["training"]["init_from"], serde_json::Value::Null, "other shapes train from scratch");

    let out = dynrobust(&["attack", "--model", ckpt.to_str().unwrap(), "--data", &spec, "--attack", "gradauto", "--n", "32", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(record["n"], 32);
    let (clean, adv) = (record["clean_cost"].as_f64().unwrap(), record["adv_cost"].as_f64().unwrap());
    assert!(adv.is_finite() && clean.is_finite() && adv >= clean - 1e-9, "clean {clean} adv {adv}");
}

#[test]
fn training_on_other_data_requires_out_and_names_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cifar");
    write_cifar_fixture(&data);
    let out = dynrobust(&["train", "--model", "static", "--data", &format!("cifar10-bin:{}", data.display()), "--epochs", "1"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--out"), "{}", stderr(&out));
}

#[test]
fn an_image_folder_trains_an_sdn() {
    let tmp = tempfile::tempdir().unwrap();
    for split in ["train", "test"] {
        for (class, shade) in [("bright", 220u8), ("dark", 30u8)] {
            let dir = tmp.path().join("folder").join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..12u8 {
                let img = image::RgbImage::from_fn(32, 32, |x, y| {
                    let v = shade.saturating_add(((x as u8 ^ y as u8) & 15).wrapping_add(i));
                    image::Rgb([v, v / 2, 255 - v])
                });
                img.save(dir.join(format!("{i:02}.png"))).unwrap();
            }
        }
    }
    let spec = format!("folder:{}", tmp.path().join("folder").display());
    let ckpt = tmp.path().join("sdn-folder");
    let out = dynrobust(&["train", "--model", "sdn", "--data", &spec, "--epochs", "1", "--batch-size", "8", "--out", ckpt.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let sidecar: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ckpt.join("model.json")).unwrap()).unwrap();
    assert_eq!(sidecar["architecture"]["classes"], 2, "classes = class folders");
    assert_eq!(sidecar["evaluation"]["n"], 24);
    assert!(sidecar["training"]["loss"].as_str().unwrap().starts_with("joint SDN training"), "no static backbone to freeze: {}", sidecar["training"]);
}

#[test]
fn cuda_on_a_machine_without_one_fails_at_once() {
    if tch::Cuda::is_available() {
        eprintln!("skipped: this machine has CUDA");
        return;
    }
    for cmd in [vec!["eval", "--model", "sdn", "--device", "cuda"], vec!["attack", "--model", "sdn", "--attack", "fgsm", "--device", "cuda:1"]] {
        let out = dynrobust(&cmd);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(err.contains("device") && err.contains("no CUDA device") && err.contains("--device cpu"), "{err}");
    }
    let out = dynrobust(&["eval", "--model", "sdn", "--device", "tpu"]);
    assert!(stderr(&out).contains("expected cpu, cuda or cuda:N"), "{}", stderr(&out));
}

/// `--data mnist` end to end on a small CSV fixture in the layout `make data-mnist` unpacks
/// (`$DYNROBUST_DATA_DIR/mnist/mnist_{train,test}.csv`): train, evaluate, attack.
#[test]
fn mnist_csv_trains_evaluates_and_is_attacked() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mnist");
    std::fs::create_dir_all(&dir).unwrap();
    for (split, rows) in [("train", 60usize), ("test", 20)] {
        let mut csv = String::from("label");
        for i in 1..=784 {
            csv += &format!(",{i}x");
        }
        for r in 0..rows {
            let label = r % 10;
            // class k: a bright column band at x in [2k+2, 2k+5)
            let pixels: Vec<String> = (0..784).map(|p| if (2 * label + 2..2 * label + 5).contains(&(p % 28)) { "250".into() } else { format!("{}", (p * 7 + r) % 20) }).collect();
            csv += &format!("\n{label},{}", pixels.join(","));
        }
        std::fs::write(dir.join(format!("mnist_{split}.csv")), csv + "\n").unwrap();
    }
    let run = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_dynrobust")).args(args).env("DYNROBUST_DATA_DIR", tmp.path()).env_remove("LD_LIBRARY_PATH").output().unwrap();
    let ckpt = tmp.path().join("static-mnist");
    let out = run(&["train", "--model", "static", "--data", "mnist", "--epochs", "1", "--batch-size", "10", "--out", ckpt.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let sidecar: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ckpt.join("model.json")).unwrap()).unwrap();
    assert_eq!(sidecar["training"]["data"], "mnist/train");
    assert_eq!(sidecar["training"]["train_samples"], 60);
    assert_eq!(sidecar["evaluation"]["n"], 20);
    assert_eq!(sidecar["architecture"]["mean"][0], 0.1307, "MNIST's normalisation, not Fashion-MNIST's");

    let out = run(&["eval", "--model", ckpt.to_str().unwrap(), "--data", "mnist", "--no-latency", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["data"].as_str(), v["n"].as_i64()), (Some("mnist/test"), Some(20)), "{v}");
    assert_eq!(v["accuracy"], sidecar["evaluation"]["accuracy"], "eval reproduces the sidecar");

    let out = run(&["attack", "--model", ckpt.to_str().unwrap(), "--data", "mnist", "--attack", "fgsm", "--n", "20", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["n"].as_i64(), v["data"].as_str()), (Some(20), Some("mnist/test")), "{v}");
    assert!(v["linf_max"].as_f64().unwrap() <= 8.0 / 255.0 + 1e-6, "{v}");

    // DeepSloth's scenario 2: an MNIST surrogate crafts, the committed Fashion-MNIST sdn is
    // the victim (on its own test images; the surrogate keeps MNIST's normalisation)
    let out = dynrobust(&["attack", "--model", "sdn", "--attack", "pgd-linf", "--set", "steps=2", "--surrogate", ckpt.to_str().unwrap(), "--n", "16", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["n"].as_i64(), v["data"].as_str()), (Some(16), Some("fashion-mnist/test")), "{v}");
    assert_eq!(v["attack"], format!("pgd-linf@{}", ckpt.display()), "{v}");
    assert_eq!(v["model"], "sdn", "{v}");
    assert!(v["linf_max"].as_f64().unwrap() <= 8.0 / 255.0 + 1e-6, "{v}");
    assert!(v["linf_max"].as_f64().unwrap() > 0.0, "the surrogate's gradient moved the images: {v}");
}
