//! Kubernetes objects from YAML/JSON files: `svcproxy render -f`, fixtures and (later) the
//! `--manifests-dir` source.
//!
//! A file may hold several YAML documents and `kind: List` objects. Kinds the proxy does not
//! use are ignored; a document of a used kind that does not deserialize becomes a warning
//! naming the file, the object and the reason, and the rest of the file is still read.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::Value;

/// A Kubernetes object the proxy consumes.
#[derive(Clone, Debug)]
pub enum Object {
    /// A v1 Service.
    Service(Box<Service>),
    /// A discovery.k8s.io/v1 EndpointSlice.
    EndpointSlice(Box<EndpointSlice>),
    /// A v1 Node.
    Node(Box<Node>),
}

/// A file that cannot be read at all.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The path cannot be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid YAML/JSON.
    #[error("{path}: not valid YAML/JSON: {message}")]
    Syntax {
        /// The path.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
}

/// An object that was skipped, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadWarning {
    /// File it came from.
    pub path: PathBuf,
    /// `Kind namespace/name` as far as it could be read.
    pub object: String,
    /// Why it was skipped.
    pub reason: String,
}

impl std::fmt::Display for LoadWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {}: {}",
            self.path.display(),
            self.object,
            self.reason
        )
    }
}

/// Objects read from a set of paths, with warnings for the ones skipped.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    /// Objects in file order.
    pub objects: Vec<Object>,
    /// Skipped objects.
    pub warnings: Vec<LoadWarning>,
}

/// Whether a path looks like a manifest (by extension, not hidden).
pub fn is_manifest_path(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    !hidden && matches!(ext, "yaml" | "yml" | "json")
}

/// The manifest files under `path` (itself if it is a file), recursively, sorted.
pub fn manifest_files(path: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(path).map_err(io)? {
        let p = entry.map_err(io)?.path();
        if p.is_dir() {
            out.extend(manifest_files(&p)?);
        } else if is_manifest_path(&p) {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// Reads every manifest under `paths`.
pub fn load_paths(paths: &[PathBuf]) -> Result<Loaded, LoadError> {
    let mut loaded = Loaded::default();
    for path in paths {
        for file in manifest_files(path)? {
            let part = load_file(&file)?;
            loaded.objects.extend(part.objects);
            loaded.warnings.extend(part.warnings);
        }
    }
    Ok(loaded)
}

/// Reads one manifest file.
pub fn load_file(path: &Path) -> Result<Loaded, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_documents(&text, path)
}

/// YAML limits sized for manifests: the parser's defaults (1024 documents, 250k nodes per
/// file) are meant for config files and would reject a directory generated for thousands of
/// services; depth, alias and anchor limits keep their protective defaults.
fn yaml_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_documents = 1_000_000;
    budget.max_nodes = 100_000_000;
    budget.max_events = 400_000_000;
    budget.max_total_scalar_bytes = 1 << 30;
    budget.max_reader_input_bytes = Some(1 << 30);
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options
}

/// Parses the documents of one file's text; `path` is used in messages only.
pub fn parse_documents(text: &str, path: &Path) -> Result<Loaded, LoadError> {
    let syntax = |message: String| LoadError::Syntax {
        path: path.to_path_buf(),
        message,
    };
    let docs: Vec<Value> = if path.extension().is_some_and(|e| e == "json") {
        vec![serde_json::from_str(text).map_err(|e| syntax(e.to_string()))?]
    } else {
        serde_saphyr::from_multiple_with_options(text, yaml_options())
            .map_err(|e| syntax(e.to_string()))?
    };
    let mut loaded = Loaded::default();
    for doc in docs {
        collect(doc, path, &mut loaded);
    }
    Ok(loaded)
}

fn describe(doc: &Value) -> String {
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("object");
    let meta = doc.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>");
    match meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
    {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

fn collect(doc: Value, path: &Path, out: &mut Loaded) {
    if doc.is_null() {
        return; // empty document, e.g. a trailing `---`
    }
    let kind = doc
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let api_version = doc
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let object = describe(&doc);
    let warn = |out: &mut Loaded, reason: String| {
        out.warnings.push(LoadWarning {
            path: path.to_path_buf(),
            object: object.clone(),
            reason,
        })
    };
    let parsed = match (kind.as_str(), api_version.as_str()) {
        (k, _) if k.ends_with("List") => {
            match doc.get("items").cloned() {
                Some(Value::Array(items)) => items.into_iter().for_each(|i| collect(i, path, out)),
                Some(Value::Null) | None => {}
                Some(_) => warn(out, "items is not a list".into()),
            }
            return;
        }
        ("Service", "v1") => serde_json::from_value(doc).map(|s| Object::Service(Box::new(s))),
        ("EndpointSlice", "discovery.k8s.io/v1") => {
            serde_json::from_value(doc).map(|s| Object::EndpointSlice(Box::new(s)))
        }
        ("Node", "v1") => serde_json::from_value(doc).map(|n| Object::Node(Box::new(n))),
        ("Service" | "EndpointSlice" | "Node", v) => {
            warn(out, format!("unsupported apiVersion {v:?}"));
            return;
        }
        ("", _) => {
            warn(out, "document has no kind".into());
            return;
        }
        _ => {
            tracing::debug!(file = %path.display(), %object, "ignoring kind the proxy does not use");
            return;
        }
    };
    match parsed {
        Ok(o) => out.objects.push(o),
        Err(e) => warn(out, e.to_string()),
    }
}
