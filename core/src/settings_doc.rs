//! What each setting of a plugin's config means, read from the config's JSON schema: the
//! field's doc comment and, for a setting with named values, each value with its own doc
//! (`schemars` derives the schema from the same doc comments rustdoc shows). This is what
//! `dynrobust list attacks NAME` and `list defenses NAME` print beside the defaults.

use std::collections::BTreeMap;

use serde_json::Value;

/// The documentation of one setting.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SettingDoc {
    /// The field's doc comment on one line, rustdoc link brackets removed (empty when the
    /// field has none).
    pub description: String,
    /// The values a setting with named values takes, in JSON notation (`"fixed"`), each with
    /// its doc (empty otherwise).
    pub choices: Vec<(String, String)>,
}

/// Every top-level setting of config type `T`, by its serialised name.
pub fn setting_docs<T: schemars::JsonSchema>() -> BTreeMap<String, SettingDoc> {
    let schema = schemars::schema_for!(T);
    let root = schema.as_value();
    let defs = root.get("$defs").cloned().unwrap_or(Value::Null);
    let properties = root.get("properties").and_then(Value::as_object).cloned().unwrap_or_default();
    properties
        .into_iter()
        .map(|(key, property)| {
            let description = property.get("description").and_then(Value::as_str).map(plain_text).unwrap_or_default();
            let mut choices = Vec::new();
            collect_choices(&property, &defs, &mut choices);
            (key, SettingDoc { description, choices })
        })
        .collect()
}

/// The named values `schema` allows (a `oneOf` of consts or an `enum`), following `$ref`s
/// into `defs` and the branches of an `anyOf` (an optional enum).
fn collect_choices(schema: &Value, defs: &Value, out: &mut Vec<(String, String)>) {
    if let Some(name) = schema.get("$ref").and_then(Value::as_str).and_then(|r| r.strip_prefix("#/$defs/")) {
        if let Some(target) = defs.get(name) {
            collect_choices(target, defs, out);
        }
    }
    for branch in ["oneOf", "anyOf"].iter().filter_map(|k| schema.get(*k).and_then(Value::as_array)).flatten() {
        match branch.get("const") {
            Some(value) => out.push((value.to_string(), branch.get("description").and_then(Value::as_str).map(plain_text).unwrap_or_default())),
            None => collect_choices(branch, defs, out),
        }
    }
    for value in schema.get("enum").and_then(Value::as_array).into_iter().flatten() {
        out.push((value.to_string(), String::new()));
    }
}

/// A doc comment as one line of plain text: line breaks joined, rustdoc's intra-doc link
/// brackets (`` [`Name`] ``, `[text](target)`) reduced to the text.
pub fn plain_text(doc: &str) -> String {
    let joined = doc.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out = String::with_capacity(joined.len());
    let mut rest = joined.as_str();
    while let Some(start) = rest.find('[') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        match after.find(']') {
            Some(end) if after[..end].starts_with('`') && after[..end].ends_with('`') => {
                out.push_str(&after[..end]);
                rest = strip_link_target(&after[end + 1..]);
            }
            Some(end) if after[end + 1..].starts_with('(') => {
                out.push_str(&after[..end]);
                rest = strip_link_target(&after[end + 1..]);
            }
            _ => {
                out.push('[');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// `rest` without a leading `(target)` of a markdown link.
fn strip_link_target(rest: &str) -> &str {
    match rest.strip_prefix('(').and_then(|r| r.find(')').map(|end| &r[end + 1..])) {
        Some(after) => after,
        None => rest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config to read docs from.
    #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Example {
        /// Step size, see [`Example`] and
        /// [the paper](https://example.invalid).
        step: f64,
        /// The norm.
        norm: crate::attack::Norm,
        /// An optional norm.
        other: Option<crate::attack::Norm>,
        undocumented: u32,
    }

    #[test]
    fn docs_come_from_the_doc_comments_with_links_reduced() {
        let docs = setting_docs::<Example>();
        assert_eq!(docs.keys().collect::<Vec<_>>(), ["norm", "other", "step", "undocumented"]);
        assert_eq!(docs["step"].description, "Step size, see `Example` and the paper.");
        assert!(docs["step"].choices.is_empty());
        assert_eq!(docs["undocumented"].description, "");
    }

    #[test]
    fn named_values_are_listed_with_their_docs_also_when_optional() {
        let docs = setting_docs::<Example>();
        let expected = vec![("\"linf\"".to_string(), "L∞ (max absolute pixel change).".to_string()), ("\"l2\"".to_string(), "L2 (Euclidean norm per sample).".to_string())];
        assert_eq!(docs["norm"].description, "The norm.");
        assert_eq!(docs["norm"].choices, expected);
        assert_eq!(docs["other"].choices, expected);
    }

    #[test]
    fn plain_text_keeps_brackets_that_are_not_links() {
        assert_eq!(plain_text("in [0,1] or [`a::b`]"), "in [0,1] or `a::b`");
        assert_eq!(plain_text("a\n  b"), "a b");
    }
}
