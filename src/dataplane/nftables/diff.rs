//! The mirror of what svcproxy last committed to one family's table, and the transactions
//! that move the kernel from it to a new desired state.
//!
//! A delta names only what changed: new chains and sets, chains whose rules changed
//! (flushed and refilled), map elements added, replaced or deleted, and chains and sets no
//! longer needed. An element key wanted by two service ports (e.g. two services sharing an
//! external IP and port) is installed once, for the first claimant, like the first matching
//! rule in iptables mode; the next claimant takes over when the first lets go.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;

use super::{
    Chain, Element, PortRules, StaticRules, TABLE, ip_kw, render_port, static_rules, write_elements,
};
use crate::dataplane::iptables::RenderConfig;
use crate::model::{IpFamily, NodeInfo, ServicePortName, Snapshot};

type ElemKey = (&'static str, String);
/// Claimants of one element key, in claim order; the first one's value is installed.
type Claims = Vec<(ServicePortName, Option<String>)>;

static EMPTY: PortRules = PortRules {
    chains: Vec::new(),
    sets: Vec::new(),
    elements: Vec::new(),
    no_local_internal: false,
    no_local_external: false,
};

/// Element commands of a delta.
#[derive(Debug, Default)]
struct ElementOps {
    deletes: Vec<ElemKey>,
    adds: Vec<(ElemKey, Option<String>)>,
}

/// What a table holds, in comparable form: the kernel's listing, checked against the mirror
/// with [`Mirror::drift_from`] (see [`super::edge::NftEdge::list_table`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableState {
    /// Chain names. Rules of per-service chains are not compared: listing them costs
    /// ~1 min at 10k services.
    pub chains: BTreeSet<String>,
    /// Rule count of each chain in [`RULE_CHECKED_CHAINS`] (a flushed table keeps its
    /// chains, sets and elements but loses these rules).
    pub rule_counts: BTreeMap<String, usize>,
    /// Named sets and maps.
    pub sets: BTreeSet<String>,
    /// Elements of svcproxy's static maps and sets (`map`, `key`, `value`), in nft syntax.
    /// Dynamic affinity sets' contents are not compared: the kernel fills them.
    pub elements: BTreeSet<(String, String, Option<String>)>,
}

/// Chains whose rules the resync counts: the dispatch chain every service depends on.
pub const RULE_CHECKED_CHAINS: &[&str] = &[super::SERVICES_CHAIN];

impl TableState {
    /// A copy of the elements and rule counts only (the small parts).
    fn clone_without_names(&self) -> TableState {
        TableState {
            chains: BTreeSet::new(),
            sets: BTreeSet::new(),
            elements: self.elements.clone(),
            rule_counts: self.rule_counts.clone(),
        }
    }
}

/// How many objects differ between what svcproxy committed and what the kernel holds:
/// chains, sets and managed elements missing or extra (or with another verdict), and
/// checked chains whose rule count differs.
pub fn drift(expected: &TableState, actual: &TableState) -> usize {
    fn sym<T: Ord>(a: &BTreeSet<T>, b: &BTreeSet<T>) -> usize {
        a.symmetric_difference(b).count()
    }
    sym(&expected.chains, &actual.chains)
        + sym(&expected.sets, &actual.sets)
        + sym(&expected.elements, &actual.elements)
        + expected
            .rule_counts
            .iter()
            .filter(|(c, n)| actual.rule_counts.get(*c) != Some(*n))
            .count()
}

/// One family's table as svcproxy last committed it (or is about to).
#[derive(Clone, Debug)]
pub struct Mirror {
    family: IpFamily,
    cfg: RenderConfig,
    node: NodeInfo,
    statics: StaticRules,
    ports: BTreeMap<ServicePortName, PortRules>,
    claims: HashMap<ElemKey, Claims>,
}

