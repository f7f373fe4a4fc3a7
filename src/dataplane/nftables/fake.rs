//! An in-memory nftables for tests of the backend. It applies svcproxy's transactions with
//! the kernel's rules: all or nothing; rules only in existing chains; jumps, gotos and `@set`
//! references only to existing objects; no deleting a chain or set still referenced; no
//! element added twice with different verdicts, none deleted that is not there.

use std::collections::BTreeMap;

use super::diff::{RULE_CHECKED_CHAINS, TableState};
use super::edge::{CANARY_SET, MANAGED_SETS, NftEdge};
use super::{TABLE, ip_kw};
use crate::dataplane::BackendError;
use crate::model::IpFamily;

/// One fake table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakeTable {
    /// Chain → rules (text as given).
    pub chains: BTreeMap<String, Vec<String>>,
    /// Set or map → key → verdict.
    pub sets: BTreeMap<String, BTreeMap<String, Option<String>>>,
}

/// In-memory tables, keyed by `(family, name)`.
#[derive(Clone, Debug, Default)]
pub struct FakeNft {
    /// The tables.
    pub tables: BTreeMap<(String, String), FakeTable>,
    /// Every transaction received, in order (failed ones included).
    pub transactions: Vec<String>,
    /// Number of `list_table` calls (full listings of the kernel).
    pub listings: usize,
    /// This many next transactions fail (and change nothing).
    pub fail_next: usize,
    /// Transactions containing this text fail (and change nothing).
    pub fail_when_contains: Option<String>,
}

fn fail(msg: String) -> BackendError {
    BackendError::Tool {
        tool: "fake-nft -f -".into(),
        status: "exit status: 1".into(),
        stderr: msg,
    }
}

/// Chains a rule or verdict jumps to.
fn chain_refs(text: &str) -> impl Iterator<Item = &str> {
    let words: Vec<&str> = text.split([' ', ',', '{', '}']).collect();
    let mut out = Vec::new();
    for w in words.windows(2) {
        if w[0] == "goto" || w[0] == "jump" {
            out.push(w[1]);
        }
    }
    out.into_iter()
}

/// Sets a rule refers to (`@name`).
fn set_refs(text: &str) -> impl Iterator<Item = &str> {
    text.split([' ', ',', '{', '}'])
        .filter_map(|w| w.strip_prefix('@'))
}

/// `{ a : b, c : d }` → pairs.
fn parse_elements(body: &str) -> Vec<(String, Option<String>)> {
    let inner = body
        .trim()
        .trim_start_matches('{')
        .trim_end_matches('}')
        .trim();
    inner
        .split(", ")
        .filter(|e| !e.trim().is_empty())
        .map(|e| match e.split_once(" : ") {
            Some((k, v)) => (k.trim().to_string(), Some(v.trim().to_string())),
            None => (e.trim().to_string(), None),
        })
        .collect()
}

impl FakeTable {
    fn referenced_chain(&self, chain: &str) -> bool {
        self.chains
            .values()
            .flatten()
            .any(|r| chain_refs(r).any(|c| c == chain))
            || self
                .sets
                .values()
                .flat_map(|s| s.values().flatten())
                .any(|v| chain_refs(v).any(|c| c == chain))
    }

    fn add_rule(&mut self, chain: &str, rule: &str) -> Result<(), String> {
        for c in chain_refs(rule) {
            if !self.chains.contains_key(c) {
                return Err(format!("rule {rule:?}: no chain {c}"));
            }
        }
        for s in set_refs(rule) {
            if !self.sets.contains_key(s) {
                return Err(format!("rule {rule:?}: no set {s}"));
            }
        }
        self.chains
            .get_mut(chain)
            .ok_or(format!("no chain {chain}"))?
            .push(rule.to_string());
        Ok(())
    }

    fn add_elements(&mut self, set: &str, body: &str) -> Result<(), String> {
        let elems = parse_elements(body);
        for (_, v) in &elems {
            for c in v.iter().flat_map(|v| chain_refs(v)) {
                if !self.chains.contains_key(c) {
                    return Err(format!("element verdict: no chain {c}"));
                }
            }
        }
        let s = self.sets.get_mut(set).ok_or(format!("no set {set}"))?;
        for (k, v) in elems {
            match s.get(&k) {
                Some(old) if *old != v => return Err(format!("{set} {k}: File exists")),
                _ => {
                    s.insert(k, v);
                }
            }
        }
        Ok(())
    }

