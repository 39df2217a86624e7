//! Study files: the shipped examples expand, ids are order-independent and stable, and every
//! kind of mistake is reported at FILE:LINE:COLUMN with the key named.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::{registry, small_study, SMALL};
use dynrobust_experiments::{parse_shard, shard, DefenseMode, Study};
use proptest::prelude::*;

fn shipped(name: &str) -> Study {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(name);
    Study::load(&path, &registry()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn shipped_studies_parse_and_expand() {
    let quick = shipped("quick.toml");
    assert_eq!(quick.name, "quick");
    assert_eq!(quick.cells.len(), 74, "quick.toml grid size changed");
    for c in &quick.cells {
        let k = &c.config;
        match k.attack.name.as_str() {
            "deepsloth" => assert_eq!(k.model.name, "sdn"),
            "gradmdm" | "ilfo" => assert!(k.model.name == "gated" || k.model.name == "skipnet"),
            _ => {}
        }
        assert_eq!(k.attack.name == "ilfo", k.eps.is_none());
        if k.model.name == "static" {
            assert_eq!(k.defense.name, "none");
        }
    }
    // the detector-aware attacker refines inside an ε-ball: DeepSloth at both ε, GradMDM at 8/255
    let penalised: Vec<_> = quick.cells.iter().filter(|c| c.config.defense.label == "squeeze-penalty").collect();
    assert_eq!(penalised.len(), 4);
    assert!(quick.cells.iter().filter(|c| c.config.attack.name == "gradmdm").all(|c| c.config.eps == Some(8.0 / 255.0)));
    assert!(penalised.iter().all(|c| c.config.eps.is_some() && c.config.defense.mode == Some(DefenseMode::Adaptive)));
    let gradmdm = quick.cells.iter().find(|c| c.config.attack.name == "gradmdm").unwrap();
    assert_eq!(gradmdm.config.attack.params["mode"], "fixed");

    let defenses = shipped("defenses.toml");
    assert!(defenses.cells.iter().all(|c| c.config.n == 1000 && c.config.model.name != "static"));
    assert!(defenses.cells.iter().any(|c| c.config.defense.mode == Some(DefenseMode::Oblivious)));
    let labels: BTreeSet<_> = defenses.cells.iter().map(|c| c.config.defense.label.as_str()).collect();
    for label in ["bitdepth-4", "median", "jpeg", "denoiser-adv", "noise-eot4", "budget-4", "monitor", "squeeze", "squeeze-fixed-point", "squeeze-penalty", "gate-consistency", "deepsloth-at", "mixs"] {
        assert!(labels.contains(label), "defenses.toml lacks {label}");
    }
    assert_eq!(defenses.cells.len(), 278, "defenses.toml grid size changed");
    // the detector-aware attacker: every attack with an ε-ball on every model it targets, never ILFO
    let penalised: Vec<_> = defenses.cells.iter().filter(|c| c.config.defense.label == "squeeze-penalty").collect();
    assert_eq!(penalised.len(), 9, "deepsloth on sdn, gradmdm on gated and skipnet, pgd and mechanism on all three");
    assert!(penalised.iter().all(|c| c.config.eps.is_some() && c.config.attack.name != "ilfo" && c.config.defense.mode == Some(DefenseMode::Adaptive)));
    // the cost monitor has no adaptive attacker: its cells default to oblivious
    let monitor: BTreeSet<_> = defenses.cells.iter().filter(|c| c.config.defense.name == "monitor").map(|c| c.config.defense.mode).collect();
    assert_eq!(monitor, BTreeSet::from([Some(DefenseMode::Oblivious)]));
    let squeeze: BTreeSet<_> = defenses.cells.iter().filter(|c| c.config.defense.name == "squeeze").map(|c| c.config.defense.mode).collect();
    assert_eq!(squeeze, BTreeSet::from([Some(DefenseMode::Adaptive), Some(DefenseMode::Oblivious)]));
    // the fixed-point attacker is adaptive by nature: an oblivious cell of it would repeat the eot entry's
    assert!(defenses.cells.iter().filter(|c| c.config.defense.label == "squeeze-fixed-point").all(|c| c.config.defense.mode == Some(DefenseMode::Adaptive)));
    // every training-time defense a cell names is a committed checkpoint
    for cell in &defenses.cells {
        if let Some(path) = cell.config.defense.params.get("checkpoint").and_then(|v| v.as_str()) {
            let path = path.replace("{model}", &cell.config.model.name);
            let dir = dynrobust_core::data::project_root().join(&path);
            let sidecar = if cell.config.defense.name == "denoiser" { "denoiser.json" } else { "model.json" };
            assert!(dir.join(sidecar).is_file(), "cell {} names checkpoint {path}, which is not committed", cell.id);
        }
    }

    let robust = shipped("robust-accuracy.toml");
    assert_eq!(robust.cells.len(), 24, "robust-accuracy.toml grid size changed");
    let defended: Vec<_> = robust.cells.iter().filter(|c| c.config.defense.name != "none").collect();
    assert_eq!(defended.len(), 2 * 4, "bitdepth-4 and denoiser-adv × static, sdn, gated, skipnet");
    assert!(defended.iter().all(|c| c.config.attack.name == "ensemble" && c.config.eps == Some(8.0 / 255.0) && c.config.defense.mode == Some(DefenseMode::Adaptive) && !c.config.model.name.ends_with("-twin")));

    let variants = shipped("deepsloth-variants.toml");
    assert_eq!(variants.cells.len(), 5 * 2, "five DeepSloth variants × the SDN at two thresholds");
    for c in &variants.cells {
        let l2 = c.config.attack.name.starts_with("deepsloth-l2");
        assert_eq!(c.config.eps, Some(if l2 { 1.0 } else { 8.0 / 256.0 }), "{}", c.config.attack.name);
        assert!(c.config.model.name == "sdn" || c.config.model.threshold == Some(0.65));
    }

    let seed = shipped("seed-study.toml");
    let transfer = seed.cells.iter().filter(|c| c.config.surrogate.is_some()).count();
    assert_eq!(transfer, 4 * 3 * 2, "4 targets × 3 foreign surrogates × 2 seeds");
    let q = seed.cells.iter().find(|c| c.config.model.name == "sdn-q0.6").unwrap();
    assert_eq!((q.config.model.base.as_str(), q.config.model.threshold), ("sdn", Some(0.6)));
    let t = seed.cells.iter().find(|c| c.config.model.name == "gated-t0.3").unwrap();
    assert_eq!(t.config.model.train.as_ref().unwrap()["target_rate"], 0.3);
    assert_eq!(t.config.model.base, "gated");
    for c in &seed.cells {
        assert!(c.config.attack.label == "mechanism" || ["static", "sdn", "gated", "skipnet"].contains(&c.config.model.name.as_str()));
    }
}

#[test]
fn expansion_is_the_cross_product() {
    let s = small_study();
    // pgd: 3 models × (none + bitdepth×2 modes) × 2 ε × 2 seeds; ilfo: no ε.
    assert_eq!(s.cells.len(), 3 * 3 * 2 * 2 + 3 * 3 * 2);
    let none = s.cells.iter().find(|c| c.config.defense.name == "none").unwrap();
    assert_eq!(none.config.defense.mode, None);
    let ids = s.ids();
    assert_eq!(ids.len(), s.cells.len());
    assert!(ids.iter().all(|id| id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit())));
    let again = Study::parse(SMALL, "elsewhere.toml", &registry()).unwrap();
    assert_eq!(again.cells, s.cells, "ids and order are stable across loads");
}

#[test]
fn overrides_and_filters_apply() {
    let text = format!(
        "{SMALL}\n[[overrides]]\nmatch = {{ model = \"gated\", attack = \"pgd-linf\" }}\nparams = {{ steps = 7, loss = \"max\" }}\n\
         [[include]]\nmodel = [\"gated\", \"sdn\"]\n[[exclude]]\nmodel = \"sdn\"\ndefense = \"bitdepth\"\n"
    );
    let s = Study::parse(&text, "o.toml", &registry()).unwrap();
    assert!(s.cells.iter().all(|c| c.config.model.name != "static"));
    assert!(!s.cells.iter().any(|c| c.config.model.name == "sdn" && c.config.defense.name == "bitdepth"));
    for c in s.cells.iter().filter(|c| c.config.attack.name == "pgd-linf") {
        let steps = if c.config.model.name == "gated" { 7 } else { 2 };
        assert_eq!(c.config.attack.params["steps"], steps, "{}", c.config.summary());
    }
}

#[test]
fn filters_match_eps_in_either_spelling_and_none() {
    // no defended cell at 8/255 (written as a decimal) or without ε (ILFO): defended PGD at 4/255 only
    let text = format!("{SMALL}\n[[exclude]]\ndefense = \"bitdepth\"\neps = [\"0.031372549019607843\", \"none\"]\n");
    let s = Study::parse(&text, "e.toml", &registry()).unwrap();
    let defended: Vec<_> = s.cells.iter().filter(|c| c.config.defense.name == "bitdepth").collect();
    assert_eq!(defended.len(), 3 * 2 * 2, "3 models × 2 modes × 2 seeds, PGD at 4/255 only");
    assert!(defended.iter().all(|c| c.config.attack.name == "pgd-linf" && c.config.eps == Some(4.0 / 255.0)));
    assert_eq!(s.cells.iter().filter(|c| c.config.eps.is_none()).count(), 3 * 2, "ILFO undefended: 3 models × 2 seeds");
    // the same filter written as a fraction gives the same grid
    let fraction = text.replace("\"0.031372549019607843\"", "\"8/255\"");
    assert_eq!(Study::parse(&fraction, "e.toml", &registry()).unwrap().cells, s.cells);
    // and as a TOML number, as the study's own `eps` list may write it
    let number = text.replace("\"0.031372549019607843\"", "0.031372549019607843");
    assert_eq!(Study::parse(&number, "e.toml", &registry()).unwrap().cells, s.cells);
    let alone = format!("{SMALL}\n[[exclude]]\ndefense = \"bitdepth\"\neps = 0.0313725490196\n");
    assert_eq!(Study::parse(&alone, "e.toml", &registry()).unwrap().cells.len(), s.cells.len() + 3 * 2 * 2, "ILFO's bitdepth cells back");
}

#[test]
fn surrogates_self_and_same_model_are_white_box() {
    let text = SMALL.replace("params = { steps = 2 }", "params = { steps = 2 }\nsurrogates = [\"self\", \"static\"]");
    let s = Study::parse(&text, "t.toml", &registry()).unwrap();
    let on_static: Vec<_> = s.cells.iter().filter(|c| c.config.model.name == "static" && c.config.attack.name == "pgd-linf").collect();
    assert!(on_static.iter().all(|c| c.config.surrogate.is_none()), "static→static is white-box, deduplicated");
    let sdn: Vec<_> = s.cells.iter().filter(|c| c.config.model.name == "sdn" && c.config.surrogate.is_some()).collect();
    // none and bitdepth (its adaptive and oblivious entries are one experiment for a transfer
    // attack: the surrogate knows nothing of the defense) × 2 ε × 2 seeds
    assert_eq!(sdn.len(), 2 * 2 * 2);
    assert!(sdn.iter().filter(|c| c.config.defense.name == "bitdepth").all(|c| c.config.defense.mode == Some(DefenseMode::Oblivious)));
}

/// (file text, line of the error, text the message must contain)
fn malformed() -> Vec<(String, &'static str, &'static str)> {
    let base = "name = \"x\"\ndata = \"mnist\"\nn = 4\nmodels = [\"sdn\"]\n[[attacks]]\nname = \"pgd-linf\"\n";
    vec![
        (format!("{base}modle = 1\n"), "7:1", "modle"),
        (base.replace("\"pgd-linf\"", "\"pgd-lnf\""), "6:8", "pgd-lnf"),
        (base.replace("\"pgd-linf\"", "\"pgd-lnf\""), "6:8", "attacks.name"),
        (base.replace("[\"sdn\"]", "[\"sdn\", \"resnet\"]"), "4:18", "models"),
        (base.replace("[\"sdn\"]", "[]"), "4:10", "models"),
        (base.replace("n = 4", "n = 0"), "3:5", "`n`"),
        (base.replace("n = 4", "n = \"four\""), "3:5", "n = \"four\""),
        (base.replace("n = 4", "n = -4"), "3:5", "n = -4"),
        (base.replace("mnist", "cifar"), "2:8", "data"),
        (format!("eps = [\"8/0\"]\n{base}"), "1:8", "eps"),
        (format!("eps = [-0.1]\n{base}"), "1:8", "eps"),
        (format!("eps = [nan]\n{base}"), "1:8", "eps"),
        (format!("eps = [\"eight\"]\n{base}"), "1:8", "eps"),
        (format!("eps = [true]\n{base}"), "1:8", "eps"),
        (format!("seeds = [1, 1]\n{base}"), "1:13", "seeds"),
        (format!("{base}parms = {{ steps = 3 }}\n"), "7:1", "parms"),
        (format!("{base}params = {{ stpes = 3 }}\n"), "7:10", "stpes"),
        (format!("{base}params = {{ steps = 0 }}\n"), "7:10", "steps"),
        (format!("{base}[[defenses]]\nname = \"bitdepth\"\nparams = {{ bits = 0 }}\n"), "9:10", "bits"),
        (format!("{base}[[defenses]]\nname = \"median\"\nparams = {{ kernal = 3 }}\n"), "9:10", "kernal"),
        (format!("{base}[[overrides]]\nmatch = {{ attack = \"pgd-linf\" }}\nparams = {{ stpes = 1 }}\n"), "9:10", "stpes"),
        (format!("{base}[[defenses]]\nname = \"median\"\n[[overrides]]\nmatch = {{ defense = \"median\" }}\ndefense_params = {{ kernal = 3 }}\n"), "11:18", "kernal"),
        (format!("{base}params = {{ step_size = nan }}\n"), "7:10", "step_size = NaN"),
        (format!("{base}params = {{ step_size = inf }}\n"), "7:10", "step_size = inf"),
        (format!("{base}[[defenses]]\nname = \"noise\"\nparams = {{ sigma = -inf }}\n"), "9:10", "sigma = -inf"),
        (format!("{base}[[variants]]\nname = \"v\"\ntrain = {{ model = \"gated\", target_rate = nan }}\n"), "9:9", "target_rate = NaN"),
        (format!("{base}[[attacks]]\nname = \"fgsm\"\n[[overrides]]\nmatch = {{ attack = \"pgd-linf\", label = \"fgsm\" }}\nparams = {{ steps = 1 }}\n"), "10:9", "matches no cell"),
        (format!("{base}[[attacks]]\nname = \"fgsm\"\n[[exclude]]\nattack = \"pgd-linf\"\nlabel = \"fgsm\"\n"), "9:1", "`[[exclude]]` matches no cell"),
        (format!("{base}[[include]]\nmodel = []\n"), "8:9", "`include.model` is empty"),
        (format!("eps = [\"8/255\", 0.0313725490196]\n{base}"), "1:17", "listed twice"),
        (format!("{base}params = {{ eps = 0.1 }}\n"), "7:10", "attacks.params.eps"),
        (format!("{base}[[attacks]]\nname = \"pgd-linf\"\n"), "8:8", "label"),
        (format!("{base}[[defenses]]\nname = \"bitdepht\"\n"), "8:8", "defenses.name"),
        (format!("{base}[[defenses]]\nname = \"median\"\nmodes = [\"adaptiv\"]\n"), "9:10", "modes"),
        (format!("{base}[[defenses]]\nname = \"none\"\nmodes = [\"adaptive\"]\n"), "9:9", "none"),
        (format!("{base}[[defenses]]\nname = \"monitor\"\nmodes = [\"oblivious\", \"adaptive\"]\n"), "9:23", "monitor"),
        (format!("{base}[[defenses]]\nname = \"squeeze\"\nparams = {{ attacker = \"fixed-point\" }}\nmodes = [\"adaptive\", \"oblivious\"]\n"), "10:22", "attacker"),
        (format!("{base}[[defenses]]\nname = \"squeeze\"\nparams = {{ bits = 9 }}\n"), "9:10", "bits"),
        (format!("{base}[[attacks]]\nname = \"ilfo\"\n[[defenses]]\nname = \"squeeze\"\nlabel = \"squeeze-penalty\"\nparams = {{ attacker = \"penalty\" }}\n"), "12:10", "meets attack `ilfo`, which has no ε-ball"),
        (format!("{base}[[variants]]\nname = \"v\"\nbase = \"sdn\"\nthreshold = 1.5\n"), "10:13", "threshold"),
        (format!("{base}[[variants]]\nname = \"v\"\nbase = \"nope\"\nthreshold = 0.5\n"), "9:8", "variants.base"),
        (format!("{base}[[variants]]\nname = \"v\"\ntrain = {{ model = \"vgg\" }}\n"), "9:9", "train.model"),
        (format!("{base}[[variants]]\nname = \"v\"\ntrain = {{ model = \"gated\", taget_rate = 0.3 }}\n"), "9:9", "taget_rate"),
        (format!("{base}[[variants]]\nname = \"v\"\ntrain = {{ model = \"gated\", per_class = \"ten\" }}\n"), "9:9", "`train`"),
        (format!("{base}[[variants]]\nname = \"v\"\ntrain = {{ model = \"gated\", per_class_draw = 3 }}\n"), "9:9", "per_class_draw"),
        (format!("{base}[[variants]]\nname = \"sdn\"\nthreshold = 0.5\n"), "8:8", "variants.name"),
        (format!("{base}[[variants]]\nname = \"v\"\nbase = \"sdn\"\ntwin = true\nthreshold = 0.5\n"), "11:13", "twin"),
        (format!("{base}[[variants]]\nname = \"v\"\nbase = \"gated\"\ntwin = false\n"), "8:8", "`twin`"),
        (format!("{base}[[exclude]]\nmodel = \"sdn\"\n"), "7:1", "exclude"),
        (format!("{base}[[include]]\nmodle = \"sdn\"\n"), "8:1", "modle"),
        (format!("{base}[[include]]\nmodel = \"gated\"\n"), "8:9", "include.model"),
        (format!("{base}[[include]]\nmodel = [[\"sdn\"]]\n"), "8:10", "a string or a number"),
        (format!("{base}[[include]]\n"), "7:1", "include"),
        (format!("eps = [\"8/255\"]\n{base}[[include]]\neps = \"4/255\"\n"), "9:7", "no eps `4/255`"),
        (format!("eps = [\"8/255\"]\n{base}[[include]]\neps = \"eight\"\n"), "9:7", "include.eps"),
        (format!("{base}[[overrides]]\nmatch = {{ attack = \"ilfo\" }}\nparams = {{ steps = 1 }}\n"), "8:20", "overrides.match.attack"),
        (format!("{base}[[attacks]]\nname = \"deepsloth\"\n[[overrides]]\nmatch = {{ attack = \"deepsloth\" }}\nparams = {{ steps = 2 }}\n[[exclude]]\nattack = \"deepsloth\"\n"), "10:9", "matches only cells that `exclude` / `include` remove"),
        (format!("{base}surrogates = [\"self\", \"resnet\"]\n"), "7:23", "attacks.surrogates"),
        (base.replace("name = \"x\"", "name = \"../x\""), "1:8", "plain name"),
        (base.replace("name = \"x\"", "name = \"/tmp/x\""), "1:8", "runs/<name>"),
        (base.replace("n = 4", "n = 10001"), "3:5", "only 10000 images"),
        (format!("eps = [8]\n{base}"), "1:7", "covers the whole [0, 1] pixel range"),
        (format!("{base}[[defenses]]\nname = \"pgd-at\"\nparams = {{ checkpoint = \"models/checkpoints/{{modle}}-pgd-at\" }}\n"), "9:10", "no checkpoint"),
        (base.replace("[\"sdn\"]", "[\"sdn\", \"static\"]") + "[[defenses]]\nname = \"budget\"\nparams = { max_blocks = 2 }\n", "9:10", "model `static`, which is static"),
        (format!("{base}[[variants]]\nname = \"v\"\nbase = \"gated\"\nthreshold = 0.5\n"), "10:13", "`gated` is a gated model"),
        (format!("{base}[[variants]]\nname = \"v\"\nbase = \"skipnet\"\nexits = [1, 2]\n"), "10:9", "`exits` applies to early-exit"),
        (format!("{base}[[variants]]\nname = \"v\"\nbase = \"sdn\"\nexits = [0, 9]\n"), "10:9", "`sdn` has an exit after each of its 6 blocks: expected indices in 0..6"),
        (format!("{base}[[variants]]\nname = \"v\"\nbase = \"sdn\"\nexits = []\n"), "10:9", "non-empty"),
        (format!("{base}[[variants]]\nname = \"v\"\ntrain = {{ model = \"gated\", epochs = 0 }}\n"), "9:9", "epochs"),
        (format!("{base}[[variants]]\nname = \"v\"\ntrain = {{ model = \"gated\", lr = -1.0 }}\n"), "9:9", "lr"),
        (format!("{base}[[variants]]\nname = \"v\"\ntrain = {{ model = \"gated\", target_rate = 5.0 }}\n"), "9:9", "target_rate"),
        (format!("{base}[[variants]]\nname = \"v\"\ntrain = {{ model = \"gated\", threshold = 0.5 }}\n"), "9:9", "applies to an sdn"),
        (format!("{base}[[variants]]\nname = \"v\"\ntrain = {{ model = \"gated\", data = \"npy:/nonexistent\" }}\n"), "9:9", "no directory"),
        (base.replace("\"mnist\"", "\"npy:/nonexistent/dir\""), "2:8", "no directory /nonexistent/dir"),
    ]
}

#[test]
fn malformed_studies_are_located_and_name_the_key() {
    let registry = registry();
    for (text, line_column, key) in malformed() {
        let err = Study::parse(&text, "experiments/bad.toml", &registry).expect_err(&text).to_string();
        eprintln!("{err}");
        // the place opens the message, as a compiler's does
        let at = format!("experiments/bad.toml:{line_column}: ");
        assert!(err.starts_with(&at), "expected `{at}` at the start of: {err}\n--- study:\n{text}");
        assert!(err.contains(key), "expected `{key}` in: {err}\n--- study:\n{text}");
    }
}

#[test]
fn unknown_names_list_the_valid_ones() {
    let text = "name = \"x\"\ndata = \"mnist\"\nn = 4\nmodels = [\"sdn\"]\n[[attacks]]\nname = \"gradmmd\"\n";
    let err = Study::parse(text, "bad.toml", &registry()).unwrap_err().to_string();
    assert!(err.contains("bad.toml:6:8"), "{err}");
    assert!(err.contains("gradmdm") && err.contains("pgd-linf"), "{err}");
    let text = "name = \"x\"\ndata = \"mnist\"\nn = 4\nmodel = [\"sdn\"]\n";
    let err = Study::parse(text, "bad.toml", &registry()).unwrap_err().to_string();
    assert!(err.contains("bad.toml:4:1") && err.contains("unknown field `model`") && err.contains("models"), "{err}");
}

#[test]
fn shards_partition_the_grid() {
    let s = small_study();
    let mut all = BTreeSet::new();
    for i in 0..5 {
        for c in shard(&s.cells, i, 5) {
            assert!(all.insert(c.id), "cells are in exactly one shard");
        }
    }
    assert_eq!(all, s.ids());
    let mut reversed = s.cells.clone();
    reversed.reverse();
    let a: BTreeSet<_> = shard(&s.cells, 2, 5).into_iter().map(|c| c.id).collect();
    let b: BTreeSet<_> = shard(&reversed, 2, 5).into_iter().map(|c| c.id).collect();
    assert_eq!(a, b);
    assert_eq!(parse_shard("3/16").unwrap(), (3, 16));
    for bad in ["16/16", "1/0", "3", "a/b", "-1/4"] {
        let err = parse_shard(bad).unwrap_err().to_string();
        assert!(err.contains("shard") && err.contains(bad), "{err}");
    }
}

/// A study with the given list order.
fn study_text(models: &[&str], attacks: &[&str], defenses: &[&str], eps: &[&str], seeds: &[u64]) -> String {
    let q = |v: &[&str]| v.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ");
    let seeds = seeds.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
    let mut t = format!(
        "name = \"p\"\ndata = \"fashion-mnist\"\nn = 16\nmodels = [{}]\neps = [{}]\nseeds = [{seeds}]\n",
        q(models),
        eps.join(", ")
    );
    for a in attacks {
        t += &format!("[[attacks]]\nname = {a:?}\nparams = {{ steps = 3 }}\n");
    }
    for d in defenses {
        let modes = if *d == "none" { String::new() } else { "modes = [\"oblivious\", \"adaptive\"]\n".into() };
        t += &format!("[[defenses]]\nname = {d:?}\n{modes}");
    }
    t
}

fn shuffled<T: Clone>(v: &[T], perm: &[usize]) -> Vec<T> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by_key(|i| perm.get(*i).copied().unwrap_or(0));
    idx.into_iter().map(|i| v[i].clone()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn ids_do_not_depend_on_list_order(p in proptest::collection::vec(0usize..1000, 5)) {
        let models = ["static", "sdn", "gated", "skipnet"];
        let attacks = ["pgd-linf", "deepsloth", "ilfo"];
        let defenses = ["none", "bitdepth", "median"];
        let eps = ["\"8/255\"", "0.1", "\"4/255\""];
        let seeds = [0u64, 7, 3];
        let perm = |k: usize| -> Vec<usize> { (0..8).map(|i| (p[k] * (i + 3) * 7919) % 101).collect() };
        let a = study_text(&models, &attacks, &defenses, &eps, &seeds);
        let b = study_text(
            &shuffled(&models, &perm(0)), &shuffled(&attacks, &perm(1)), &shuffled(&defenses, &perm(2)),
            &shuffled(&eps, &perm(3)), &shuffled(&seeds, &perm(4)),
        );
        let sa = Study::parse(&a, "a.toml", &registry()).unwrap();
        let sb = Study::parse(&b, "b.toml", &registry()).unwrap();
        prop_assert_eq!(sa.ids(), sb.ids());
        prop_assert_eq!(&sa.cells, &sb.cells, "the sorted order is deterministic too");
    }

    #[test]
    fn different_params_give_different_ids(steps in 1u32..1000, other in 1u32..1000) {
        prop_assume!(steps != other);
        let t = |s: u32| format!("name = \"p\"\ndata = \"mnist\"\nn = 4\nmodels = [\"sdn\"]\n[[attacks]]\nname = \"pgd-linf\"\nparams = {{ steps = {s} }}\n");
        let a = Study::parse(&t(steps), "a.toml", &registry()).unwrap();
        let b = Study::parse(&t(other), "a.toml", &registry()).unwrap();
        let a2 = Study::parse(&t(steps), "a.toml", &registry()).unwrap();
        prop_assert_eq!(a.ids(), a2.ids());
        prop_assert!(a.ids().is_disjoint(&b.ids()));
    }
}

#[test]
fn exit_placement_order_does_not_change_ids() {
    let t = |exits: &str| format!("name = \"p\"\ndata = \"mnist\"\nn = 4\nmodels = [\"v\"]\n[[variants]]\nname = \"v\"\nbase = \"sdn\"\nexits = {exits}\n[[attacks]]\nname = \"pgd-linf\"\n");
    let a = Study::parse(&t("[2, 5]"), "a.toml", &registry()).unwrap();
    let b = Study::parse(&t("[5, 2]"), "a.toml", &registry()).unwrap();
    assert_eq!(a.ids(), b.ids());
    assert_eq!(a.cells[0].config.model.exits, Some(vec![2, 5]));
}

#[test]
fn eps_reads_as_k_over_255_below_one_and_as_a_decimal_otherwise() {
    use dynrobust_experiments::study::format_eps;
    assert_eq!(format_eps(8.0 / 255.0), "8/255");
    assert_eq!(format_eps(0.03125), "0.03125");
    // an L2 radius of 1 is not 255/255
    assert_eq!(format_eps(1.0), "1");
    assert_eq!(format_eps(2.5), "2.5");
}

/// Cell ids are the keys of every stored result: a change to how a cell's config is
/// normalised or hashed would orphan every run directory and make a resumed run redo all its
/// cells. This pins one id literally, so such a change fails here and is made on purpose.
#[test]
fn a_cell_id_is_pinned_across_code_versions() {
    let text = "name = \"pin\"\ndata = \"fashion-mnist\"\nn = 16\nmodels = [\"static\"]\neps = [\"8/255\"]\n[[attacks]]\nname = \"fgsm\"\n";
    let study = Study::parse(text, "pin.toml", &registry()).unwrap();
    let ids: Vec<&str> = study.cells.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["c69be4626b539dff"]);
}