/// The changes to one family's table, not yet committed.
#[derive(Debug, Default)]
pub struct Delta {
    /// The nft commands (empty when nothing changed).
    pub text: String,
    /// Chains created or refilled.
    pub chains_written: usize,
    /// Chains deleted.
    pub chains_deleted: usize,
    /// Elements added, replaced or deleted.
    pub elements_changed: usize,
    /// A change the delta cannot express (an affinity timeout changed): rewrite the table.
    pub needs_full: bool,
    ports: Vec<(ServicePortName, Option<PortRules>)>,
    claims: Vec<(ElemKey, Claims)>,
}

impl Delta {
    /// Nothing to send to the kernel.
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }
}

fn chain_block(out: &mut String, chain: &Chain, hook: &str) {
    let _ = writeln!(out, "\tchain {} {{", chain.name);
    if !hook.is_empty() {
        let _ = writeln!(out, "\t\t{hook}");
    }
    for rule in chain.body.lines() {
        let _ = writeln!(out, "\t\t{rule}");
    }
    out.push_str("\t}\n");
}

impl Mirror {
    /// The desired table for `snap`: every service port rendered with `cfg`.
    pub fn render(cfg: &RenderConfig, snap: &Snapshot) -> Mirror {
        let ports = snap
            .ports
            .iter()
            .map(|(name, st)| (name.clone(), render_port(cfg, &snap.node, st)))
            .filter(|(_, r)| !r.elements.is_empty())
            .collect();
        Mirror::from_ports(cfg.clone(), snap.node.clone(), ports)
    }

    fn from_ports(
        cfg: RenderConfig,
        node: NodeInfo,
        ports: BTreeMap<ServicePortName, PortRules>,
    ) -> Mirror {
        let mut claims: HashMap<ElemKey, Claims> = HashMap::new();
        for (name, rules) in &ports {
            for e in &rules.elements {
                claims
                    .entry((e.map, e.key.clone()))
                    .or_default()
                    .push((name.clone(), e.value.clone()));
            }
        }
        Mirror {
            family: cfg.family,
            statics: static_rules(&cfg),
            cfg,
            node,
            ports,
            claims,
        }
    }

    /// The settings the table was rendered with.
    pub fn config(&self) -> &RenderConfig {
        &self.cfg
    }

    /// The node facts the table was rendered with.
    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    /// Whether `other` has the same static part (maps, base and helper chains), so a delta
    /// can move from one to the other.
    pub fn same_statics(&self, other: &Mirror) -> bool {
        self.family == other.family && self.statics == other.statics
    }

    /// Number of chains (static and per service).
    pub fn chain_count(&self) -> usize {
        self.statics.chains.len() + self.ports.values().map(|p| p.chains.len()).sum::<usize>()
    }

    /// (ITP Local, ETP Local) service ports without a local endpoint.
    pub fn no_local_counts(&self) -> (usize, usize) {
        self.ports.values().fold((0, 0), |(i, e), p| {
            (
                i + usize::from(p.no_local_internal),
                e + usize::from(p.no_local_external),
            )
        })
    }

    /// Whether `port`'s element is the installed one for its key.
    fn installed(&self, name: &ServicePortName, e: &Element) -> bool {
        self.claims
            .get(&(e.map, e.key.clone()))
            .and_then(|c| c.first())
            .is_some_and(|(owner, value)| owner == name && *value == e.value)
    }

    /// Appends the whole table: one `table { … }` block, then its elements.
    pub fn write_full(&self, out: &mut String) {
        self.write_full_chunked(&mut |chunk| out.push_str(chunk));
    }

