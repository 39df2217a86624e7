//! The one error type of the dynrobust library crates.
//!
//! Every variant names the thing that is wrong (a file, a field, a tensor) and what was
//! expected, so a user can fix the input without reading code.

use std::path::PathBuf;

/// Result alias used throughout the library crates.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the library crates.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A data file exists but its content is not what the format requires.
    #[error("{}: {problem}", path.display())]
    Data { path: PathBuf, problem: String },

    /// A data set could not be found at all.
    #[error("{0}")]
    DataMissing(String),

    /// A checkpoint or its sidecar is missing, malformed or does not fit the architecture.
    #[error("checkpoint {}: {problem}", path.display())]
    Checkpoint { path: PathBuf, problem: String },

    /// A configuration value is invalid; `field` is the dotted path of the offending field, or
    /// for a study file the `FILE:LINE:COLUMN` it sits at (shown as a compiler shows one).
    #[error("{}", config_message(field, problem))]
    Config { field: String, problem: String },

    /// A model was asked for something it cannot do (e.g. exits on a gated model).
    #[error("model {model}: {problem}")]
    Model { model: String, problem: String },

    /// An error raised by libtorch (shown without its C++ stack, see [`libtorch_message`]).
    #[error("torch: {}", libtorch_message(&.0.to_string()))]
    Torch(#[from] tch::TchError),

    /// An I/O error on a named path.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    /// A JSON (de)serialisation error.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

/// ` (did you mean `deepsloth`?)` when one of `candidates` is within a couple of typos of
/// `name`, ignoring case (edit distance ≤ 2 and at most half the name's length less one, but
/// always 1 allowed), else empty: appended to an "unknown name" message.
pub fn did_you_mean<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    let distance = |a: &str, b: &str| {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut prev = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let here = row[j + 1];
                row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(here + 1);
                prev = here;
            }
        }
        row[b.len()]
    };
    let limit = 2.min(name.chars().count().saturating_sub(1) / 2);
    candidates
        .into_iter()
        .map(|c| (distance(&name.to_lowercase(), &c.to_lowercase()), c))
        .filter(|(d, c)| *d <= limit.max(1) && *c != name)
        .min()
        .map_or(String::new(), |(_, c)| format!(" (did you mean `{c}`?)"))
}

/// `invalid config: field `steps`: …`, or `study.toml:5:1: …` when the field is a place in a
/// file (`FILE:LINE:COLUMN`).
fn config_message(field: &str, problem: &str) -> String {
    let mut parts = field.rsplitn(3, ':');
    let (column, line, file) = (parts.next(), parts.next(), parts.next());
    let is_number = |s: Option<&str>| s.is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
    if is_number(column) && is_number(line) && file.is_some_and(|f| !f.is_empty()) {
        format!("{field}: {problem}")
    } else {
        format!("invalid config: field `{field}`: {problem}")
    }
}

impl Error {
    /// A config error on `field`.
    pub fn config(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Error::Config { field: field.into(), problem: problem.into() }
    }

    /// A model error about the model named `own` (its [`crate::DynamicModel::name`], e.g. its
    /// family `gated`) under the name the user wrote as well (a path, a study's variant):
    /// `model runs/x/my-gated (gated): …`. Errors about other models (a surrogate's), other
    /// errors, and names that already say what was written (`sdn(twin)` for `sdn`) are left
    /// as they are.
    pub fn for_model(self, own: &str, written: &str) -> Self {
        match self {
            Error::Model { model, problem } if model == own && !own.contains(written) => Error::Model { model: format!("{written} ({model})"), problem },
            other => other,
        }
    }

    /// A safetensors file that could not be read, in words: what went wrong (without the
    /// safetensors crate's enum names or libtorch's C++ stack) and what the file should be,
    /// e.g. "the weights `dynrobust train` writes".
    pub fn unreadable_safetensors(path: impl Into<PathBuf>, expected: &str, e: &tch::TchError) -> Self {
        let why = match e {
            tch::TchError::SafeTensorError { err, .. } => safetensors_reason(err),
            other => libtorch_message(&other.to_string()),
        };
        Error::checkpoint(path, format!("not a readable safetensors file: {why}; expected {expected}"))
    }

