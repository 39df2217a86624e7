//! The report on synthetic records: every file is written, the markdown links every plot (or
//! says why one is skipped), SVGs carry titles, axis labels and legends.

mod common;

use std::collections::BTreeMap;
use std::fs;

use common::registry;
use dynrobust_experiments::{write_partial_report, write_report, Cell, Store, StoredCell, Study};

const STUDY: &str = r#"
name = "synthetic"
data = "fashion-mnist"
n = 4
seeds = [0, 1]
eps = ["8/255", "4/255"]
models = ["static", "sdn", "gated"]

[[variants]]
name = "sdn-q0.6"
base = "sdn"
threshold = 0.6

[[attacks]]
name = "pgd-linf"
surrogates = ["self", "static", "sdn"]

[[attacks]]
name = "ilfo"

[[defenses]]
name = "none"

[[defenses]]
name = "bitdepth"
params = { bits = 4 }
modes = ["adaptive", "oblivious"]
"#;

fn record(cell: &Cell) -> serde_json::Value {
    let c = &cell.config;
    let eps = c.eps.unwrap_or(0.03);
    let exit = c.model.name.starts_with("sdn");
    let gated = c.model.name == "gated";
    let oblivious = c.defense.mode.is_some_and(|m| m.as_str() == "oblivious");
    serde_json::json!({
        "model": c.model.name, "attack": c.attack.name, "label": c.attack.label, "defense": c.defense.name,
        "goal": if c.attack.name == "ilfo" { "energy" } else { "accuracy" },
        "defense_mode": c.defense.mode, "surrogate": c.surrogate.as_ref().map(|s| &s.name), "eps": c.eps,
        "seed": c.seed, "n": c.n,
        "clean_acc": 0.9, "adv_acc": (0.9 - 8.0 * eps - if c.surrogate.is_some() { -0.3 } else { 0.0 }).max(0.0),
        "clean_cost": if c.model.name == "static" { 1.0 } else { 0.5 },
        "adv_cost": if c.model.name == "static" { 1.0 } else { 0.5 + eps * if oblivious { 2.0 } else { 10.0 } },
        "recovery": eps * 20.0, "l2_mean": 1.0, "linf_max": eps, "mse": 0.001, "seconds": 1.5,
        "clean_exit_hist": if exit { serde_json::json!([3, 1, 0]) } else { serde_json::Value::Null },
        "adv_exit_hist": if exit { serde_json::json!([0, 1, 3]) } else { serde_json::Value::Null },
        "clean_gate_rates": if gated { serde_json::json!([0.9, 0.5, 0.2]) } else { serde_json::Value::Null },
        "adv_gate_rates": if gated { serde_json::json!([1.0, 0.9, 0.8]) } else { serde_json::Value::Null },
        "clean_efficacy": null, "adv_efficacy": null,
        "flags": if c.model.name == "gated" && c.seed == 1 { serde_json::json!(["adv cost above 1"]) } else { serde_json::json!([]) },
        "steps": 10,
        "gradient_passes": 10.0, "forward_passes": if exit { 12.5 } else { 10.0 },
    })
}

fn stored(study: &Study) -> Vec<StoredCell> {
    let versions = BTreeMap::from([("dynrobust".to_string(), "0.1.0".to_string())]);
    study
        .cells
        .iter()
        .map(|c| StoredCell {
            id: c.id.clone(),
            cell: c.config.clone(),
            record: record(c),
            versions: versions.clone(),
            finished_at: "2025-01-01T00:00:00Z".into(),
            inputs: Default::default(),
        })
        .collect()
}