    /// The whole table in pieces of about 64 KiB, so a rewrite of tens of MiB can be
    /// streamed to the kernel tool instead of held in memory.
    pub fn write_full_chunked(&self, emit: &mut dyn FnMut(&str)) {
        const CHUNK: usize = 64 * 1024;
        let family = self.family;
        let mut out = String::with_capacity(2 * CHUNK);
        let mut flush = |out: &mut String, force: bool| {
            if force || out.len() >= CHUNK {
                emit(out);
                out.clear();
            }
        };
        let _ = writeln!(out, "table {} {TABLE} {{", ip_kw(family));
        out.push_str("\tcomment \"rules for svcproxy\"\n");
        for s in &self.statics.sets {
            let _ = writeln!(out, "\t{} {} {{ {} }}", s.keyword(), s.name, s.decl);
        }
        for c in &self.statics.chains {
            chain_block(&mut out, &c.chain, &c.hook);
        }
        for rules in self.ports.values() {
            for s in &rules.sets {
                let _ = writeln!(out, "\t{} {} {{ {} }}", s.keyword(), s.name, s.decl);
            }
            for c in &rules.chains {
                chain_block(&mut out, c, "");
            }
            flush(&mut out, false);
        }
        out.push_str("}\n");
        flush(&mut out, true);
        let statics = self
            .statics
            .elements
            .iter()
            .map(|e| (e.map, e.key.as_str(), e.value.as_deref()));
        let ports = self.ports.iter().flat_map(|(name, rules)| {
            rules
                .elements
                .iter()
                .filter(move |e| self.installed(name, e))
                .map(|e| (e.map, e.key.as_str(), e.value.as_deref()))
        });
        // Elements go out one `add element` line (up to 1000 elements) at a time.
        write_elements(&mut out, family, "add", statics.chain(ports));
        for line in out.split_inclusive('\n') {
            emit(line);
        }
    }

    /// [`drift`] between this mirror and `actual`, without copying the mirror's names
    /// (111k chains at 10k services).
    pub fn drift_from(&self, actual: &TableState) -> usize {
        let chains: HashSet<&str> = self
            .statics
            .chains
            .iter()
            .map(|c| c.chain.name.as_str())
            .chain(
                self.ports
                    .values()
                    .flat_map(|p| p.chains.iter().map(|c| c.name.as_str())),
            )
            .collect();
        let sets: HashSet<&str> = self
            .statics
            .sets
            .iter()
            .chain(self.ports.values().flat_map(|p| &p.sets))
            .map(|s| s.name.as_str())
            .collect();
        let missing = |names: &HashSet<&str>, listed: &BTreeSet<String>| {
            names.iter().filter(|n| !listed.contains(**n)).count()
                + listed
                    .iter()
                    .filter(|n| !names.contains(n.as_str()))
                    .count()
        };
        let mut expected = TableState::default();
        for e in &self.statics.elements {
            expected
                .elements
                .insert((e.map.to_string(), e.key.clone(), e.value.clone()));
        }
        for (name, rules) in &self.ports {
            for e in rules.elements.iter().filter(|e| self.installed(name, e)) {
                expected
                    .elements
                    .insert((e.map.to_string(), e.key.clone(), e.value.clone()));
            }
        }
        for c in &self.statics.chains {
            if RULE_CHECKED_CHAINS.contains(&c.chain.name.as_str()) {
                expected
                    .rule_counts
                    .insert(c.chain.name.clone(), c.chain.rule_count());
            }
        }
        missing(&chains, &actual.chains)
            + missing(&sets, &actual.sets)
            + drift(&expected, &actual.clone_without_names())
    }

    /// The delta that replaces the committed rules of each port in `updates` by the given
    /// ones (`None`: the port is gone). Ports not named keep their rules. Element claims
    /// move incrementally: a new claimant queues behind existing ones.
    pub fn plan(&self, updates: Vec<(ServicePortName, Option<PortRules>)>) -> Delta {
        let mut claims: HashMap<ElemKey, Claims> = HashMap::new();
        for (name, new) in &updates {
            let old = self.ports.get(name).unwrap_or(&EMPTY);
            let new = new.as_ref().unwrap_or(&EMPTY);
            if old == new {
                continue;
            }
            let old_e: BTreeSet<&Element> = old.elements.iter().collect();
            let new_e: BTreeSet<&Element> = new.elements.iter().collect();
            for e in old_e.difference(&new_e) {
                let key = (e.map, e.key.clone());
                let c = claims
                    .entry(key.clone())
                    .or_insert_with(|| self.claims.get(&key).cloned().unwrap_or_default());
                c.retain(|(owner, v)| !(owner == name && *v == e.value));
            }
            for e in new_e.difference(&old_e) {
                let key = (e.map, e.key.clone());
                let c = claims
                    .entry(key.clone())
                    .or_insert_with(|| self.claims.get(&key).cloned().unwrap_or_default());
                c.push((name.clone(), e.value.clone()));
            }
        }
        let mut keys: Vec<&ElemKey> = claims.keys().collect();
        keys.sort();
        let element_ops = self.element_ops(keys.into_iter().map(|k| (k, claims.get(k))));
        let mut d = self.plan_objects(
            updates.iter().map(|(n, r)| {
                (
                    n,
                    self.ports.get(n).unwrap_or(&EMPTY),
                    r.as_ref().unwrap_or(&EMPTY),
                )
            }),
            element_ops,
        );
        d.ports = updates;
        d.claims = claims.into_iter().collect();
        d
    }

