//! The raw study-file schema (serde, `deny_unknown_fields`, spans kept for error locations) and
//! its expansion into validated, normalised cells.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;

use dynrobust_core::data::{DataSource, DataSpec, DATA_SPEC_FORMS};
use dynrobust_core::Result;
use dynrobust_models::checkpoint::{canonical_path_name, locate_path};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

use crate::location::Source;
use crate::study::{format_eps, AttackRef, Cell, CellConfig, DefenseMode, DefenseRef, ModelRef, Registry};

type Span = Range<usize>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStudy {
    name: Spanned<String>,
    description: Option<String>,
    data: Spanned<String>,
    n: Spanned<usize>,
    batch: Option<Spanned<usize>>,
    seeds: Option<Spanned<Vec<Spanned<u64>>>>,
    eps: Option<Spanned<Vec<Spanned<RawEps>>>>,
    models: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    variants: Vec<Spanned<RawVariant>>,
    attacks: Spanned<Vec<Spanned<RawAttack>>>,
    defenses: Option<Spanned<Vec<Spanned<RawDefense>>>>,
    #[serde(default)]
    overrides: Vec<Spanned<RawOverride>>,
    #[serde(default)]
    include: Vec<Spanned<RawFilter>>,
    #[serde(default)]
    exclude: Vec<Spanned<RawFilter>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVariant {
    name: Spanned<String>,
    base: Option<Spanned<String>>,
    threshold: Option<Spanned<f64>>,
    exits: Option<Spanned<Vec<usize>>>,
    train: Option<Spanned<toml::Table>>,
    twin: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAttack {
    name: Spanned<String>,
    label: Option<Spanned<String>>,
    params: Option<Spanned<toml::Table>>,
    surrogates: Option<Spanned<Vec<Spanned<String>>>>,
    eps: Option<Spanned<Vec<Spanned<RawEps>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefense {
    name: Spanned<String>,
    label: Option<Spanned<String>>,
    params: Option<Spanned<toml::Table>>,
    modes: Option<Spanned<Vec<Spanned<String>>>>,
}

impl RawDefense {
    /// Where an error about the entry's params points: the params, else the name.
    fn params_span(&self) -> Span {
        self.params.as_ref().map_or_else(|| self.name.span(), |p| p.span())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOverride {
    #[serde(rename = "match")]
    matcher: Spanned<RawFilter>,
    params: Option<Spanned<toml::Table>>,
    defense_params: Option<Spanned<toml::Table>>,
}

/// Cell filter: every key given must match (a value or a list of accepted values).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFilter {
    model: Option<Spanned<OneOrMany>>,
    attack: Option<Spanned<OneOrMany>>,
    label: Option<Spanned<OneOrMany>>,
    defense: Option<Spanned<OneOrMany>>,
    mode: Option<Spanned<OneOrMany>>,
    surrogate: Option<Spanned<OneOrMany>>,
    /// Budgets as written on the `eps` axis (`"8/255"`, `"0.1"`), or `"none"` for an attack
    /// with no ε (ILFO's faithful box).
    eps: Option<Spanned<OneOrMany>>,
}

/// ε as written: a number, or a string `a/b` (or a number in a string).
enum RawEps {
    Num(f64),
    Text(String),
}

impl<'de> Deserialize<'de> for RawEps {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawEps;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("ε as a number or a string like \"8/255\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<RawEps, E> {
                Ok(RawEps::Num(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<RawEps, E> {
                Ok(RawEps::Num(v as f64))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<RawEps, E> {
                Ok(RawEps::Num(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<RawEps, E> {
                Ok(RawEps::Text(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A string or a list of strings.
struct OneOrMany(Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string (an `eps` also a number) or a list of them")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_string()]))
            }
            // a number as written in decimal (an `eps = 0.0313725490196` filter; any other key
            // then names it as a value the study does not have)
            fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_string()]))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_string()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<OneOrMany, A::Error> {
                let mut out = Vec::new();
                while let Some(Scalar(value)) = seq.next_element::<Scalar>()? {
                    out.push(value);
                }
                Ok(OneOrMany(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// One value of a filter list: a string, or a number as written in decimal (no list in a list).
struct Scalar(String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a number")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// The expanded study.
pub(crate) struct Expanded {
    pub name: String,
    pub description: String,
    pub cells: Vec<Cell>,
}

/// Parses, validates and expands a study file.
pub(crate) fn expand(src: Source, registry: &Registry) -> Result<Expanded> {
    let raw: RawStudy = toml::from_str(src.text).map_err(|e| src.toml_error(&e))?;
    let cx = Cx { src, registry };
    let base = cx.base(&raw)?;
    let models = cx.models(&raw)?;
    let defenses = cx.defenses(&raw)?;
    let attacks = cx.attacks(&raw, &models, &base.eps)?;
    let mut configs = cross(&base, &models.grid, &defenses, &attacks);
    let axes = Axes::of(&configs);
    for o in &raw.overrides {
        cx.apply_override(o, &axes, &mut configs)?;
    }
    let configs = cx.filter(&raw, &axes, configs)?;
    cx.check_overrides_survive(&raw, &axes, &configs)?;
    cx.check_pairs(&raw, &configs)?;
    let cells = finish(configs);
    let description = raw.description.unwrap_or_default();
    Ok(Expanded { name: base.name, description, cells })
}

/// Study-wide values shared by every cell.
struct Base {
    name: String,
    data: String,
    n: usize,
    batch: usize,
    seeds: Vec<u64>,
    eps: Vec<Option<f64>>,
}

/// An attack entry ready for the cross product.
struct AttackPlan {
    attack: AttackRef,
    eps: Vec<Option<f64>>,
    /// `None` = white-box on the cell's own model.
    surrogates: Vec<Option<ModelRef>>,
}

/// Every model name a study may refer to, and the models of the grid.
struct Models {
    known: BTreeMap<String, ModelRef>,
    grid: Vec<ModelRef>,
}

/// Validation context: the file (for locations) and the caller's plugin names.
struct Cx<'a> {
    src: Source<'a>,
    registry: &'a Registry,
}

impl Cx<'_> {
    /// A parameter table as JSON, refusing `nan` and `inf` (which JSON cannot hold) at the table.
    fn table(&self, t: &Spanned<toml::Table>, key: &str) -> Result<serde_json::Value> {
        if let Some(bad) = non_finite_key(t.get_ref()) {
            return Err(self.err(&t.span(), format!("`{key}`: `{bad}`: expected a finite number")));
        }
        Ok(table_json(t.get_ref()))
    }

    fn err(&self, span: &Span, problem: impl Into<String>) -> dynrobust_core::Error {
        self.src.error(span, problem)
    }

    fn base(&self, raw: &RawStudy) -> Result<Base> {
        let name = raw.name.get_ref().trim().to_string();
        if name.is_empty() {
            return Err(self.err(&raw.name.span(), "`name` must not be empty"));
        }
        // it becomes the default output directory runs/<name>: one plain path component
        if name.starts_with('.') || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(self.err(&raw.name.span(), format!("`name` = {name:?}: expected a plain name (letters, digits, `-`, `_`, `.`; not starting with `.`): it becomes the output directory runs/<name>")));
        }
        let data = self.data_name(&raw.data)?;
        let n = *raw.n.get_ref();
        if n == 0 {
            return Err(self.err(&raw.n.span(), "`n` must be at least 1"));
        }
        if let Some(size) = DataSpec::parse(&data).ok().and_then(|s| s.source()).map(DataSource::test_size) {
            if n > size {
                return Err(self.err(&raw.n.span(), format!("`n` = {n}: the {data} test split has only {size} images")));
            }
        }
        let batch = raw.batch.as_ref().map_or(Ok(128), |b| match *b.get_ref() {
            0 => Err(self.err(&b.span(), "`batch` must be at least 1")),
            v => Ok(v),
        })?;
        let seeds = self.seeds(raw)?;
        let eps = match &raw.eps {
            Some(list) => self.eps_list("eps", list)?,
            None => vec![None],
        };
        Ok(Base { name, data, n, batch, seeds, eps })
    }

    /// The study's data set in its one spelling: a shipped set by name, a `cifar10-bin:`,
    /// `folder:` or `npy:` directory canonicalised like a checkpoint path (project-relative
    /// inside the checkout, else absolute), so cells read it from any working directory.
    fn data_name(&self, raw: &Spanned<String>) -> Result<String> {
        let written = raw.get_ref();
        let spec = DataSpec::parse(written).map_err(|_| self.err(&raw.span(), format!("`data` = {written:?}: expected one of: {DATA_SPEC_FORMS}")))?;
        let Some(dir) = spec.dir() else { return Ok(spec.name()) };
        let canonical = canonical_path_name(&dir.display().to_string())
            .ok_or_else(|| self.err(&raw.span(), format!("`data` = {written:?}: no directory {}", dir.display())))?;
        Ok(spec.with_dir(canonical.into()).name())
    }

    fn seeds(&self, raw: &RawStudy) -> Result<Vec<u64>> {
        let Some(list) = &raw.seeds else { return Ok(vec![0]) };
        self.non_empty("seeds", list)?;
        let mut seen = BTreeSet::new();
        for s in list.get_ref() {
            if !seen.insert(*s.get_ref()) {
                return Err(self.err(&s.span(), format!("`seeds`: seed {} is listed twice", s.get_ref())));
            }
        }
        Ok(seen.into_iter().collect())
    }

    fn non_empty<T>(&self, key: &str, list: &Spanned<Vec<T>>) -> Result<()> {
        if list.get_ref().is_empty() {
            return Err(self.err(&list.span(), format!("`{key}` is empty: the grid would have no cells")));
        }
        Ok(())
    }

    /// Parses an ε list (study-wide or per attack); an empty per-attack list means "no ε".
    fn eps_list(&self, key: &str, list: &Spanned<Vec<Spanned<RawEps>>>) -> Result<Vec<Option<f64>>> {
        if key == "eps" {
            self.non_empty(key, list)?;
        }
        let mut out: Vec<Option<f64>> = Vec::new();
        for item in list.get_ref() {
            let eps = parse_eps(item.get_ref()).map_err(|why| self.err(&item.span(), format!("`{key}`: {why}")))?;
            // values that print alike (8/255 and 0.0313725490196) would be two cells no table tells apart
            if let Some(same) = out.iter().flatten().find(|o| format_eps(**o) == format_eps(eps)) {
                return Err(self.err(&item.span(), format!("`{key}`: ε = {eps} is listed twice (as {same}, both read {})", format_eps(eps))));
            }
            out.push(Some(eps));
        }
        if out.is_empty() {
            out.push(None);
        }
        Ok(out)
    }

    fn models(&self, raw: &RawStudy) -> Result<Models> {
        self.non_empty("models", &raw.models)?;
        let mut known: BTreeMap<String, ModelRef> = BTreeMap::new();
        for v in &raw.variants {
            let m = self.variant(v.get_ref(), &known)?;
            known.insert(m.name.clone(), m);
        }
        let mut grid: Vec<ModelRef> = Vec::new();
        for name in raw.models.get_ref() {
            let m = self.model_ref("models", name, &known)?;
            if grid.iter().any(|g| g.name == m.name) {
                return Err(self.err(&name.span(), format!("`models`: `{}` is listed twice", m.name)));
            }
            grid.push(m);
        }
        for v in known.values() {
            if !grid.iter().any(|g| g.name == v.name) {
                grid.push(v.clone());
            }
        }
        for m in &grid {
            known.entry(m.name.clone()).or_insert_with(|| m.clone());
        }
        Ok(Models { known, grid })
    }

    /// A registry model, a variant, an existing checkpoint directory or TorchScript file.
    fn model_ref(&self, key: &str, name: &Spanned<String>, variants: &BTreeMap<String, ModelRef>) -> Result<ModelRef> {
        let n = name.get_ref().as_str();
        if let Some(v) = variants.get(n) {
            return Ok(v.clone());
        }
        let plain = |name: String| ModelRef { name: name.clone(), base: name, threshold: None, exits: None, train: None, twin: false };
        if self.registry.models.iter().any(|m| m == n) {
            return Ok(plain(n.to_string()));
        }
        // a checkpoint directory or TorchScript file: one spelling, whatever the directory the
        // study is read from, so its cells keep their ids and `merge` works from anywhere
        let found = locate_path(n);
        let script = dynrobust_models::any::is_torchscript(n) && found.as_ref().is_some_and(|p| p.is_file());
        if script {
            return Ok(plain(canonical_path_name(n).unwrap_or_else(|| n.to_string())));
        }
        if let Some(dir) = found.filter(|p| p.is_dir()) {
            // its sidecar now (architecture, mechanism), not in every cell once the run starts
            if let Err(e) = dynrobust_models::checkpoint::read_sidecar(&dir) {
                return Err(self.err(&name.span(), format!("`{key}`: model `{n}`: {e}")));
            }
            return Ok(plain(canonical_path_name(n).unwrap_or_else(|| n.to_string())));
        }
        let mut valid: Vec<&str> = self.registry.models.iter().map(String::as_str).collect();
        valid.extend(variants.keys().map(String::as_str).filter(|v| !self.registry.models.iter().any(|m| m == v)));
        Err(self.err(
            &name.span(),
            format!(
                "`{key}`: unknown model `{n}`{}; expected one of: {} (or an existing checkpoint directory or TorchScript .pt file)",
                dynrobust_core::error::did_you_mean(n, valid.iter().copied()),
                valid.join(", ")
            ),
        ))
    }

    fn variant(&self, v: &RawVariant, known: &BTreeMap<String, ModelRef>) -> Result<ModelRef> {
        let name = v.name.get_ref().trim();
        if name.is_empty() || known.contains_key(name) || self.registry.models.iter().any(|m| m == name) {
            let why = if name.is_empty() { "must not be empty" } else { "is already a model or variant name" };
            return Err(self.err(&v.name.span(), format!("`variants.name` = {name:?} {why}")));
        }
        let twin = v.twin.as_ref().is_some_and(|t| *t.get_ref());
        if v.threshold.is_none() && v.train.is_none() && v.exits.is_none() && !twin {
            return Err(self.err(&v.name.span(), format!("variant `{name}`: set `threshold`, `exits`, `train` and/or `twin`")));
        }
        if let (true, Some(t)) = (twin, v.threshold.as_ref().map(|t| t.span()).or(v.exits.as_ref().map(|e| e.span()))) {
            return Err(self.err(&t, format!("variant `{name}`: a static twin has no exits or gates to tune: drop `threshold` / `exits`, or `twin`")));
        }
        let threshold = match &v.threshold {
            Some(t) if dynrobust_models::config::check_threshold("threshold", *t.get_ref()).is_err() => {
                return Err(self.err(&t.span(), format!("variant `{name}`: `threshold` = {}", dynrobust_models::config::threshold_problem(*t.get_ref()))))
            }
            t => t.as_ref().map(|t| *t.get_ref()),
        };
        let base = self.variant_base(name, v)?;
        let family = match &v.train {
            Some(t) => t.get_ref().get("model").and_then(|m| m.as_str()).map(str::to_string),
            None => self.family_of(&base),
        };
        if let Some(family) = family.filter(|f| f != "sdn") {
            if let Some((key, span)) = v.threshold.as_ref().map(|t| ("threshold", t.span())).or(v.exits.as_ref().map(|e| ("exits", e.span()))) {
                return Err(self.err(&span, format!("variant `{name}`: `{key}` applies to early-exit (sdn) models; `{base}` is a {family} model")));
            }
        }
        if let Some(e) = &v.exits {
            self.check_exits(name, &base, e)?;
        }
        let train = v.train.as_ref().map(|t| self.table(t, &format!("variant `{name}`: train"))).transpose()?;
        if let (Some(t), Some(json)) = (&v.train, &train) {
            // the table's keys and types now, not when the runner gets to training it
            let checked = serde_json::from_value::<crate::execute::VariantTrain>(json.clone()).map_err(|e| e.to_string()).and_then(|table| table.check().map_err(|e| e.to_string()));
            if let Err(e) = checked {
                return Err(self.err(&t.span(), format!("variant `{name}`: `train`: {e}")));
            }
        }
        // a set of block indices: its order must not change the cell id
        let exits = v.exits.as_ref().map(|e| {
            let mut blocks = e.get_ref().clone();
            blocks.sort_unstable();
            blocks.dedup();
            blocks
        });
        Ok(ModelRef { name: name.to_string(), base, threshold, exits, train, twin })
    }

    /// The family (`static`, `sdn`, `gated`, `skipnet`) of a checkpoint named by `base`, from
    /// its sidecar; `None` when that cannot be read here (a TorchScript file, a variant still
    /// to be trained).
    fn family_of(&self, base: &str) -> Option<String> {
        Some(self.sidecar_of(base)?.architecture.mechanism.kind_name().to_string())
    }

    /// The sidecar of the checkpoint `base` names (see [`Self::family_of`]).
    fn sidecar_of(&self, base: &str) -> Option<dynrobust_models::checkpoint::Sidecar> {
        let dir = dynrobust_models::checkpoint::resolve(base).ok()?;
        dynrobust_models::checkpoint::read_sidecar(&dir).ok()
    }

    /// Why a compute budget of `max_blocks` cannot cap cell `c`'s model (a static model, or
    /// fewer blocks than allowed), judged from its sidecar; `None` when it can, or when the
    /// model is a variant still to be trained.
    fn budget_problem(&self, c: &CellConfig, max_blocks: usize) -> Option<String> {
        let sidecar = c.model.train.is_none().then(|| self.sidecar_of(&c.model.base)).flatten()?;
        let blocks = sidecar.architecture.blocks();
        if sidecar.architecture.mechanism.kind_name() == "static" {
            Some(format!("defense `{}` (a compute budget) meets model `{}`, which is static: nothing to cap; add [[exclude]] with model = \"{}\" and defense = \"{}\"", c.defense.label, c.model.name, c.model.name, c.defense.label))
        } else {
            (max_blocks > blocks).then(|| format!("defense `{}`: `max_blocks` = {max_blocks}, but model `{}` has {blocks} blocks: expected 0..={blocks}", c.defense.label, c.model.name))
        }
    }

    /// A variant's `exits`: block indices, each an exit of `base` when its sidecar can be read
    /// here (else they are checked when the cells load the model).
    fn check_exits(&self, name: &str, base: &str, exits: &Spanned<Vec<usize>>) -> Result<()> {
        let list = exits.get_ref();
        let positions = self.sidecar_of(base).map(|s| s.architecture.blocks());
        let problem = match (list.iter().max(), positions) {
            (None, _) => "expected a non-empty list of block indices".to_string(),
            (Some(&last), Some(n)) if last >= n => format!("`{base}` has an exit after each of its {n} blocks: expected indices in 0..{n}"),
            (Some(&last), None) if last > 63 => "expected block indices".to_string(),
            _ => return Ok(()),
        };
        Err(self.err(&exits.span(), format!("variant `{name}`: `exits` = {list:?}: {problem}")))
    }

    /// `base`, else `train.model`; either must be a registry model (or a directory for `base`).
    fn variant_base(&self, name: &str, v: &RawVariant) -> Result<String> {
        let train_model = v.train.as_ref().and_then(|t| t.get_ref().get("model").map(|m| (t.span(), m)));
        if let Some((span, m)) = &train_model {
            let ok = m.as_str().is_some_and(|s| self.registry.models.iter().any(|r| r == s));
            if !ok {
                let valid = self.registry.models.join(", ");
                return Err(self.err(span, format!("variant `{name}`: `train.model` = {m}: expected one of: {valid}")));
            }
        }
        match (&v.base, train_model) {
            (Some(b), _) => Ok(self.model_ref("variants.base", b, &BTreeMap::new())?.base),
            (None, Some((_, m))) => Ok(m.as_str().unwrap_or_default().to_string()),
            (None, None) => Err(self.err(&v.name.span(), format!("variant `{name}`: set `base` or `train.model`"))),
        }
    }

    fn plugin(&self, kind: &str, key: &str, name: &Spanned<String>, valid: &[String]) -> Result<String> {
        let n = name.get_ref();
        if valid.iter().any(|v| v == n) {
            return Ok(n.clone());
        }
        let hint = dynrobust_core::error::did_you_mean(n, valid.iter().map(String::as_str));
        Err(self.err(&name.span(), format!("`{key}`: unknown {kind} `{n}`{hint}; expected one of: {}", valid.join(", "))))
    }

    fn label(&self, label: &Option<Spanned<String>>, name: &Spanned<String>, seen: &mut BTreeSet<String>, key: &str) -> Result<String> {
        let text = label.as_ref().unwrap_or(name).get_ref().trim().to_string();
        let span = label.as_ref().unwrap_or(name).span();
        if text.is_empty() {
            return Err(self.err(&span, format!("`{key}.label` must not be empty")));
        }
        if !seen.insert(text.clone()) {
            return Err(self.err(&span, format!("`{key}`: label `{text}` is used twice; give the entries distinct `label`s")));
        }
        Ok(text)
    }

    fn defenses(&self, raw: &RawStudy) -> Result<Vec<DefenseRef>> {
        let Some(list) = &raw.defenses else {
            let params = serde_json::json!({});
            return Ok(vec![DefenseRef { name: "none".into(), label: "none".into(), mode: None, params }]);
        };
        self.non_empty("defenses", list)?;
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for d in list.get_ref() {
            let d = d.get_ref();
            let name = self.plugin("defense", "defenses.name", &d.name, &self.registry.defenses)?;
            let label = self.label(&d.label, &d.name, &mut seen, "defenses")?;
            let params = d.params.as_ref().map_or(Ok(serde_json::json!({})), |p| self.table(p, "defenses.params"))?;
            let span = d.params_span();
            let spec = self.check_defense(&name, &params, &span, "defenses.params")?;
            for mode in self.modes(&name, d, spec.as_ref())? {
                out.push(DefenseRef { name: name.clone(), label: label.clone(), mode, params: params.clone() });
            }
        }
        Ok(out)
    }

    /// `spec`: the parsed defense (`None` for a name outside the defenses registry).
    fn modes(&self, name: &str, d: &RawDefense, spec: Option<&dynrobust_defenses::registry::DefenseSpec>) -> Result<Vec<Option<DefenseMode>>> {
        if name == "none" {
            if let Some(span) = d.modes.as_ref().map(|m| m.span()).or(d.params.as_ref().map(|p| p.span())) {
                return Err(self.err(&span, "defense `none` takes no `modes` or `params`"));
            }
            return Ok(vec![None]);
        }
        // a defense with no adaptive attacker (the cost monitor) defaults to oblivious cells
        let adaptive_refused = spec.and_then(|s| s.check_mode(dynrobust_core::defense::Adaptivity::Adaptive).err());
        let oblivious_refused = spec.and_then(|s| s.check_mode(dynrobust_core::defense::Adaptivity::Oblivious).err());
        let default = if adaptive_refused.is_some() { DefenseMode::Oblivious } else { DefenseMode::Adaptive };
        let Some(modes) = &d.modes else { return Ok(vec![Some(default)]) };
        self.non_empty("defenses.modes", modes)?;
        let mut out = Vec::new();
        for m in modes.get_ref() {
            let mode = DefenseMode::parse(m.get_ref()).ok_or_else(|| {
                self.err(&m.span(), format!("`defenses.modes`: unknown mode `{}`; expected one of: adaptive, oblivious", m.get_ref()))
            })?;
            if let (Some(why), DefenseMode::Adaptive) = (&adaptive_refused, mode) {
                return Err(self.err(&m.span(), format!("`defenses.modes`: `adaptive` for `{name}`: {why}; drop `modes` or use [\"oblivious\"]")));
            }
            if let (Some(why), DefenseMode::Oblivious) = (&oblivious_refused, mode) {
                return Err(self.err(&m.span(), format!("`defenses.modes`: `oblivious` for `{name}`: {why}")));
            }
            if out.contains(&Some(mode)) {
                return Err(self.err(&m.span(), format!("`defenses.modes`: `{}` is listed twice", m.get_ref())));
            }
            out.push(Some(mode));
        }
        Ok(out)
    }

    fn attacks(&self, raw: &RawStudy, models: &Models, eps: &[Option<f64>]) -> Result<Vec<AttackPlan>> {
        self.non_empty("attacks", &raw.attacks)?;
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for a in raw.attacks.get_ref() {
            let a = a.get_ref();
            let name = self.plugin("attack", "attacks.name", &a.name, &self.registry.attacks)?;
            let label = self.label(&a.label, &a.name, &mut seen, "attacks")?;
            let params = self.params(&a.params, "attacks.params")?;
            let span = a.params.as_ref().map_or_else(|| a.name.span(), |p| p.span());
            self.check_attack(&name, &params, &span, "attacks.params")?;
            let eps = match &a.eps {
                Some(list) => self.eps_list("attacks.eps", list)?,
                None if self.registry.eps_free.contains(&name) => vec![None],
                None => eps.to_vec(),
            };
            let surrogates = self.surrogates(a, models)?;
            out.push(AttackPlan { attack: AttackRef { name, label, params }, eps, surrogates });
        }
        Ok(out)
    }

    /// Attack parameters as a JSON object; ε is a grid axis and may not hide in here.
    fn params(&self, params: &Option<Spanned<toml::Table>>, key: &str) -> Result<serde_json::Value> {
        let Some(p) = params else { return Ok(serde_json::json!({})) };
        if p.get_ref().contains_key("eps") {
            return Err(self.err(&p.span(), format!("`{key}.eps`: set ε with the study's `eps` list (or the attack's own `eps = [...]`)")));
        }
        self.table(p, key)
    }

    fn surrogates(&self, a: &RawAttack, models: &Models) -> Result<Vec<Option<ModelRef>>> {
        let Some(list) = &a.surrogates else { return Ok(vec![None]) };
        self.non_empty("attacks.surrogates", list)?;
        let mut out: Vec<Option<ModelRef>> = Vec::new();
        for s in list.get_ref() {
            let m = match s.get_ref().as_str() {
                "self" => None,
                _ => Some(self.model_ref("attacks.surrogates", s, &models.known)?),
            };
            if out.contains(&m) {
                return Err(self.err(&s.span(), format!("`attacks.surrogates`: `{}` is listed twice", s.get_ref())));
            }
            out.push(m);
        }
        Ok(out)
    }

    fn apply_override(&self, o: &Spanned<RawOverride>, axes: &Axes, configs: &mut [CellConfig]) -> Result<()> {
        let raw = o.get_ref();
        let filter = self.filter_of(&raw.matcher, axes, "overrides.match")?;
        if raw.params.is_none() && raw.defense_params.is_none() {
            return Err(self.err(&o.span(), "`overrides`: set `params` and/or `defense_params`"));
        }
        let params = raw.params.as_ref().map(|_| self.params(&raw.params, "overrides.params")).transpose()?;
        let defense_params = raw.defense_params.as_ref().map(|p| self.table(p, "overrides.defense_params")).transpose()?;
        let span_of = |t: &Option<Spanned<toml::Table>>| t.as_ref().map_or_else(|| o.span(), |t| t.span());
        let mut matched = 0;
        for c in configs.iter_mut().filter(|c| filter.matches(c)) {
            matched += 1;
            if let Some(p) = &params {
                merge_object(&mut c.attack.params, p);
                self.check_attack(&c.attack.name, &c.attack.params, &span_of(&raw.params), "overrides.params")?;
            }
            if let Some(p) = &defense_params {
                merge_object(&mut c.defense.params, p);
                self.check_defense(&c.defense.name, &c.defense.params, &span_of(&raw.defense_params), "overrides.defense_params")?;
            }
        }
        if matched == 0 {
            return Err(self.err(&raw.matcher.span(), "`overrides.match` matches no cell of the grid (each value exists, but not together): the override would change nothing"));
        }
        Ok(())
    }

    /// Refuses an override whose every matched cell `[[exclude]]` or `[[include]]` removed:
    /// it would change nothing, most likely not what its author meant.
    fn check_overrides_survive(&self, raw: &RawStudy, axes: &Axes, configs: &[CellConfig]) -> Result<()> {
        for o in &raw.overrides {
            let filter = self.filter_of(&o.get_ref().matcher, axes, "overrides.match")?;
            if !configs.iter().any(|c| filter.matches(c)) {
                return Err(self.err(&o.get_ref().matcher.span(), "`overrides.match` matches only cells that `exclude` / `include` remove: the override would change nothing"));
            }
        }
        Ok(())
    }

    /// Builds the attack's config now (unknown keys, bad values), so a study is refused at
    /// load with the place, not cell by cell once it runs. Names outside dynrobust's own
    /// registry (a test's) are left to the runner.
    fn check_attack(&self, name: &str, params: &serde_json::Value, span: &Span, key: &str) -> Result<()> {
        if !dynrobust_attacks::registry::names().contains(&name) {
            return Ok(());
        }
        dynrobust_attacks::registry::build(name, params)
            .and_then(|a| dynrobust_attacks::evaluate::check_budget(&*a))
            .map_err(|e| self.err(span, format!("`{key}` of attack `{name}`: {e}")))
    }

    /// As [`Self::check_attack`], for a defense's params (a training-time defense's checkpoint
    /// path may hold `{model}`, filled in per cell, so only its keys are checked here).
    /// The parsed defense, or its error located at `span`; `None` for a name outside the
    /// defenses registry.
    fn check_defense(&self, name: &str, params: &serde_json::Value, span: &Span, key: &str) -> Result<Option<dynrobust_defenses::registry::DefenseSpec>> {
        if !dynrobust_defenses::registry::names().contains(&name) {
            return Ok(None);
        }
        dynrobust_defenses::registry::DefenseSpec::parse(name, params).map(Some).map_err(|e| self.err(span, format!("`{key}` of defense `{name}`: {e}")))
    }

    /// Defense × attack pairs that cannot run, refused at load rather than cell by cell:
    /// feature squeezing's `penalty` attacker refines inside the attack's ε-ball, so every
    /// attack it meets adaptively needs one (ILFO's faithful box has none).
    fn check_pairs(&self, raw: &RawStudy, configs: &[CellConfig]) -> Result<()> {
        use dynrobust_defenses::registry::DefenseSpec;
        let span_of = |label: &str| {
            let entry = raw.defenses.iter().flat_map(|l| l.get_ref()).map(|d| d.get_ref()).find(|d| d.label.as_ref().unwrap_or(&d.name).get_ref() == label);
            entry.map_or(0..0, RawDefense::params_span)
        };
        for c in configs {
            let spec = DefenseSpec::parse(&c.defense.name, &c.defense.params);
            // a training-time defense's checkpoint, with `{model}` filled in, must exist
            if let Ok(DefenseSpec::Trained { checkpoint: path, .. }) = &spec {
                let filled = path.replace("{model}", &c.model.base);
                if dynrobust_models::checkpoint::resolve(&filled).is_err() {
                    let why = format!("defense `{}`: checkpoint `{path}` for model `{}` is `{filled}`, which is no checkpoint (`{{model}}` is the only placeholder)", c.defense.label, c.model.name);
                    return Err(self.err(&span_of(&c.defense.label), why));
                }
            }
            // ε comes from the study's lists, so the budget is checked with it here
            if dynrobust_attacks::registry::names().contains(&c.attack.name.as_str()) {
                if let Err(e) = dynrobust_attacks::registry::build(&c.attack.name, &c.attack_params()).and_then(|a| dynrobust_attacks::evaluate::check_budget(&*a)) {
                    let entry = raw.attacks.get_ref().iter().map(|a| a.get_ref()).find(|a| a.label.as_ref().unwrap_or(&a.name).get_ref() == &c.attack.label);
                    let span = entry.and_then(|a| a.eps.as_ref().map(|e| e.span())).or(raw.eps.as_ref().map(|e| e.span())).unwrap_or(0..0);
                    return Err(self.err(&span, format!("attack `{}`: {e}", c.attack.label)));
                }
            }
            // a compute budget caps gates or exits: a static model has neither, and it can
            // allow at most the model's blocks
            if let Ok(DefenseSpec::Budget(cfg)) = &spec {
                if let Some(why) = self.budget_problem(c, cfg.max_blocks) {
                    return Err(self.err(&span_of(&c.defense.label), why));
                }
            }
        }
        for c in configs.iter().filter(|c| c.defense.name == "squeeze" && c.defense.mode == Some(DefenseMode::Adaptive)) {
            let Ok(DefenseSpec::Squeeze(cfg)) = DefenseSpec::parse("squeeze", &c.defense.params) else { continue };
            if cfg.attacker != dynrobust_defenses::squeeze::SqueezeAttacker::Penalty || !dynrobust_attacks::registry::names().contains(&c.attack.name.as_str()) {
                continue;
            }
            let has_ball = dynrobust_attacks::registry::build(&c.attack.name, &c.attack_params()).map(|a| a.budget().is_some()).unwrap_or(true);
            if !has_ball {
                let why = format!(
                    "defense `{label}` (attacker = \"penalty\") meets attack `{attack}`, which has no ε-ball to refine in; add [[exclude]] with attack = \"{attack}\" and defense = \"{label}\", or use attacker = \"best\"",
                    label = c.defense.label,
                    attack = c.attack.label
                );
                return Err(self.err(&span_of(&c.defense.label), why));
            }
        }
        Ok(())
    }

    fn filter(&self, raw: &RawStudy, axes: &Axes, configs: Vec<CellConfig>) -> Result<Vec<CellConfig>> {
        let include = raw.include.iter().map(|f| self.filter_of(f, axes, "include")).collect::<Result<Vec<_>>>()?;
        let exclude = raw.exclude.iter().map(|f| self.filter_of(f, axes, "exclude")).collect::<Result<Vec<_>>>()?;
        for (key, raws, filters) in [("include", &raw.include, &include), ("exclude", &raw.exclude, &exclude)] {
            if let Some((r, _)) = raws.iter().zip(filters.iter()).find(|(_, f)| !configs.iter().any(|c| f.matches(c))) {
                return Err(self.err(&r.span(), format!("`[[{key}]]` matches no cell of the grid (each value exists, but not together): it would change nothing")));
            }
        }
        let before = configs.len();
        let kept: Vec<CellConfig> = configs
            .into_iter()
            .filter(|c| include.is_empty() || include.iter().any(|f| f.matches(c)))
            .filter(|c| !exclude.iter().any(|f| f.matches(c)))
            .collect();
        if kept.is_empty() {
            let span = raw.include.first().or(raw.exclude.first()).map(|f| f.span()).unwrap_or(0..0);
            return Err(self.err(&span, format!("the grid is empty: [[include]]/[[exclude]] filter out all {before} cells")));
        }
        Ok(kept)
    }

    /// Validates a filter: at least one key, and every value one the study actually has.
    fn filter_of(&self, f: &Spanned<RawFilter>, axes: &Axes, key: &str) -> Result<Filter> {
        let raw = f.get_ref();
        let keys: [(&str, &Option<Spanned<OneOrMany>>); 7] = [
            ("model", &raw.model),
            ("attack", &raw.attack),
            ("label", &raw.label),
            ("defense", &raw.defense),
            ("mode", &raw.mode),
            ("surrogate", &raw.surrogate),
            ("eps", &raw.eps),
        ];
        let mut filter = Filter::default();
        for (axis, value) in keys {
            let Some(value) = value else { continue };
            let allowed = axes.values(axis);
            if value.get_ref().0.is_empty() {
                return Err(self.err(&value.span(), format!("`{key}.{axis}` is empty: expected a value or a non-empty list")));
            }
            let mut accepted = BTreeSet::new();
            for written in &value.get_ref().0 {
                let v = match axis {
                    "eps" => normalised_eps(written).map_err(|why| self.err(&value.span(), format!("`{key}.eps`: {why}")))?,
                    // a checkpoint path, spelled as the grid spells it (see `model_ref`)
                    "model" | "surrogate" if !allowed.contains(written) => canonical_path_name(written).filter(|c| allowed.contains(c)).unwrap_or_else(|| written.clone()),
                    _ => written.clone(),
                };
                if !allowed.contains(&v) {
                    let all: Vec<&str> = allowed.iter().map(String::as_str).collect();
                    let why = format!("`{key}.{axis}`: no {axis} `{written}` in this study; expected one of: {}", all.join(", "));
                    return Err(self.err(&value.span(), why));
                }
                accepted.insert(v);
            }
            filter.keys.insert(axis, accepted);
        }
        if filter.keys.is_empty() {
            return Err(self.err(&f.span(), format!("`{key}` has no keys; use {}", AXES.join(", "))));
        }
        Ok(filter)
    }
}

/// The values each filterable axis takes in the unfiltered grid.
struct Axes(BTreeMap<&'static str, BTreeSet<String>>);

impl Axes {
    fn of(configs: &[CellConfig]) -> Axes {
        let mut m: BTreeMap<&'static str, BTreeSet<String>> = BTreeMap::new();
        for c in configs {
            for axis in AXES {
                m.entry(axis).or_default().extend(axis_values(c, axis));
            }
        }
        Axes(m)
    }

    fn values(&self, axis: &str) -> BTreeSet<String> {
        self.0.get(axis).cloned().unwrap_or_default()
    }
}

const AXES: [&str; 7] = ["model", "attack", "label", "defense", "mode", "surrogate", "eps"];

/// A filter's ε as the `eps` axis spells it: `"none"` as is, anything else parsed (`"8/255"`,
/// `"0.0313725490196"`) and formatted by [`format_eps`], so both spellings match.
fn normalised_eps(written: &str) -> std::result::Result<String, String> {
    if written == "none" {
        return Ok(written.to_string());
    }
    parse_eps(&RawEps::Text(written.to_string())).map(format_eps)
}

/// The values by which a filter key can match cell `c` on `axis`.
fn axis_values(c: &CellConfig, axis: &str) -> Vec<String> {
    match axis {
        "model" => vec![c.model.name.clone()],
        "attack" => vec![c.attack.name.clone()],
        "label" => vec![c.attack.label.clone()],
        "defense" => vec![c.defense.name.clone(), c.defense.label.clone()],
        "mode" => c.defense.mode.map(|m| vec![m.as_str().to_string()]).unwrap_or_default(),
        "surrogate" => vec![c.surrogate.as_ref().map_or("self".to_string(), |s| s.name.clone())],
        "eps" => vec![c.eps.map_or("none".to_string(), format_eps)],
        _ => Vec::new(),
    }
}

/// A validated filter: axis → accepted values.
#[derive(Default)]
struct Filter {
    keys: BTreeMap<&'static str, BTreeSet<String>>,
}

impl Filter {
    fn matches(&self, c: &CellConfig) -> bool {
        self.keys.iter().all(|(axis, accepted)| axis_values(c, axis).iter().any(|v| accepted.contains(v)))
    }
}

/// The full cross product (surrogate equal to the cell's model is white-box: `None`). A
/// transfer attack crafts on its surrogate, which knows nothing of the victim's defense: its
/// defended cells are oblivious whatever modes the defense lists (the adaptive twin would be
/// the same experiment under a wrong label; `finish` merges them).
fn cross(base: &Base, models: &[ModelRef], defenses: &[DefenseRef], attacks: &[AttackPlan]) -> Vec<CellConfig> {
    let mut out = Vec::new();
    for model in models {
        for defense in defenses {
            for plan in attacks {
                for surrogate in &plan.surrogates {
                    let surrogate = surrogate.clone().filter(|s| s.name != model.name);
                    let mut defense = defense.clone();
                    if surrogate.is_some() && defense.mode.is_some() {
                        defense.mode = Some(DefenseMode::Oblivious);
                    }
                    for eps in &plan.eps {
                        for seed in &base.seeds {
                            out.push(CellConfig {
                                data: base.data.clone(),
                                n: base.n,
                                batch: base.batch,
                                seed: *seed,
                                eps: *eps,
                                model: model.clone(),
                                surrogate: surrogate.clone(),
                                attack: plan.attack.clone(),
                                defense: defense.clone(),
                            });
                        }
                    }
                }
            }
        }
    }
    out
}

/// Ids, duplicates removed (the same experiment reached twice), deterministic order.
fn finish(configs: Vec<CellConfig>) -> Vec<Cell> {
    let mut by_id: BTreeMap<String, Cell> = BTreeMap::new();
    for c in configs {
        let cell = Cell::new(c);
        by_id.entry(cell.id.clone()).or_insert(cell);
    }
    let mut cells: Vec<Cell> = by_id.into_values().collect();
    cells.sort_by_cached_key(sort_key);
    cells
}

type SortKey = (String, String, Option<DefenseMode>, String, String, Option<u64>, u64, String);

fn sort_key(c: &Cell) -> SortKey {
    let k = &c.config;
    (
        k.model.name.clone(),
        k.defense.label.clone(),
        k.defense.mode,
        k.attack.label.clone(),
        k.surrogate.as_ref().map_or(String::new(), |s| s.name.clone()),
        k.eps.map(f64::to_bits), // ε ≥ 0, so the bit pattern orders like the value
        k.seed,
        c.id.clone(),
    )
}

/// `8/255`, `0.1`, 0.1 → 0.0313…, 0.1; refuses negatives, non-finite values and bad fractions.
fn parse_eps(raw: &RawEps) -> std::result::Result<f64, String> {
    let value = match raw {
        RawEps::Num(v) => *v,
        RawEps::Text(t) => {
            let num = |s: &str| s.trim().parse::<f64>().map_err(|_| format!("{t:?} is not a number or a fraction like \"8/255\""));
            match t.split_once('/') {
                Some((a, b)) => {
                    let (a, b) = (num(a)?, num(b)?);
                    if b == 0.0 {
                        return Err(format!("{t:?} divides by zero"));
                    }
                    a / b
                }
                None => num(t)?,
            }
        }
    };
    if !value.is_finite() || value < 0.0 {
        return Err(format!("ε = {value} must be finite and ≥ 0"));
    }
    Ok(value)
}

fn table_json(t: &toml::Table) -> serde_json::Value {
    serde_json::to_value(t).expect("a TOML table is always representable as JSON")
}

/// The dotted path of the first `nan` or `inf` in `t`: JSON has no such numbers (they would
/// become `null`, i.e. "not set", and the plugin's default would silently take their place).
fn non_finite_key(t: &toml::Table) -> Option<String> {
    fn walk(path: String, v: &toml::Value) -> Option<String> {
        match v {
            toml::Value::Float(f) if !f.is_finite() => Some(format!("{path} = {f}")),
            toml::Value::Table(t) => t.iter().find_map(|(k, v)| walk(format!("{path}.{k}"), v)),
            toml::Value::Array(a) => a.iter().enumerate().find_map(|(i, v)| walk(format!("{path}[{i}]"), v)),
            _ => None,
        }
    }
    t.iter().find_map(|(k, v)| walk(k.clone(), v))
}

/// Shallow merge: keys of `over` replace those of `base` (both JSON objects).
fn merge_object(base: &mut serde_json::Value, over: &serde_json::Value) {
    if let (Some(b), Some(o)) = (base.as_object_mut(), over.as_object()) {
        for (k, v) in o {
            b.insert(k.clone(), v.clone());
        }
    }
}