    /// This error as one of a nested config's: a config error's field becomes
    /// `prefix.field` (e.g. `steps[1].bits`); other errors are left as they are.
    pub fn within(self, prefix: &str) -> Self {
        match self {
            Error::Config { field, problem } => Error::Config { field: format!("{prefix}.{field}"), problem },
            other => other,
        }
    }

    /// A data-format error on `path`.
    pub fn data(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        Error::Data { path: path.into(), problem: problem.into() }
    }

    /// A checkpoint error on `path`.
    pub fn checkpoint(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        Error::Checkpoint { path: path.into(), problem: problem.into() }
    }

    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

/// The safetensors crate's error in words.
fn safetensors_reason(err: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match err {
        E::HeaderTooLarge | E::HeaderTooSmall | E::InvalidHeaderLength => {
            "the length at the start of the file is not a safetensors header's: truncated or not a safetensors file".into()
        }
        E::InvalidHeader | E::InvalidHeaderStart | E::InvalidHeaderDeserialization | E::JsonError(_) => "the header is not the JSON table of tensors".into(),
        E::MetadataIncompleteBuffer | E::InvalidOffset(_) => "the file is shorter than its header says: truncated".into(),
        E::TensorInvalidInfo | E::InvalidTensorView(..) | E::ValidationOverflow => "a tensor's shape, dtype and byte range disagree".into(),
        E::TensorNotFound(name) => format!("tensor `{name}` is listed but not found"),
        E::IoError(io) => format!("the file could not be read: {io}"),
    }
}

/// libtorch's own message without what follows it for C++ developers: the text from
/// `Exception raised from …` on (the source location and the stack frames) is cut, as is the
/// `Internal torch error: ` prefix tch puts in front. Text that is not libtorch's passes
/// through unchanged.
pub fn libtorch_message(text: &str) -> String {
    let head = match text.find("Exception raised from") {
        Some(at) => &text[..at],
        None => text,
    };
    // a panic's text holds the error's Debug form, where the newline before the cut is `\\n`
    let head = head.trim_end();
    let head = head.strip_suffix("\\n").unwrap_or(head);
    head.replace("Internal torch error: ", "").trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::{libtorch_message, Error};

    #[test]
    fn a_near_miss_name_is_suggested() {
        let names = ["deepsloth", "deepsloth-l2", "gradmdm", "sdn", "static"];
        assert_eq!(super::did_you_mean("deepslot", names), " (did you mean `deepsloth`?)");
        assert_eq!(super::did_you_mean("sdnn", names), " (did you mean `sdn`?)");
        assert_eq!(super::did_you_mean("gradmd", names), " (did you mean `gradmdm`?)");
        assert_eq!(super::did_you_mean("xyz", names), "", "nothing close");
        assert_eq!(super::did_you_mean("DeepSloth", names), " (did you mean `deepsloth`?)", "case aside");
        assert_eq!(super::did_you_mean("sdn", names), "", "an exact name needs no suggestion");
    }

    #[test]
    fn a_config_error_in_a_study_file_reads_as_its_place() {
        let at = Error::config("runs/my study.toml:5:1", "unknown field `workers`").to_string();
        assert_eq!(at, "runs/my study.toml:5:1: unknown field `workers`");
        let field = Error::config("steps[1].bits", "expected 1–8").to_string();
        assert_eq!(field, "invalid config: field `steps[1].bits`: expected 1–8");
        assert!(Error::config("a:b", "x").to_string().starts_with("invalid config: field `a:b`"));
    }

    #[test]
    fn libtorch_text_loses_its_cxx_stack() {
        let raw = "Internal torch error: PytorchStreamReader failed reading zip archive: not a ZIP archive\nException raised from valid at inline_container.cc:242 (most recent call first):\nframe #0: c10::Error::Error(...)";
        assert_eq!(libtorch_message(raw), "PytorchStreamReader failed reading zip archive: not a ZIP archive");
        let panic = r#"called `Result::unwrap()` on an `Err` value: Torch("Target 100 is out of bounds.\nException raised from operator() at LossNLL.cpp:200 (most recent call first):\nframe #0"#;
        assert_eq!(libtorch_message(panic), r#"called `Result::unwrap()` on an `Err` value: Torch("Target 100 is out of bounds."#);
        assert_eq!(libtorch_message("field `n`: expected ≥ 1"), "field `n`: expected ≥ 1");
    }
}