#[test]
fn report_writes_tables_plots_and_raw_files() {
    let study = Study::parse(STUDY, "synthetic.toml", &registry()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), STUDY, false).unwrap();
    let cells = stored(&study);
    // Per-sample CSVs with different columns per family.
    for c in &cells {
        let csv = if c.cell.model.name == "gated" { "sample,adv_correct,gates\n0,true,3\n" } else { "sample,adv_correct\n0,false\n1,true\n" };
        fs::write(store.cells_dir().join(format!("{}.csv", c.id)), csv).unwrap();
    }
    let files = write_report(dir.path(), "synthetic", &cells).unwrap();
    let md = fs::read_to_string(&files.markdown).unwrap();

    assert!(md.starts_with("# synthetic"));
    for heading in ["## All cells", "## Defenses", "Cost vs ε", "Accuracy vs ε", "Exit histograms", "Gate execution rates", "Pareto", "Transfer matrices"] {
        assert!(md.contains(heading), "missing {heading} in\n{md}");
    }
    assert!(files.skipped.is_empty(), "{:?}", files.skipped);
    for plot in &files.plots {
        assert!(plot.exists());
        let name = plot.file_name().unwrap().to_string_lossy();
        assert!(md.contains(&format!("(plots/{name})")), "{name} not linked");
    }
    let names: Vec<String> = files.plots.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    for expected in ["cost_vs_eps_pgd-linf.svg", "acc_vs_eps_pgd-linf.svg", "exits_sdn_pgd-linf.svg", "exits_sdn-q0.6_ilfo.svg", "gates_gated_pgd-linf.svg", "pareto.svg", "transfer_acc_pgd-linf_8-255.svg", "transfer_cost_pgd-linf_4-255.svg"] {
        assert!(names.iter().any(|n| n == expected), "{expected} not in {names:?}");
    }

    let cost = fs::read_to_string(dir.path().join("plots/cost_vs_eps_pgd-linf.svg")).unwrap();
    assert!(cost.contains("<svg") && cost.contains("MACs / static MACs") && cost.contains("pgd-linf: cost vs ε"));
    assert!(cost.contains("\nsdn-q0.6\n") && cost.contains("\ngated\n"), "legend names the models: {cost}");
    let acc = fs::read_to_string(dir.path().join("plots/acc_vs_eps_pgd-linf.svg")).unwrap();
    assert!(acc.contains("accuracy (%)"));
    let transfer = fs::read_to_string(dir.path().join("plots/transfer_acc_pgd-linf_8-255.svg")).unwrap();
    assert!(transfer.contains("source (surrogate)") && transfer.contains("target (attacked model)"));
    let exits = fs::read_to_string(dir.path().join("plots/exits_sdn_pgd-linf.svg")).unwrap();
    assert!(exits.contains("samples leaving at this exit (%)") && exits.contains("attacked, ε = 8/255") && exits.contains("\nclean\n"));

    // the measured passes per image, forward-only ones apart
    assert!(md.contains("| passes / img |") && md.contains("| 10 + 2.5 fwd |") && md.contains("| 1.5 | 10 |"), "{md}");
    // Flagged cells are marked and their flags listed.
    assert!(md.contains("| ⚠ | gated |"));
    assert!(md.contains("### Flagged cells") && md.contains("adv cost above 1"));
    // The defense table compares modes.
    assert!(md.contains("| bitdepth | sdn | pgd-linf | 8/255 |"), "{md}");
    // the recovery target judges the energy attack's rows only; the accuracy attack's get their own line
    let target = md.lines().find(|l| l.starts_with("**Target: lower adaptive recovery")).unwrap();
    assert!(!target.contains("pgd-linf"), "{target}");
    assert!(target.contains("vs ilfo"), "{target}");
    let accuracy = md.lines().find(|l| l.starts_with("**Accuracy attacks**")).unwrap_or_else(|| panic!("{md}"));
    assert!(accuracy.contains("pgd-linf") && !accuracy.contains("ilfo"), "{accuracy}");

    let jsonl = fs::read_to_string(&files.results_jsonl).unwrap();
    let ids: Vec<String> = jsonl.lines().map(|l| serde_json::from_str::<StoredCell>(l).unwrap().id).collect();
    assert_eq!(ids.len(), cells.len());
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "sorted by id");

    let per_sample = fs::read_to_string(&files.per_sample_csv).unwrap();
    let mut lines = per_sample.lines();
    assert_eq!(lines.next().unwrap(), "cell_id,sample,adv_correct,gates");
    let gated = cells.iter().find(|c| c.cell.model.name == "gated").unwrap();
    assert!(per_sample.contains(&format!("{},0,true,3\n", gated.id)));
    let other = cells.iter().find(|c| c.cell.model.name == "sdn").unwrap();
    assert!(per_sample.contains(&format!("{},1,true,\n", other.id)));
    assert_eq!(lines.count(), cells.iter().map(|c| if c.cell.model.name == "gated" { 1 } else { 2 }).sum::<usize>());
}

