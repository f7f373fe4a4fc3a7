//! Removing every chain and jump rule svcproxy (or upstream kube-proxy) installed.
//!
//! One restore batch per table: delete the jumps from built-in chains, flush every kube
//! chain, then delete them. Afterwards the tables are read again and anything left is an
//! error, so `svcproxy --cleanup` exits 0 only when nothing is left.

use std::fmt::Write as _;

use super::edge::IptablesEdge;
use super::save::{SavedTables, is_builtin};
use super::{
    KUBE_EXTERNAL_SERVICES, KUBE_FIREWALL, KUBE_FORWARD, KUBE_MARK_MASQ, KUBE_NODEPORTS,
    KUBE_POSTROUTING, KUBE_PROXY_CANARY, KUBE_PROXY_FIREWALL, KUBE_SERVICES,
};
use crate::dataplane::BackendError;
use crate::dataplane::naming::is_service_chain;
use crate::model::IpFamily;

/// Tables kube-proxy ever wrote to.
const TABLES: &[&str] = &["filter", "nat", "mangle"];

/// Static chains owned by the proxy (including ones only older upstream versions created).
const OWNED: &[&str] = &[
    KUBE_SERVICES,
    KUBE_EXTERNAL_SERVICES,
    KUBE_NODEPORTS,
    KUBE_POSTROUTING,
    KUBE_MARK_MASQ,
    KUBE_FORWARD,
    KUBE_PROXY_FIREWALL,
    KUBE_FIREWALL,
    KUBE_PROXY_CANARY,
    "KUBE-MARK-DROP",
    "KUBE-LOAD-BALANCER",
];

/// Whether a chain is one the proxy owns and removes on cleanup.
pub fn is_owned_chain(chain: &str) -> bool {
    OWNED.contains(&chain) || is_service_chain(chain)
}

/// The restore batch that removes the proxy's chains from `saved` (empty if none).
pub fn cleanup_batch(saved: &SavedTables) -> String {
    let mut out = String::new();
    for table in TABLES {
        let owned: Vec<&str> = saved
            .chains_of(table)
            .filter(|c| is_owned_chain(c))
            .collect();
        if owned.is_empty() {
            continue;
        }
        let _ = writeln!(out, "*{table}");
        for rule in saved.rules.get(*table).into_iter().flatten() {
            let mut words = rule.split_whitespace();
            let from = words.nth(1).unwrap_or("");
            let target = rule
                .rsplit_once(" -j ")
                .map(|(_, t)| t.split_whitespace().next().unwrap_or(""));
            if is_builtin(from) && target.is_some_and(is_owned_chain) {
                let _ = writeln!(out, "-D{}", &rule[2..]);
            }
        }
        for c in &owned {
            let _ = writeln!(out, ":{c} - [0:0]");
        }
        for c in &owned {
            let _ = writeln!(out, "-X {c}");
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// Removes the proxy's rules of `family` through `edge` and checks nothing is left.
pub fn remove_rules(edge: &mut dyn IptablesEdge, family: IpFamily) -> Result<(), BackendError> {
    let saved = SavedTables::parse(&edge.save(family, None)?);
    let batch = cleanup_batch(&saved);
    if !batch.is_empty() {
        edge.restore(family, &batch, false)?;
    }
    let after = SavedTables::parse(&edge.save(family, None)?);
    let left: Vec<String> = TABLES
        .iter()
        .flat_map(|t| {
            after
                .chains_of(t)
                .filter(|c| is_owned_chain(c))
                .map(move |c| format!("{t}/{c}"))
        })
        .collect();
    if left.is_empty() {
        Ok(())
    } else {
        Err(BackendError::Leftovers(format!(
            "{family:?} chains {}",
            left.join(", ")
        )))
    }
}
