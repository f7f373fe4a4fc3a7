//! A path-aware reader over one mapping of the parsed document.
//!
//! Upstream decodes the file strictly into Go structs; here each section is opened with the
//! list of field names upstream's type has, so an unknown or misspelt field (at any depth) is
//! reported with its full path, and every typed read names the field it failed on.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value};

use super::ConfigFileError;
use crate::config::parse_duration;

/// One mapping of the document and the dotted path that leads to it.
pub(super) struct Section<'a> {
    path: String,
    map: &'a Map<String, Value>,
    known: &'static [&'static str],
}

impl<'a> Section<'a> {
    /// Opens `value` (found at `path`) as a mapping whose fields must all be in `known`.
    pub(super) fn open(
        path: String,
        value: &'a Value,
        known: &'static [&'static str],
    ) -> Result<Self, ConfigFileError> {
        let Value::Object(map) = value else {
            return Err(wrong_type(&path, "a mapping", value));
        };
        if let Some(unknown) = map.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(ConfigFileError::UnknownField {
                field: join(&path, unknown),
            });
        }
        Ok(Section { path, map, known })
    }

    /// The dotted path of `key` inside this section (used in errors and warnings).
    pub(super) fn path_of(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// The raw value of `key`; absent and `null` are both `None`, as Go decodes them.
    pub(super) fn raw(&self, key: &str) -> Option<&'a Value> {
        debug_assert!(self.known.contains(&key), "{key} is not in the schema");
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// A nested section; `None` when absent or `null`.
    pub(super) fn section(
        &self,
        key: &str,
        known: &'static [&'static str],
    ) -> Result<Option<Section<'a>>, ConfigFileError> {
        self.raw(key)
            .map(|v| Section::open(self.path_of(key), v, known))
            .transpose()
    }

    /// A string field; `None` when absent, `null` or empty (upstream's "unset").
    pub(super) fn string(&self, key: &str) -> Result<Option<&'a str>, ConfigFileError> {
        match self.raw(key) {
            None => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(other) => Err(wrong_type(&self.path_of(key), "a string", other)),
        }
    }

    /// A boolean field.
    pub(super) fn bool(&self, key: &str) -> Result<Option<bool>, ConfigFileError> {
        match self.raw(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(wrong_type(&self.path_of(key), "true or false", other)),
        }
    }

    /// An integer field that must lie in `range` (Go's int32 / uint32 fields).
    pub(super) fn int(
        &self,
        key: &str,
        range: std::ops::RangeInclusive<i64>,
    ) -> Result<Option<i64>, ConfigFileError> {
        let Some(value) = self.raw(key) else {
            return Ok(None);
        };
        let n = value
            .as_i64()
            .ok_or_else(|| wrong_type(&self.path_of(key), "an integer", value))?;
        if !range.contains(&n) {
            return Err(ConfigFileError::Invalid {
                field: self.path_of(key),
                value: n.to_string(),
                reason: format!("must be within [{}, {}]", range.start(), range.end()),
            });
        }
        Ok(Some(n))
    }

    /// A number field (Go's float32 `qps`).
    pub(super) fn float(&self, key: &str) -> Result<Option<f64>, ConfigFileError> {
        match self.raw(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| wrong_type(&self.path_of(key), "a number", v)),
        }
    }

    /// A Go duration string (`metav1.Duration`); absent, `null` and zero are all `None`,
    /// as upstream's defaulting treats a zero duration as unset.
    pub(super) fn duration(&self, key: &str) -> Result<Option<Duration>, ConfigFileError> {
        match self.raw(key) {
            None => Ok(None),
            Some(Value::String(s)) => {
                let d = parse_duration(s).map_err(|source| ConfigFileError::Duration {
                    field: self.path_of(key),
                    source,
                })?;
                Ok((!d.is_zero()).then_some(d))
            }
            Some(other) => Err(wrong_type(
                &self.path_of(key),
                "a duration string such as \"30s\"",
                other,
            )),
        }
    }

    /// A list of strings; absent, `null` and empty are all `None`.
    pub(super) fn strings(&self, key: &str) -> Result<Option<Vec<&'a str>>, ConfigFileError> {
        let Some(value) = self.raw(key) else {
            return Ok(None);
        };
        let Value::Array(items) = value else {
            return Err(wrong_type(&self.path_of(key), "a list of strings", value));
        };
        let strings = items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                item.as_str().ok_or_else(|| {
                    wrong_type(&format!("{}[{i}]", self.path_of(key)), "a string", item)
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((!strings.is_empty()).then_some(strings))
    }

    /// A list of mappings, each opened with `known` (e.g. `logging.vmodule`).
    pub(super) fn sections(
        &self,
        key: &str,
        known: &'static [&'static str],
    ) -> Result<Vec<Section<'a>>, ConfigFileError> {
        let Some(value) = self.raw(key) else {
            return Ok(Vec::new());
        };
        let Value::Array(items) = value else {
            return Err(wrong_type(&self.path_of(key), "a list", value));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| Section::open(format!("{}[{i}]", self.path_of(key)), item, known))
            .collect()
    }

    /// A map of names to booleans (`featureGates`).
    pub(super) fn bool_map(&self, key: &str) -> Result<BTreeMap<&'a str, bool>, ConfigFileError> {
        let Some(value) = self.raw(key) else {
            return Ok(BTreeMap::new());
        };
        let Value::Object(map) = value else {
            return Err(wrong_type(
                &self.path_of(key),
                "a mapping of names to true/false",
                value,
            ));
        };
        map.iter()
            .map(|(name, v)| match v {
                Value::Bool(b) => Ok((name.as_str(), *b)),
                other => Err(wrong_type(
                    &join(&self.path_of(key), name),
                    "true or false",
                    other,
                )),
            })
            .collect()
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn wrong_type(field: &str, expected: &'static str, found: &Value) -> ConfigFileError {
    ConfigFileError::WrongType {
        field: field.to_string(),
        expected,
        found: found.to_string(),
    }
}
