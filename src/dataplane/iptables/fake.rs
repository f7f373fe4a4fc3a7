//! An in-memory iptables for unit tests of the backend: it applies restore batches with the
//! kernel's semantics (per-table atomic commit, `:CHAIN` flushes, jumps must target existing
//! chains, `-X` fails on referenced chains) and can be told to fail.

use std::collections::BTreeMap;

use super::edge::{IptablesEdge, Variant};
use super::save::builtin_chains;
use crate::dataplane::BackendError;
use crate::model::IpFamily;

type Table = BTreeMap<String, Vec<String>>;

/// Tables the fake holds (each starts with its built-in chains).
const TABLES: &[&str] = &["filter", "nat", "mangle"];

const TARGETS: &[&str] = &[
    "ACCEPT",
    "DROP",
    "REJECT",
    "RETURN",
    "DNAT",
    "SNAT",
    "MASQUERADE",
    "MARK",
];

/// In-memory tables of both families.
#[derive(Clone, Debug)]
pub struct FakeEdge {
    tables: BTreeMap<(IpFamily, String), Table>,
    /// Every restore input received, in order.
    pub restores: Vec<(IpFamily, String)>,
    /// Number of `save` calls.
    pub saves: usize,
    /// The next restores containing this text fail (and change nothing).
    pub fail_when_contains: Option<String>,
    /// This many next restores fail (and change nothing).
    pub fail_next: usize,
}

impl Default for FakeEdge {
    fn default() -> Self {
        let mut tables = BTreeMap::new();
        for family in [IpFamily::V4, IpFamily::V6] {
            for name in TABLES {
                let t: Table = builtin_chains(name)
                    .iter()
                    .map(|c| (c.to_string(), Vec::new()))
                    .collect();
                tables.insert((family, name.to_string()), t);
            }
        }
        Self {
            tables,
            restores: Vec::new(),
            saves: 0,
            fail_when_contains: None,
            fail_next: 0,
        }
    }
}

fn is_builtin(table: &str, chain: &str) -> bool {
    builtin_chains(table).contains(&chain)
}

fn fail(msg: String) -> BackendError {
    BackendError::Tool {
        tool: "fake-iptables-restore".into(),
        status: "exit status: 1".into(),
        stderr: msg,
    }
}

fn apply_line(name: &str, t: &mut Table, line: &str) -> Result<(), String> {
    if let Some(decl) = line.strip_prefix(':') {
        let chain = decl
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        if !is_builtin(name, &chain) {
            t.entry(chain).or_default().clear();
        }
        return Ok(());
    }
    let mut words = line.splitn(3, ' ');
    let (op, chain, rest) = (
        words.next().unwrap_or(""),
        words.next().unwrap_or(""),
        words.next().unwrap_or(""),
    );
    let target = rest
        .rsplit_once(" -j ")
        .map(|(_, t)| t.split_whitespace().next().unwrap_or(""));
    let target_ok = |t: &Table| match target {
        Some(tg) => TARGETS.contains(&tg) || t.contains_key(tg),
        None => true,
    };
    match op {
        "-A" | "-I" => {
            if !target_ok(t) {
                return Err(format!("line {line:?}: unknown target"));
            }
            let rules = t
                .get_mut(chain)
                .ok_or(format!("line {line:?}: no chain {chain}"))?;
            if op == "-A" {
                rules.push(rest.to_string());
            } else {
                let rest = rest.strip_prefix("1 ").unwrap_or(rest);
                rules.insert(0, rest.to_string());
            }
        }
        "-D" => {
            let rules = t
                .get_mut(chain)
                .ok_or(format!("line {line:?}: no chain {chain}"))?;
            let pos = rules
                .iter()
                .position(|r| r == rest)
                .ok_or(format!("line {line:?}: no such rule"))?;
            rules.remove(pos);
        }
        "-X" => {
            if !t.contains_key(chain) || is_builtin(name, chain) {
                return Err(format!("-X {chain}: no such user chain"));
            }
            let suffix = format!("-j {chain}");
            if t.values()
                .flatten()
                .any(|r| r.ends_with(&suffix) || r.contains(&format!("{suffix} ")))
            {
                return Err(format!("-X {chain}: chain is referenced"));
            }
            t.remove(chain);
        }
        _ => return Err(format!("unsupported line {line:?}")),
    }
    Ok(())
}

impl FakeEdge {
    /// Rules of one chain, as stored (`None` if the chain does not exist).
    pub fn chain(&self, family: IpFamily, table: &str, chain: &str) -> Option<&Vec<String>> {
        self.tables.get(&(family, table.to_string()))?.get(chain)
    }

    /// Chain names of a table.
    pub fn chains(&self, family: IpFamily, table: &str) -> Vec<String> {
        self.tables
            .get(&(family, table.to_string()))
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Empties every table, as `iptables -F; iptables -X` (or a firewall reload) would.
    pub fn flush_all(&mut self) {
        for ((_, name), t) in self.tables.iter_mut() {
            t.retain(|c, _| is_builtin(name, c));
            t.values_mut().for_each(Vec::clear);
        }
    }
}

impl IptablesEdge for FakeEdge {
    fn restore(&mut self, family: IpFamily, input: &str, _bulk: bool) -> Result<(), BackendError> {
        self.restores.push((family, input.to_string()));
        if self.fail_next > 0 {
            self.fail_next -= 1;
            return Err(fail("injected failure".into()));
        }
        if let Some(f) = &self.fail_when_contains
            && input.contains(f.as_str())
        {
            return Err(fail(format!("injected failure on {f:?}")));
        }
        // Stage every table, then commit them all: each table is atomic.
        let mut staged: BTreeMap<String, Table> = BTreeMap::new();
        let mut current: Option<String> = None;
        for line in input
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            if let Some(t) = line.strip_prefix('*') {
                let t = t.to_string();
                let base = self
                    .tables
                    .get(&(family, t.clone()))
                    .cloned()
                    .ok_or(fail(format!("no table {t}")))?;
                staged.entry(t.clone()).or_insert(base);
                current = Some(t);
            } else if line == "COMMIT" {
                current = None;
            } else {
                let name = current
                    .clone()
                    .ok_or(fail(format!("{line:?} outside a table")))?;
                let table = staged.get_mut(&name).expect("staged table");
                apply_line(&name, table, line).map_err(fail)?;
            }
        }
        for (name, t) in staged {
            self.tables.insert((family, name), t);
        }
        Ok(())
    }

    fn save(&mut self, family: IpFamily, table: Option<&str>) -> Result<String, BackendError> {
        self.saves += 1;
        let mut out = String::new();
        for ((f, name), t) in &self.tables {
            if *f != family || table.is_some_and(|x| x != name) {
                continue;
            }
            out.push_str(&format!("*{name}\n"));
            for c in t.keys() {
                let policy = if is_builtin(name, c) { "ACCEPT" } else { "-" };
                out.push_str(&format!(":{c} {policy} [0:0]\n"));
            }
            for (c, rules) in t {
                for r in rules {
                    out.push_str(&format!("-A {c} {r}\n"));
                }
            }
            out.push_str("COMMIT\n");
        }
        Ok(out)
    }

    fn list_chain(
        &mut self,
        family: IpFamily,
        table: &str,
        chain: &str,
    ) -> Result<Option<String>, BackendError> {
        Ok(self.chain(family, table, chain).map(|rules| {
            let mut s = format!("-N {chain}\n");
            for r in rules {
                s.push_str(&format!("-A {chain} {r}\n"));
            }
            s
        }))
    }

    fn variant(&self) -> Variant {
        Variant::Nft
    }
}