    fn delete_elements(&mut self, set: &str, body: &str) -> Result<(), String> {
        let s = self.sets.get_mut(set).ok_or(format!("no set {set}"))?;
        for (k, _) in parse_elements(body) {
            s.remove(&k)
                .ok_or(format!("{set} {k}: No such file or directory"))?;
        }
        Ok(())
    }
}

type Tables = BTreeMap<(String, String), FakeTable>;

fn table_mut<'a>(t: &'a mut Tables, fam: &str, name: &str) -> Result<&'a mut FakeTable, String> {
    t.get_mut(&(fam.to_string(), name.to_string()))
        .ok_or(format!("no table {fam} {name}"))
}

/// Applies one flat command (`add chain ip svcproxy X`, ...).
fn apply_command(t: &mut Tables, line: &str) -> Result<(), String> {
    let mut w = line.splitn(5, ' ');
    let (verb, kind, fam, name) = (
        w.next().unwrap_or(""),
        w.next().unwrap_or(""),
        w.next().unwrap_or(""),
        w.next().unwrap_or(""),
    );
    let rest = w.next().unwrap_or("");
    let key = (fam.to_string(), name.to_string());
    match (verb, kind) {
        ("add", "table") => {
            t.entry(key).or_default();
            return Ok(());
        }
        ("delete", "table") => {
            return t
                .remove(&key)
                .map(|_| ())
                .ok_or(format!("delete table {fam} {name}: no such table"));
        }
        _ => {}
    }
    let table = table_mut(t, fam, name)?;
    let (obj, tail) = rest.split_once(' ').unwrap_or((rest, ""));
    match (verb, kind) {
        ("add", "chain") => {
            table.chains.entry(obj.to_string()).or_default();
        }
        ("flush", "chain") => table
            .chains
            .get_mut(obj)
            .ok_or(format!("flush chain {obj}: no such chain"))?
            .clear(),
        ("delete", "chain") => {
            if !table.chains.contains_key(obj) {
                return Err(format!("delete chain {obj}: no such chain"));
            }
            let rules = table.chains.remove(obj).unwrap_or_default();
            if table.referenced_chain(obj) {
                return Err(format!("delete chain {obj}: Device or resource busy"));
            }
            drop(rules);
        }
        ("add", "rule") => table.add_rule(obj, tail)?,
        ("add", "set") | ("add", "map") => {
            table.sets.entry(obj.to_string()).or_default();
        }
        ("delete", "set") | ("delete", "map") => {
            if table
                .chains
                .values()
                .flatten()
                .any(|r| set_refs(r).any(|s| s == obj))
            {
                return Err(format!("delete set {obj}: Device or resource busy"));
            }
            table
                .sets
                .remove(obj)
                .ok_or(format!("delete set {obj}: no such set"))?;
        }
        ("add", "element") => table.add_elements(obj, tail)?,
        ("delete", "element") => table.delete_elements(obj, tail)?,
        _ => return Err(format!("unsupported command {line:?}")),
    }
    Ok(())
}

/// Applies a `table F N { … }` block (svcproxy's full form).
fn apply_block<'a>(
    t: &mut Tables,
    header: &str,
    lines: &mut impl Iterator<Item = &'a str>,
) -> Result<(), String> {
    let mut w = header.split_whitespace();
    let (fam, name) = (w.nth(1).unwrap_or(""), w.next().unwrap_or(""));
    t.entry((fam.to_string(), name.to_string())).or_default();
    let table = table_mut(t, fam, name)?;
    // Chains may refer forward: create them all, then add the rules.
    let mut pending: Vec<(String, String)> = Vec::new();
    let mut chain: Option<String> = None;
    for line in lines.by_ref() {
        let l = line.trim();
        if l == "}" {
            if chain.take().is_none() {
                break;
            }
        } else if let Some(c) = &chain {
            if !l.starts_with("type ") {
                pending.push((c.clone(), l.to_string()));
            }
        } else if let Some(c) = l.strip_prefix("chain ") {
            let c = c.trim_end_matches('{').trim().to_string();
            table.chains.entry(c.clone()).or_default();
            chain = Some(c);
        } else if let Some(s) = l.strip_prefix("set ").or_else(|| l.strip_prefix("map ")) {
            let s = s.split_whitespace().next().unwrap_or("");
            table.sets.entry(s.to_string()).or_default();
        } else if !l.starts_with("comment ") {
            return Err(format!("unsupported block line {l:?}"));
        }
    }
    for (c, rule) in pending {
        table.add_rule(&c, &rule)?;
    }
    Ok(())
}

