//! A cell's id hashes its parameters as the study writes them; the inputs stored with its result
//! also carry a digest of the attack's and the defense's settings as the build resolves them,
//! defaults filled in ([`dynrobust_experiments::provenance`]). Two spellings of one
//! configuration get two ids but one settings digest; a different value gets another digest.
//! The test images a cell evaluates are digested too.

use dynrobust_experiments::execute::{registry, RealExecutor};
use dynrobust_experiments::provenance::{ATTACK_SETTINGS, DATA, DEFENSE_SETTINGS, TRAINING_DATA};
use dynrobust_experiments::{Executor, Study};

fn one_cell(attack_params: &str, eps: &str, defense: &str) -> dynrobust_experiments::Cell {
    let text = format!(
        "name = \"s\"\ndata = \"fashion-mnist\"\nn = 8\nmodels = [\"static\"]\n{eps}\n\
         [[attacks]]\nname = \"pgd-linf\"\nparams = {{ {attack_params} }}\n[[defenses]]\n{defense}\n"
    );
    let study = Study::parse(&text, "s.toml", &registry()).unwrap_or_else(|e| panic!("{text}\n{e}"));
    assert_eq!(study.cells.len(), 1, "{text}");
    study.cells.into_iter().next().unwrap()
}

fn settings_exec() -> RealExecutor {
    RealExecutor::new(std::env::temp_dir(), 1, tch::Device::Cpu, None)
}

fn settings(cell: &dynrobust_experiments::Cell) -> (String, String) {
    let inputs = settings_exec().inputs(cell).unwrap();
    (inputs[ATTACK_SETTINGS].clone(), inputs[DEFENSE_SETTINGS].clone())
}

#[test]
fn a_default_written_out_changes_the_id_but_not_the_settings() {
    let plain = one_cell("", "eps = [\"8/255\"]", "name = \"none\"");
    let spelled = one_cell("steps = 20, random_start = true", "eps = [\"8/255\"]", "name = \"none\"");
    let other = one_cell("steps = 10", "eps = [\"8/255\"]", "name = \"none\"");
    assert_ne!(plain.id, spelled.id, "ids hash the parameters as written");
    assert_eq!(settings(&plain), settings(&spelled), "PGD's defaults are 20 steps with a random start");
    assert_ne!(settings(&plain).0, settings(&other).0, "another step count is other settings");
}

#[test]
fn the_epsilon_of_a_cell_that_names_none_is_in_its_settings() {
    let default_eps = one_cell("", "", "name = \"none\"");
    let same_eps = one_cell("", "eps = [\"8/255\"]", "name = \"none\"");
    let other_eps = one_cell("", "eps = [\"4/255\"]", "name = \"none\"");
    assert!(default_eps.config.eps.is_none() && default_eps.id != same_eps.id);
    assert_eq!(settings(&default_eps).0, settings(&same_eps).0, "PGD's default ε is 8/255");
    assert_ne!(settings(&default_eps).0, settings(&other_eps).0);
}

#[test]
fn a_defense_default_written_out_resolves_to_the_same_settings() {
    let plain = one_cell("", "eps = [\"8/255\"]", "name = \"median\"");
    let spelled = one_cell("", "eps = [\"8/255\"]", "name = \"median\"\nparams = { kernel = 3 }");
    let other = one_cell("", "eps = [\"8/255\"]", "name = \"median\"\nparams = { kernel = 5 }");
    assert_ne!(plain.id, spelled.id);
    assert_eq!(settings(&plain).1, settings(&spelled).1, "the median filter's default kernel is 3");
    assert_ne!(settings(&plain).1, settings(&other).1);
    assert_ne!(settings(&plain).1, settings(&one_cell("", "eps = [\"8/255\"]", "name = \"none\"")).1);
}

#[test]
fn every_denoiser_of_a_chain_is_an_input() {
    let chain = "name = \"chain\"\nparams = { steps = [{ name = \"denoiser\" }, { name = \"bitdepth\" }, { name = \"denoiser\", params = { checkpoint = \"models/checkpoints/denoiser-adv\" } }] }";
    let cell = one_cell("", "eps = [\"8/255\"]", chain);
    let exec = settings_exec();
    let inputs = exec.inputs(&cell).unwrap();
    let single = exec.inputs(&one_cell("", "eps = [\"8/255\"]", "name = \"denoiser\"")).unwrap();
    let adv = exec.inputs(&one_cell("", "eps = [\"8/255\"]", "name = \"denoiser\"\nparams = { checkpoint = \"models/checkpoints/denoiser-adv\" }")).unwrap();
    assert_eq!(inputs["defense"], single["defense"], "{inputs:?}");
    assert_eq!(inputs["defense 2"], adv["defense"], "the second denoiser's weights are digested too: {inputs:?}");
    assert_ne!(inputs["defense"], inputs["defense 2"]);
}

#[test]
fn the_test_images_a_cell_evaluates_are_an_input() {
    use tch::{Kind, Tensor};
    let dir = tempfile::tempdir().unwrap();
    let write = |brightness: f64| {
        let images = Tensor::arange(8 * 784, (Kind::Float, tch::Device::Cpu)).reshape([8, 1, 28, 28]) / (8.0 * 784.0) * brightness;
        images.write_npy(dir.path().join("test_images.npy")).unwrap();
        Tensor::arange(8, (Kind::Int64, tch::Device::Cpu)).remainder(3).write_npy(dir.path().join("test_labels.npy")).unwrap();
    };
    let text = |n: usize| {
        format!(
            "name = \"d\"\ndata = \"npy:{}\"\nn = {n}\nmodels = [\"static\"]\neps = [\"8/255\"]\n[[attacks]]\nname = \"fgsm\"\n",
            dir.path().display()
        )
    };
    let cell = |n: usize| Study::parse(&text(n), "d.toml", &registry()).unwrap().cells.remove(0);
    // a new executor each time: one executor digests a data set once
    let digest = |n: usize| settings_exec().inputs(&cell(n)).unwrap()[DATA].clone();
    write(1.0);
    let (all, first_four) = (digest(8), digest(4));
    assert_eq!(digest(8), all, "the same images digest the same");
    assert_ne!(all, first_four, "n images are digested, not the file");
    write(0.5);
    assert_ne!(digest(8), all, "the data set edited in place");
    let fmnist = one_cell("", "eps = [\"8/255\"]", "name = \"none\"");
    assert!(settings_exec().inputs(&fmnist).unwrap().contains_key(DATA), "the shipped set is digested too");
}