/// A checkpoint directory has one spelling in the grid: relative to the project root,
/// whatever the working directory (tests run in `experiments/`) and however it is written, so
/// its cells keep their ids and `merge`/`report` re-read the study from anywhere.
#[test]
fn a_checkpoint_directory_is_one_model_however_it_is_written() {
    let root = dynrobust_core::data::project_root();
    let absolute = root.join("models/checkpoints/static").display().to_string();
    let spellings = [absolute.as_str(), "models/checkpoints/static", "models/checkpoints/static/", "../models/checkpoints/static", "../models/./checkpoints/static"];
    let parse = |model: &str| {
        let text = format!("name = \"dir\"\ndata = \"fashion-mnist\"\nn = 16\nmodels = [{model:?}]\neps = [\"8/255\"]\n[[attacks]]\nname = \"fgsm\"\n");
        Study::parse(&text, "dir.toml", &registry()).unwrap_or_else(|e| panic!("{model}: {e}"))
    };
    let first = parse(spellings[0]);
    assert_eq!(first.cells[0].config.model.name, "models/checkpoints/static");
    for s in &spellings[1..] {
        assert_eq!(parse(s).ids(), first.ids(), "{s}");
    }
    // a filter may spell it differently from the models list
    let text = "name = \"dir\"\ndata = \"fashion-mnist\"\nn = 16\nmodels = [\"sdn\", \"models/checkpoints/static\"]\neps = [\"8/255\"]\n[[attacks]]\nname = \"fgsm\"\n[[exclude]]\nmodel = \"../models/checkpoints/static/\"\n";
    let filtered = Study::parse(text, "dir.toml", &registry()).unwrap();
    assert_eq!(filtered.cells.iter().map(|c| c.config.model.name.as_str()).collect::<Vec<_>>(), ["sdn"]);
}