impl FakeNft {
    /// svcproxy's table of `family`, if it exists.
    pub fn table(&self, family: IpFamily) -> Option<&FakeTable> {
        self.tables
            .get(&(ip_kw(family).to_string(), TABLE.to_string()))
    }

    /// Mutable access, for tests that tamper with the "kernel".
    pub fn table_mut(&mut self, family: IpFamily) -> Option<&mut FakeTable> {
        self.tables
            .get_mut(&(ip_kw(family).to_string(), TABLE.to_string()))
    }

    /// `nft flush ruleset`.
    pub fn flush_ruleset(&mut self) {
        self.tables.clear();
    }
}

impl NftEdge for FakeNft {
    fn apply(&mut self, transaction: &str) -> Result<(), BackendError> {
        self.transactions.push(transaction.to_string());
        if self.fail_next > 0 {
            self.fail_next -= 1;
            return Err(fail("injected failure".into()));
        }
        if let Some(f) = &self.fail_when_contains
            && transaction.contains(f.as_str())
        {
            return Err(fail(format!("injected failure on {f:?}")));
        }
        let mut staged = self.tables.clone();
        let mut lines = transaction.lines();
        while let Some(line) = lines.next() {
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let res = if line.starts_with("table ") {
                apply_block(&mut staged, line, &mut lines)
            } else {
                apply_command(&mut staged, line)
            };
            res.map_err(fail)?;
        }
        self.tables = staged;
        Ok(())
    }

    fn tables(&mut self) -> Result<Vec<(String, String)>, BackendError> {
        Ok(self.tables.keys().cloned().collect())
    }

    fn list_table(&mut self, family: IpFamily) -> Result<Option<TableState>, BackendError> {
        self.listings += 1;
        Ok(self.table(family).map(|t| {
            let mut st = TableState::default();
            st.chains.extend(t.chains.keys().cloned());
            for c in RULE_CHECKED_CHAINS {
                if let Some(rules) = t.chains.get(*c) {
                    st.rule_counts.insert(c.to_string(), rules.len());
                }
            }
            for (name, elems) in &t.sets {
                st.sets.insert(name.clone());
                if MANAGED_SETS.contains(&name.as_str()) {
                    for (k, v) in elems {
                        st.elements.insert((name.clone(), k.clone(), v.clone()));
                    }
                }
            }
            st
        }))
    }

    fn canary(&mut self, family: IpFamily) -> Result<bool, BackendError> {
        Ok(self
            .table(family)
            .is_some_and(|t| t.sets.contains_key(CANARY_SET)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded() -> FakeNft {
        let mut f = FakeNft::default();
        f.apply(
            "table ip svcproxy {\n\tmap m { type inet_proto . inet_service : verdict ; }\n\tchain a {\n\t\tgoto b\n\t}\n\tchain b {\n\t\taccept\n\t}\n}\nadd element ip svcproxy m { tcp . 80 : goto b }\n",
        )
        .unwrap();
        f
    }

    #[test]
    fn kernel_rules_are_enforced_and_failures_change_nothing() {
        let mut f = loaded();
        let before = f.tables.clone();
        for bad in [
            "delete chain ip svcproxy b",          // referenced by a and by m
            "add rule ip svcproxy a goto missing", // no such chain
            "add rule ip svcproxy a ip saddr @nope accept", // no such set
            "add element ip svcproxy m { tcp . 80 : drop }", // same key, other verdict
            "delete element ip svcproxy m { tcp . 81 }", // no such element
            "add chain ip svcproxy c\nadd rule ip svcproxy zz accept", // second line fails
        ] {
            assert!(f.apply(bad).is_err(), "{bad:?} must fail");
            assert_eq!(f.tables, before, "{bad:?} changed the tables");
        }
        f.apply("delete element ip svcproxy m { tcp . 80 }\nflush chain ip svcproxy a\ndelete chain ip svcproxy b")
            .unwrap();
        assert!(!f.table(IpFamily::V4).unwrap().chains.contains_key("b"));
    }
}