#[test]
fn plots_without_data_are_skipped_and_said_so() {
    let text = "name = \"bare\"\ndata = \"mnist\"\nn = 4\nmodels = [\"static\"]\n[[attacks]]\nname = \"ilfo\"\n";
    let study = Study::parse(text, "bare.toml", &registry()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cells = stored(&study);
    cells[0].record = serde_json::json!({ "clean_acc": 0.5 }); // most fields missing: handled
    let files = write_report(dir.path(), "bare", &cells).unwrap();
    let md = fs::read_to_string(&files.markdown).unwrap();
    assert!(md.contains("_Skipped: no white-box, undefended cells with an ε._"), "{md}");
    assert!(md.contains("_Skipped: no cells with a surrogate (transfer) attack._"));
    // ε and n unknown here: the record lacks them
    assert!(md.contains("| static | none | – | ilfo | – | – | – | 50.0 | – |"), "{md}");
    assert!(md.contains("| ⚠ | model | defense | mode | attack | surrogate | ε | n |"), "{md}");
    assert!(md.contains("## Worst case over attacks (per sample)\n\n_Skipped: it needs two or more accuracy attacks, or two or more energy attacks"), "{md}");
    assert!(!md.contains("## Defenses"));
    assert!(files.skipped.len() >= 4, "{:?}", files.skipped);
}

#[test]
fn detectors_get_their_own_table_not_the_defense_verdict() {
    let text = "name = \"det\"\ndata = \"fashion-mnist\"\nn = 4\neps = [\"8/255\"]\nmodels = [\"sdn\"]\n[[attacks]]\nname = \"deepsloth\"\n[[defenses]]\nname = \"none\"\n[[defenses]]\nname = \"squeeze\"\nmodes = [\"adaptive\", \"oblivious\"]\n";
    let study = Study::parse(text, "det.toml", &registry()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cells = stored(&study);
    for c in &mut cells {
        c.record["goal"] = serde_json::json!("energy");
        if c.cell.defense.name == "squeeze" {
            let (tpr, fooled_passed) = if c.cell.defense.mode.is_some_and(|m| m.as_str() == "oblivious") { (0.2, 0.125) } else { (0.656, 0.031) };
            c.record["detector"] = serde_json::json!({ "kind": "squeeze", "threshold": 0.1786, "false_positive_rate": 0.038, "true_positive_rate": tpr, "undetected_adv_cost": 0.4312, "undetected_error_rate": fooled_passed });
        }
    }
    let files = write_report(dir.path(), "det", &cells).unwrap();
    let md = fs::read_to_string(&files.markdown).unwrap();
    assert!(!md.contains("## Defenses"), "a detector is not judged as a defense that changes the model:\n{md}");
    assert!(md.contains("## Detectors"), "{md}");
    assert!(md.contains("| squeeze | adaptive | sdn | deepsloth | 8/255 | 0.1786 | 3.8 | 65.6 | 3.1 | 0.500 | 0.814 → 0.431 |"), "{md}");
    assert!(md.contains("| squeeze | oblivious | sdn | deepsloth | 8/255 | 0.1786 | 3.8 | 20.0 | 12.5 | 0.500 | 0.563 → 0.431 |"), "{md}");
    assert!(md.contains("Weakest row (lowest TPR − FPR): **squeeze on sdn vs deepsloth (oblivious: TPR 20.0 % at FPR 3.8 %)**"), "{md}");
    // behind a detector the cross-cell check compares the compute that gets past it,
    // (1 − TPR) × passed cost: here the oblivious attacker gets more past it than the adaptive one
    assert!(md.contains("oblivious attack beats the white-box adaptive one (compute past the detector per attacked input 0.345 vs 0.148)"), "{md}");
}

#[test]
fn the_worst_case_over_attacks_is_counted_per_sample() {
    let text = "name = \"worst\"\ndata = \"fashion-mnist\"\nn = 4\neps = [\"8/255\"]\nmodels = [\"sdn\"]\n\n[[attacks]]\nname = \"pgd-linf\"\n\n[[attacks]]\nname = \"mechanism\"\n\n[[attacks]]\nname = \"deepsloth\"\n";
    let study = Study::parse(text, "worst.toml", &registry()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), text, false).unwrap();
    // per attack: its goal, per-sample adv_correct and adv_cost (clean cost 0.5 everywhere)
    let per_attack = |name: &str| match name {
        "pgd-linf" => ("accuracy", [1, 0, 1, 1], [0.5, 0.5, 0.5, 0.5]),
        "mechanism" => ("both", [1, 1, 0, 1], [0.9, 0.5, 0.6, 0.5]),
        _ => ("energy", [1, 1, 1, 1], [0.6, 0.8, 0.5, 0.5]),
    };
    let mut cells = stored(&study);
    for c in &mut cells {
        let (goal, correct, cost) = per_attack(&c.cell.attack.name);
        c.record["goal"] = serde_json::json!(goal);
        let mut csv = String::from("index,clean_cost,adv_cost,clean_correct,adv_correct,clean_exit,adv_exit\n");
        for i in 0..4 {
            csv += &format!("{i},0.5,{},1,{},0,6\n", cost[i], correct[i]);
        }
        fs::write(store.cells_dir().join(format!("{}.csv", c.id)), csv).unwrap();
    }
    let md = fs::read_to_string(write_report(dir.path(), "worst", &cells).unwrap().markdown).unwrap();
    // accuracy side: pgd and mechanism each keep 3 of 4, but only samples 0 and 3 resist both;
    // energy side: mechanism 0.625, deepsloth 0.600, per-sample max 0.9, 0.8, 0.6, 0.5 → 0.700,
    // recovery (0.7 − 0.5) / 0.5
    let row = md.lines().find(|l| l.starts_with("| sdn | none |") && l.contains("**")).unwrap_or_else(|| panic!("no worst-case row in\n{md}"));
    assert_eq!(row, "| sdn | none | – | 8/255 | 2 | 75.0 (mechanism) | **50.0** | 2 | 0.625 (mechanism) | **0.700** | 40.0 |", "{md}");
    assert!(md.contains("## Worst case over attacks (per sample)"));
}

#[test]
fn the_report_names_the_code_version_and_warns_when_cells_mix_them() {
    let study = Study::parse(STUDY, "synthetic.toml", &registry()).unwrap();
    let mut cells = stored(&study);
    let with_commit = |cells: &mut Vec<StoredCell>, range: std::ops::Range<usize>, commit: &str| {
        for c in &mut cells[range] {
            c.versions.insert("dynrobust_commit".into(), commit.into());
        }
    };
    let n = cells.len();
    with_commit(&mut cells, 0..n, "0123456789ab");
    let dir = tempfile::tempdir().unwrap();
    let md = fs::read_to_string(write_report(dir.path(), "synthetic", &cells).unwrap().markdown).unwrap();
    assert!(md.contains("Computed by dynrobust at commit `0123456789ab`."), "{md}");
    assert!(!md.contains("code versions"));
    // a resumed run: two cells from a later commit, one from before commits were recorded
    with_commit(&mut cells, 0..2, "ba9876543210");
    cells[2].versions.remove("dynrobust_commit");
    let md = fs::read_to_string(write_report(dir.path(), "synthetic", &cells).unwrap().markdown).unwrap();
    let expected = format!("**Computed by 3 code versions**: `0123456789ab` ({} cells), `ba9876543210` (2 cells), `not recorded` (1 cell).", n - 3);
    assert!(md.contains(&expected), "{expected}\nnot in\n{md}");
}

#[test]
fn a_report_of_an_unfinished_run_says_so_at_the_top() {
    let study = Study::parse(STUDY, "synthetic.toml", &registry()).unwrap();
    let cells = stored(&study);
    let n = cells.len();
    let dir = tempfile::tempdir().unwrap();
    let md = fs::read_to_string(write_partial_report(dir.path(), "synthetic", &cells[..n - 3], Some(n)).unwrap().markdown).unwrap();
    let expected = format!("**{} of the study's {n} cells: the run is unfinished** (3 still to compute;", n - 3);
    assert!(md.lines().nth(2).is_some_and(|line| line.starts_with(&expected)), "{expected}\nnot the first line of\n{md}");
    let md = fs::read_to_string(write_partial_report(dir.path(), "synthetic", &cells, Some(n)).unwrap().markdown).unwrap();
    assert!(md.contains(&format!("\n\n{n} cells. Raw results")) && !md.contains("unfinished"), "{md}");
}