    /// The delta from this mirror to `desired` (rendered for the same static rules), over
    /// every port and every element. Commit it by replacing the mirror with `desired`.
    pub fn plan_all(&self, desired: &Mirror) -> Delta {
        let mut names: BTreeSet<&ServicePortName> = self.ports.keys().collect();
        names.extend(desired.ports.keys());
        let mut keys: BTreeSet<&ElemKey> = self.claims.keys().collect();
        keys.extend(desired.claims.keys());
        let element_ops = self.element_ops(keys.into_iter().map(|k| (k, desired.claims.get(k))));
        self.plan_objects(
            names.into_iter().map(|n| {
                (
                    n,
                    self.ports.get(n).unwrap_or(&EMPTY),
                    desired.ports.get(n).unwrap_or(&EMPTY),
                )
            }),
            element_ops,
        )
    }

    /// Element deletes and adds for keys whose installed claimant changes to `after`.
    fn element_ops<'k>(
        &self,
        keys: impl Iterator<Item = (&'k ElemKey, Option<&'k Claims>)>,
    ) -> ElementOps {
        let mut ops = ElementOps::default();
        for (key, after) in keys {
            let before = self.claims.get(key).and_then(|c| c.first()).map(|(_, v)| v);
            let after = after.and_then(|c| c.first()).map(|(_, v)| v);
            if before == after {
                continue;
            }
            if before.is_some() {
                ops.deletes.push(key.clone());
            }
            if let Some(v) = after {
                ops.adds.push((key.clone(), v.clone()));
            }
        }
        ops
    }

    /// Writes the transaction: new sets and chains, refilled chains, element changes,
    /// then stale chains and sets removed.
    fn plan_objects<'a>(
        &'a self,
        ports: impl Iterator<Item = (&'a ServicePortName, &'a PortRules, &'a PortRules)>,
        elements: ElementOps,
    ) -> Delta {
        let mut d = Delta::default();
        let fam = ip_kw(self.family);
        let mut new_sets = String::new();
        let mut new_chains = String::new();
        let mut flushes = String::new();
        let mut rules = String::new();
        let mut stale_chains: Vec<&str> = Vec::new();
        let mut stale_sets: Vec<&str> = Vec::new();
        for (_, old, new) in ports {
            if old == new {
                continue;
            }
            let old_chains: HashMap<&str, &str> = old
                .chains
                .iter()
                .map(|c| (c.name.as_str(), c.body.as_str()))
                .collect();
            let new_names: BTreeSet<&str> = new.chains.iter().map(|c| c.name.as_str()).collect();
            for c in &new.chains {
                match old_chains.get(c.name.as_str()) {
                    Some(body) if *body == c.body => continue,
                    Some(_) => {
                        let _ = writeln!(flushes, "flush chain {fam} {TABLE} {}", c.name);
                    }
                    None => {
                        let _ = writeln!(new_chains, "add chain {fam} {TABLE} {}", c.name);
                    }
                }
                d.chains_written += 1;
                for rule in c.body.lines() {
                    let _ = writeln!(rules, "add rule {fam} {TABLE} {} {rule}", c.name);
                }
            }
            stale_chains.extend(
                old.chains
                    .iter()
                    .map(|c| c.name.as_str())
                    .filter(|c| !new_names.contains(c)),
            );
            for s in &new.sets {
                match old.sets.iter().find(|o| o.name == s.name) {
                    Some(o) if o.decl == s.decl => {}
                    Some(_) => d.needs_full = true,
                    None => {
                        let _ = writeln!(
                            new_sets,
                            "add {} {fam} {TABLE} {} {{ {} }}",
                            s.keyword(),
                            s.name,
                            s.decl
                        );
                    }
                }
            }
            stale_sets.extend(
                old.sets
                    .iter()
                    .filter(|s| !new.sets.iter().any(|n| n.name == s.name))
                    .map(|s| s.name.as_str()),
            );
        }
        d.elements_changed = elements.deletes.len().max(elements.adds.len());
        let t = &mut d.text;
        t.push_str(&new_sets);
        t.push_str(&new_chains);
        t.push_str(&flushes);
        t.push_str(&rules);
        write_elements(
            t,
            self.family,
            "delete",
            elements.deletes.iter().map(|(m, k)| (*m, k.as_str(), None)),
        );
        write_elements(
            t,
            self.family,
            "add",
            elements
                .adds
                .iter()
                .map(|((m, k), v)| (*m, k.as_str(), v.as_deref())),
        );
        // Stale chains may jump to each other: empty them all before deleting any.
        for c in &stale_chains {
            let _ = writeln!(t, "flush chain {fam} {TABLE} {c}");
        }
        for c in &stale_chains {
            let _ = writeln!(t, "delete chain {fam} {TABLE} {c}");
        }
        for s in &stale_sets {
            let _ = writeln!(t, "delete set {fam} {TABLE} {s}");
        }
        d.chains_deleted = stale_chains.len();
        d
    }

    /// Records that `delta` was committed to the kernel.
    pub fn commit(&mut self, delta: Delta) {
        for (name, rules) in delta.ports {
            match rules {
                Some(r) => {
                    self.ports.insert(name, r);
                }
                None => {
                    self.ports.remove(&name);
                }
            }
        }
        for (key, c) in delta.claims {
            if c.is_empty() {
                self.claims.remove(&key);
            } else {
                self.claims.insert(key, c);
            }
        }
    }

    /// The delta that brings the ports of `services` in line with `snap` (rendered with
    /// this mirror's settings and node).
    pub fn plan_services<'a>(
        &self,
        snap: &Snapshot,
        services: impl IntoIterator<Item = &'a crate::model::ServiceName>,
    ) -> Delta {
        let mut updates = Vec::new();
        for service in services {
            let mut names: BTreeSet<ServicePortName> = self
                .ports
                .range(ServicePortName::first_of(service)..)
                .take_while(|(k, _)| &k.service == service)
                .map(|(k, _)| k.clone())
                .collect();
            names.extend(snap.ports_of(service).map(|(k, _)| k.clone()));
            for name in names {
                let new = snap
                    .ports
                    .get(&name)
                    .map(|st| render_port(&self.cfg, &self.node, st))
                    .filter(|r| !r.elements.is_empty());
                updates.push((name, new));
            }
        }
        self.plan(updates)
    }

    /// The delta that brings every port in line with `snap` (same settings and node),
    /// holding only the ports that changed: a periodic resync of an unchanged cluster
    /// renders each port once and keeps nothing, instead of a second full mirror.
    pub fn plan_everything(&self, snap: &Snapshot) -> Delta {
        let mut updates = Vec::new();
        let mut consider = |name: &ServicePortName| {
            let new = snap
                .ports
                .get(name)
                .map(|st| render_port(&self.cfg, &self.node, st))
                .filter(|r| !r.elements.is_empty());
            if self.ports.get(name) != new.as_ref() {
                updates.push((name.clone(), new));
            }
        };
        for name in snap.ports.keys() {
            consider(name);
        }
        for name in self.ports.keys().filter(|n| !snap.ports.contains_key(*n)) {
            consider(name);
        }
        self.plan(updates)
    }
}
