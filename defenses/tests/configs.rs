//! Bad defense configs are refused with the offending field named.

use dynrobust_core::testing::torch_lock;
use dynrobust_defenses::guards::{apply_budget, BudgetConfig};
use dynrobust_defenses::registry::{build_transform, DefenseSpec};
use serde_json::{json, Value};

fn refused(name: &str, params: Value, field: &str) {
    let err = DefenseSpec::parse(name, &params).err().unwrap_or_else(|| panic!("{name} {params} was accepted"));
    let text = err.to_string();
    assert!(text.contains(&format!("`{field}`")), "{name} {params}: error does not name `{field}`: {text}");
}

#[test]
fn out_of_range_values_are_refused_naming_the_field() {
    refused("bitdepth", json!({ "bits": 0 }), "bits");
    refused("bitdepth", json!({ "bits": 9 }), "bits");
    refused("median", json!({ "kernel": 4 }), "kernel");
    refused("median", json!({ "kernel": 4 }), "kernel");
    refused("median", json!({ "kernel": 9 }), "kernel");
    refused("jpeg", json!({ "quality": 0 }), "quality");
    refused("jpeg", json!({ "quality": 101 }), "quality");
    refused("blur", json!({ "sigma": 0.0 }), "sigma");
    refused("noise", json!({ "sigma": -0.1 }), "sigma");
    refused("noise", json!({ "eot": 0 }), "eot");
    refused("monitor", json!({ "percentile": 100 }), "percentile");
    refused("squeeze", json!({ "percentile": 0 }), "percentile");
    refused("squeeze", json!({ "bits": 9 }), "bits");
    refused("squeeze", json!({ "median": 4 }), "median");
    refused("squeeze", json!({ "bits": 0, "median": 0 }), "bits");
    refused("squeeze", json!({ "calibration": 5 }), "calibration");
    refused("squeeze", json!({ "score": "entropy" }), "score");
    refused("squeeze", json!({ "squeezers": 2 }), "squeezers");
}

#[test]
fn unknown_fields_and_names_are_refused() {
    refused("bitdepth", json!({ "bit": 4 }), "bit");
    refused("jpeg", json!({ "quality": "high" }), "quality");
    let err = DefenseSpec::parse("squeezing", &json!({})).unwrap_err().to_string();
    assert!(err.contains("squeezing") && err.contains("bitdepth") && err.contains("squeeze"), "{err}");
    let err = DefenseSpec::parse("gate-consistency", &json!({})).unwrap_err().to_string();
    assert!(err.contains("checkpoint"), "{err}");
    assert!(build_transform("budget", &json!({})).is_err());
}

#[test]
fn budget_above_the_block_count_is_refused_naming_the_field() {
    let _lock = torch_lock();
    for model in ["sdn", "gated", "skipnet"] {
        let mut net = dynrobust_models::checkpoint::load_committed(model);
        let err = apply_budget(&mut net, &BudgetConfig { max_blocks: 7 }).unwrap_err().to_string();
        assert!(err.contains("`max_blocks`") && err.contains("6 blocks"), "{model}: {err}");
        assert!(apply_budget(&mut net, &BudgetConfig { max_blocks: 6 }).is_ok());
    }
    let mut sdn = dynrobust_models::checkpoint::load_committed("sdn");
    assert!(apply_budget(&mut sdn, &BudgetConfig { max_blocks: 0 }).unwrap_err().to_string().contains("max_blocks"));
    let mut stat = dynrobust_models::checkpoint::load_committed("static");
    assert!(apply_budget(&mut stat, &BudgetConfig { max_blocks: 3 }).unwrap_err().to_string().contains("gates or early exits"));
}

#[test]
fn a_denoiser_checkpoint_may_be_named_like_the_committed_checkpoints() {
    let _lock = torch_lock();
    let x = dynrobust_core::testing::test_images(4).images;
    let by_name = build_transform("denoiser", &json!({ "checkpoint": "denoiser-adv" })).unwrap();
    let by_path = build_transform("denoiser", &json!({ "checkpoint": "models/checkpoints/denoiser-adv" })).unwrap();
    assert!(by_name.apply(&x).unwrap().equal(&by_path.apply(&x).unwrap()));
    let err = build_transform("denoiser", &json!({ "checkpoint": "no-such-denoiser" })).err().unwrap().to_string();
    assert!(err.contains("no-such-denoiser"), "{err}");
}

/// Every setting of every defense is documented (what `dynrobust list defenses NAME` prints):
/// each documented setting has a description; what the defense reports as its settings is
/// documented, except the denoiser's `architecture` (read from its checkpoint, not a setting);
/// a defense that cannot be built from no params is one `has_defaults` says so of; an enum-valued
/// setting lists its values, the default among them.
#[test]
fn every_defense_setting_is_documented() {
    let _torch = torch_lock();
    for name in dynrobust_defenses::registry::names() {
        let docs = dynrobust_defenses::registry::setting_docs(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        for (key, doc) in &docs {
            assert!(doc.description.len() > 8, "{name}.{key}: no doc comment ({:?})", doc.description);
        }
        let settings = match DefenseSpec::parse(name, &json!({})) {
            Ok(spec) => spec.settings().unwrap(),
            Err(e) => {
                assert!(!dynrobust_defenses::registry::has_defaults(name), "{name}: not built from no params ({e}) yet said to have defaults");
                continue;
            }
        };
        for (key, default) in settings.as_object().unwrap() {
            if name == "denoiser" && key == "architecture" {
                continue;
            }
            let doc = docs.get(key).unwrap_or_else(|| panic!("{name}.{key}: reported but not documented"));
            if !doc.choices.is_empty() && !default.is_null() {
                let spelled = default.to_string();
                assert!(doc.choices.iter().any(|(value, _)| *value == spelled), "{name}.{key}: default {default} not among {:?}", doc.choices);
            }
        }
    }
}

#[test]
fn setting_docs_of_an_unknown_defense_suggest_the_name() {
    let msg = dynrobust_defenses::registry::setting_docs("squeze").unwrap_err().to_string();
    assert!(msg.contains("unknown defense `squeze`") && msg.contains("squeeze"), "{msg}");
}
