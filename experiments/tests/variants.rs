//! Study variants: a variant whose training table (or data set) changed since its checkpoint
//! was trained is refused (a study edited and forced over the same directory would otherwise evaluate new
//! cells on the old network); a `twin` variant is the base model's static twin.

use dynrobust_core::{cost_of, DynamicModel, Pass};
use dynrobust_experiments::execute::{prepare_variants, registry, RealExecutor};
use dynrobust_experiments::Study;

fn study(epochs: i64) -> Study {
    study_on("fashion-mnist", epochs)
}

fn study_on(data: &str, epochs: i64) -> Study {
    let text = format!(
        "name = \"v\"\ndata = \"{data}\"\nn = 8\nbatch = 8\nmodels = [\"g\"]\neps = [\"8/255\"]\n\
         [[variants]]\nname = \"g\"\nbase = \"gated\"\ntrain = {{ model = \"gated\", epochs = {epochs} }}\n\
         [[attacks]]\nname = \"fgsm\"\n[[defenses]]\nname = \"none\"\n"
    );
    Study::parse(&text, "v.toml", &registry()).unwrap()
}

#[test]
fn a_variant_trained_from_another_table_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let variant = dir.path().join("g");
    std::fs::create_dir_all(&variant).unwrap();
    // a checkpoint as prepare_variants leaves it (the sidecar marks it trained) from 1 epoch
    std::fs::write(variant.join("model.json"), "{}").unwrap();
    std::fs::write(variant.join("variant-train.json"), r#"{"epochs": 1, "model": "gated"}"#).unwrap();
    prepare_variants(&study(1), dir.path()).expect("the same table is accepted");
    let err = prepare_variants(&study(2), dir.path()).unwrap_err().to_string();
    assert!(err.contains("variants.g.train") && err.contains(&variant.display().to_string()), "{err}");
    // a checkpoint from before tables were saved is taken as it is
    std::fs::remove_file(variant.join("variant-train.json")).unwrap();
    prepare_variants(&study(2), dir.path()).unwrap();
    // a table saved with the data set it trained on (the study's, as training writes it):
    // a study on another data set does not reuse the variant
    std::fs::write(variant.join("variant-train.json"), r#"{"data": "fashion-mnist", "epochs": 1, "model": "gated"}"#).unwrap();
    prepare_variants(&study(1), dir.path()).expect("the same table on the same data");
    let err = prepare_variants(&study_on("mnist", 1), dir.path()).unwrap_err().to_string();
    assert!(err.contains("variants.g.train") && err.contains("\"data\":\"mnist\"") && err.contains("\"data\":\"fashion-mnist\""), "{err}");
}

#[test]
fn a_twin_variant_runs_every_block_of_its_base_and_keeps_the_other_ids() {
    let text = "name = \"t\"\ndata = \"fashion-mnist\"\nn = 8\nmodels = [\"gated\", \"gated-twin\"]\n\
                [[variants]]\nname = \"gated-twin\"\nbase = \"gated\"\ntwin = true\n[[attacks]]\nname = \"fgsm\"\n";
    let study = Study::parse(text, "t.toml", &registry()).unwrap();
    let twin_ref = &study.cells.iter().find(|c| c.config.model.name == "gated-twin").unwrap().config.model;
    let plain_ref = &study.cells.iter().find(|c| c.config.model.name == "gated").unwrap().config.model;
    assert!(twin_ref.twin && !plain_ref.twin);
    // `twin = false` is left out of the stored config: the plain model's id is as before twins existed
    let stored = serde_json::to_value(plain_ref).unwrap();
    assert!(stored.get("twin").is_none(), "{stored}");
    let exec = RealExecutor::new(std::env::temp_dir(), 1, tch::Device::Cpu, None);
    let images = dynrobust_core::data::DataSource::FashionMnist.load(dynrobust_core::data::Split::Test, None).unwrap().take(64).images;
    let cost = |m: &dynrobust_experiments::study::ModelRef| {
        let net = exec.load(m, &images.narrow(0, 0, 1)).unwrap();
        let trace = tch::no_grad(|| net.forward_trace(&images, Pass::Sparse).unwrap());
        let c = cost_of(&trace, &net);
        (c.min().double_value(&[]), c.mean(tch::Kind::Double).double_value(&[]))
    };
    let ((twin_min, twin_mean), (_, plain_mean)) = (cost(twin_ref), cost(plain_ref));
    // every block runs on every image: at least the static model's MACs (the gates' own on top)
    assert!(twin_min >= 1.0 && (twin_mean - twin_min).abs() < 1e-9, "twin cost {twin_min} .. {twin_mean}");
    assert!(plain_mean < 0.9, "gated saves compute: {plain_mean}");
}
