//! Trained study variants: a variant whose training table changed since its checkpoint was
//! trained is refused (a study edited and forced over the same directory would otherwise
//! evaluate new cells on the old network).

use dynrobust_experiments::execute::{prepare_variants, registry};
use dynrobust_experiments::Study;

fn study(epochs: i64) -> Study {
    let text = format!(
        "name = \"v\"\ndata = \"fashion-mnist\"\nn = 8\nbatch = 8\nmodels = [\"g\"]\neps = [\"8/255\"]\n\
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
}