/// An npy data set in `dir`: 8 images of each split at `brightness` (test, train), labels 0–2.
fn write_npy_set(dir: &std::path::Path, test_brightness: f64, train_brightness: f64) {
    use tch::{Kind, Tensor};
    for (split, brightness) in [("test", test_brightness), ("train", train_brightness)] {
        let images = Tensor::arange(8 * 784, (Kind::Float, tch::Device::Cpu)).reshape([8, 1, 28, 28]) / (8.0 * 784.0) * brightness;
        images.write_npy(dir.join(format!("{split}_images.npy"))).unwrap();
        Tensor::arange(8, (Kind::Int64, tch::Device::Cpu)).remainder(3).write_npy(dir.join(format!("{split}_labels.npy"))).unwrap();
    }
}

#[test]
fn the_training_images_a_detector_calibrates_on_are_an_input() {
    let dir = tempfile::tempdir().unwrap();
    let text = |defense: &str| {
        format!(
            "name = \"t\"\ndata = \"npy:{}\"\nn = 8\nmodels = [\"static\"]\neps = [\"8/255\"]\n[[attacks]]\nname = \"fgsm\"\n[[defenses]]\n{defense}\n",
            dir.path().display()
        )
    };
    let cell = |defense: &str| Study::parse(&text(defense), "t.toml", &registry()).unwrap_or_else(|e| panic!("{e}")).cells.remove(0);
    let squeeze = "name = \"squeeze\"\nparams = { calibration = 10 }";
    let inputs = |defense: &str| settings_exec().inputs(&cell(defense)).unwrap();
    write_npy_set(dir.path(), 1.0, 1.0);
    let calibrated = inputs(squeeze);
    assert!(calibrated.contains_key(TRAINING_DATA), "{calibrated:?}");
    assert!(!inputs("name = \"none\"").contains_key(TRAINING_DATA), "an undefended FGSM cell reads no training image");
    write_npy_set(dir.path(), 1.0, 0.5);
    let now = inputs(squeeze);
    assert_ne!(now[TRAINING_DATA], calibrated[TRAINING_DATA], "the training images edited in place");
    assert_eq!(now[DATA], calibrated[DATA], "the test images did not change");
    // an attack that fits on training images (DeepSloth's universal perturbation) reads them too
    let universal = text("name = \"none\"").replace("models = [\"static\"]", "models = [\"sdn\"]").replace("name = \"fgsm\"", "name = \"deepsloth-universal\"");
    let cell = Study::parse(&universal, "u.toml", &registry()).unwrap_or_else(|e| panic!("{e}")).cells.remove(0);
    assert_eq!(settings_exec().inputs(&cell).unwrap().get(TRAINING_DATA), Some(&now[TRAINING_DATA]), "all 8 training images, as the squeezer's 10");
}

#[test]
fn an_input_that_cannot_be_digested_now_leaves_the_others_compared() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    let committed = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/checkpoints/static");
    for file in ["model.json", "model.safetensors"] {
        std::fs::copy(committed.join(file), model.join(file)).unwrap();
    }
    // a transfer cell (model + surrogate) and a defended one (model + the defense's checkpoint)
    let text = format!(
        "name = \"g\"\ndata = \"fashion-mnist\"\nn = 8\nmodels = [\"{}\"]\neps = [\"8/255\"]\n\
         [[attacks]]\nname = \"fgsm\"\nsurrogates = [\"sdn\"]\n[[attacks]]\nname = \"pgd-linf\"\n[[defenses]]\nname = \"none\"\n[[defenses]]\nname = \"pgd-at\"\nparams = {{ checkpoint = \"models/checkpoints/static-pgd-at\" }}\n",
        model.display()
    );
    let cells = Study::parse(&text, "g.toml", &registry()).unwrap_or_else(|e| panic!("{e}")).cells;
    let transfer = cells.iter().find(|c| c.config.surrogate.is_some() && c.config.defense.name == "none").expect("a transfer cell");
    let defended = cells.iter().find(|c| c.config.surrogate.is_none() && c.config.defense.name == "pgd-at").expect("a defended cell");
    let exec = settings_exec();
    let before: Vec<_> = [transfer, defended].map(|c| exec.inputs(c).unwrap()).into();
    assert!(before[0].contains_key("surrogate") && before[1].contains_key("defense"), "{before:?}");
    std::fs::remove_dir_all(&model).unwrap();
    for (cell, before) in [transfer, defended].into_iter().zip(&before) {
        assert!(exec.inputs(cell).is_err(), "a cell to run needs every input");
        let comparable = exec.comparable_inputs(cell);
        assert!(!comparable.contains_key("model"), "{comparable:?}");
        assert_eq!(comparable.len(), before.len() - 1, "only the model is left out: {comparable:?} vs {before:?}");
        for (role, digest) in &comparable {
            assert_eq!(digest, &before[role], "{role} is still compared");
        }
    }
}
