//! Warnings for fields upstream has but svcproxy does not act on.

use std::time::Duration;

use serde_json::Value;

use super::ConfigFileError;
use super::fields::Section;

/// Collects warnings for fields that are set (to neither their zero value nor upstream's
/// default) but that svcproxy does not act on; each read still checks the value's type.
#[derive(Default)]
pub(super) struct Unused {
    pub(super) warnings: Vec<String>,
}

impl Unused {
    /// Records that `field` holds `value`, which is ignored.
    pub(super) fn warn(&mut self, field: &str, value: &str) {
        self.warnings.push(format!(
            "{field}: set to {value}, which svcproxy does not act on; ignored"
        ));
    }

    /// A string field: warned unless empty or one of `defaults`.
    pub(super) fn string(
        &mut self,
        s: &Section,
        key: &str,
        defaults: &[&str],
    ) -> Result<(), ConfigFileError> {
        if let Some(v) = s.string(key)?.filter(|v| !defaults.contains(v)) {
            self.warn(&s.path_of(key), &format!("{v:?}"));
        }
        Ok(())
    }

    /// A boolean field whose zero value is upstream's default: warned when `true`.
    pub(super) fn set_true(&mut self, s: &Section, key: &str) -> Result<(), ConfigFileError> {
        if s.bool(key)? == Some(true) {
            self.warn(&s.path_of(key), "true");
        }
        Ok(())
    }

    /// An integer field: warned unless absent or one of `defaults`.
    pub(super) fn int(
        &mut self,
        s: &Section,
        key: &str,
        range: std::ops::RangeInclusive<i64>,
        defaults: &[i64],
    ) -> Result<(), ConfigFileError> {
        if let Some(v) = s.int(key, range)?.filter(|v| !defaults.contains(v)) {
            self.warn(&s.path_of(key), &v.to_string());
        }
        Ok(())
    }

    /// A number field: warned unless zero or one of `defaults`.
    pub(super) fn float(
        &mut self,
        s: &Section,
        key: &str,
        defaults: &[f64],
    ) -> Result<(), ConfigFileError> {
        if let Some(v) = s.float(key)?.filter(|v| *v != 0.0 && !defaults.contains(v)) {
            self.warn(&s.path_of(key), &v.to_string());
        }
        Ok(())
    }

    /// A duration field: warned unless zero or one of `defaults`.
    pub(super) fn duration(
        &mut self,
        s: &Section,
        key: &str,
        defaults: &[Duration],
    ) -> Result<(), ConfigFileError> {
        if let Some(d) = s.duration(key)?.filter(|d| !defaults.contains(d)) {
            self.warn(&s.path_of(key), &format!("{d:?}"));
        }
        Ok(())
    }

    /// A list field: warned unless empty.
    pub(super) fn strings(&mut self, s: &Section, key: &str) -> Result<(), ConfigFileError> {
        if let Some(items) = s.strings(key)? {
            self.warn(&s.path_of(key), &items.join(","));
        }
        Ok(())
    }

    /// A resource quantity (`"0"`, `"64Ki"`, or a number): warned unless it is zero.
    pub(super) fn quantity(&mut self, s: &Section, key: &str) -> Result<(), ConfigFileError> {
        let text = match s.raw(key) {
            None => return Ok(()),
            Some(Value::String(t)) => t.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(other) => {
                return Err(ConfigFileError::WrongType {
                    field: s.path_of(key),
                    expected: "a quantity such as \"64Ki\"",
                    found: other.to_string(),
                });
            }
        };
        let digits: String = text
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == '+' || *c == '-')
            .collect();
        let zero = digits.parse::<f64>().is_ok_and(|n| n == 0.0);
        if !zero {
            self.warn(&s.path_of(key), &format!("{text:?}"));
        }
        Ok(())
    }
}
