//! iptables mode: upstream kube-proxy's chain layout, rendered as one `iptables-restore` input.
//!
//! [`Renderer`] turns a [`Snapshot`] into the restore text for one IP family. It caches each
//! service port's [`PortFragment`], so a partial render re-renders only the services that
//! changed, rewrites the shared chains from cached text, and deletes the chains the changed
//! services no longer need.

pub mod backend;
pub mod cleanup;
pub mod edge;
pub mod fake;
mod fragment;
pub mod save;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;

pub use fragment::{LocalDetector, PortFragment, render_port};

use crate::dataplane::naming;
use crate::model::{IpFamily, NodeInfo, ServiceName, ServicePortName, Snapshot};

/// filter + nat: services entry chain.
pub const KUBE_SERVICES: &str = "KUBE-SERVICES";
/// filter: externally-visible services (no-endpoint REJECT / no-local DROP for external IPs).
pub const KUBE_EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
/// filter + nat: node ports.
pub const KUBE_NODEPORTS: &str = "KUBE-NODEPORTS";
/// nat: SNAT of marked traffic.
pub const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
/// nat: marks traffic for SNAT.
pub const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
/// filter: accepts forwarded service traffic.
pub const KUBE_FORWARD: &str = "KUBE-FORWARD";
/// filter: drops load-balancer traffic not allowed by loadBalancerSourceRanges.
pub const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
/// filter: blocks martian localnet traffic when localhost node ports are enabled.
pub const KUBE_FIREWALL: &str = "KUBE-FIREWALL";

/// filter + nat: canary chain; its rule vanishing means someone flushed the tables.
pub const KUBE_PROXY_CANARY: &str = "KUBE-PROXY-CANARY";
/// The rule svcproxy keeps in each canary chain.
pub const CANARY_RULE: &str = "-m comment --comment \"svcproxy canary\" -j RETURN";

/// Upstream's large-cluster threshold: above this many endpoints, per-endpoint comments are
/// dropped to shrink the restore input.
pub const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

/// Which node addresses accept NodePort traffic (`--nodeport-addresses`, resolved).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Every local address (`--nodeport-addresses` unset).
    #[default]
    All,
    /// Only these node addresses.
    Ips(Vec<IpAddr>),
}

/// Settings that shape the rendered rules; all are node-wide.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderConfig {
    /// The family this rule set is for (iptables or ip6tables).
    pub family: IpFamily,
    /// `--masquerade-all`: SNAT all ClusterIP traffic.
    pub masquerade_all: bool,
    /// Masquerade mark bit (`--iptables-masquerade-bit`, default 14 = 0x4000).
    pub masquerade_bit: u8,
    /// `--detect-local-mode` and its CIDRs / interface.
    pub local_detector: LocalDetector,
    /// `--nodeport-addresses`.
    pub node_port_addresses: NodePortAddresses,
    /// Add `--random-fully` to MASQUERADE (when the kernel supports it).
    pub random_fully: bool,
    /// `--iptables-localhost-nodeports` (IPv4 only; needs route_localnet).
    pub localhost_node_ports: bool,
    /// Conntrack is in TCP "be liberal" mode: no INVALID drop needed in KUBE-FORWARD.
    pub conntrack_tcp_liberal: bool,
    /// Endpoint count above which per-endpoint comments are omitted.
    pub large_cluster_endpoints: usize,
}

impl Default for RenderConfig {
    fn default() -> Self {
        Self {
            family: IpFamily::V4,
            masquerade_all: false,
            masquerade_bit: 14,
            local_detector: LocalDetector::None,
            node_port_addresses: NodePortAddresses::All,
            random_fully: true,
            localhost_node_ports: true,
            conntrack_tcp_liberal: false,
            large_cluster_endpoints: LARGE_CLUSTER_ENDPOINTS,
        }
    }
}

impl RenderConfig {
    /// The masquerade mark as iptables prints it (`0x4000`).
    pub fn masquerade_mark(&self) -> String {
        format!("{:#x}", 1u32 << self.masquerade_bit)
    }

    /// Localhost node ports are served (IPv4 only, as upstream): the rules accept them and
    /// the node needs `route_localnet`.
    pub fn serves_localhost_node_ports(&self) -> bool {
        self.family == IpFamily::V4
            && self.localhost_node_ports
            && match &self.node_port_addresses {
                NodePortAddresses::All => true,
                NodePortAddresses::Ips(ips) => ips.iter().any(|ip| ip.is_loopback()),
            }
    }
}

/// One jump from a built-in chain into a kube chain, installed once (not rewritten per sync).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JumpRule {
    /// `filter` or `nat`.
    pub table: &'static str,
    /// Built-in chain the jump is inserted into.
    pub from: &'static str,
    /// The kube chain jumped to.
    pub to: &'static str,
    /// Upstream's comment, or empty.
    pub comment: &'static str,
    /// Extra match arguments.
    pub extra: &'static str,
}

impl JumpRule {
    /// The rule arguments after `-A <from>` / `-I <from>`.
    pub fn args(&self) -> String {
        let mut s = String::new();
        if !self.extra.is_empty() {
            s.push_str(self.extra);
            s.push(' ');
        }
        if !self.comment.is_empty() {
            s.push_str(&format!("-m comment --comment \"{}\" ", self.comment));
        }
        s.push_str("-j ");
        s.push_str(self.to);
        s
    }
}

const NEW: &str = "-m conntrack --ctstate NEW";

/// Upstream's jump rules, in upstream's order (each is prepended, so the last listed for a
/// chain ends up first).
pub const JUMP_RULES: &[JumpRule] = &[
    JumpRule {
        table: "filter",
        from: "INPUT",
        to: KUBE_EXTERNAL_SERVICES,
        comment: "kubernetes externally-visible service portals",
        extra: NEW,
    },
    JumpRule {
        table: "filter",
        from: "FORWARD",
        to: KUBE_EXTERNAL_SERVICES,
        comment: "kubernetes externally-visible service portals",
        extra: NEW,
    },
    JumpRule {
        table: "filter",
        from: "INPUT",
        to: KUBE_NODEPORTS,
        comment: "kubernetes health check service ports",
        extra: "",
    },
    JumpRule {
        table: "filter",
        from: "FORWARD",
        to: KUBE_SERVICES,
        comment: "kubernetes service portals",
        extra: NEW,
    },
    JumpRule {
        table: "filter",
        from: "OUTPUT",
        to: KUBE_SERVICES,
        comment: "kubernetes service portals",
        extra: NEW,
    },
    JumpRule {
        table: "filter",
        from: "FORWARD",
        to: KUBE_FORWARD,
        comment: "kubernetes forwarding rules",
        extra: "",
    },
    JumpRule {
        table: "filter",
        from: "INPUT",
        to: KUBE_PROXY_FIREWALL,
        comment: "kubernetes load balancer firewall",
        extra: NEW,
    },
    JumpRule {
        table: "filter",
        from: "OUTPUT",
        to: KUBE_PROXY_FIREWALL,
        comment: "kubernetes load balancer firewall",
        extra: NEW,
    },
    JumpRule {
        table: "filter",
        from: "FORWARD",
        to: KUBE_PROXY_FIREWALL,
        comment: "kubernetes load balancer firewall",
        extra: NEW,
    },
    JumpRule {
        table: "nat",
        from: "OUTPUT",
        to: KUBE_SERVICES,
        comment: "kubernetes service portals",
        extra: "",
    },
    JumpRule {
        table: "nat",
        from: "PREROUTING",
        to: KUBE_SERVICES,
        comment: "kubernetes service portals",
        extra: "",
    },
    JumpRule {
        table: "nat",
        from: "POSTROUTING",
        to: KUBE_POSTROUTING,
        comment: "kubernetes postrouting rules",
        extra: "",
    },
];

/// Jumps into KUBE-FIREWALL, installed only when localhost node ports are served.
pub const LOCALNET_JUMP_RULES: &[JumpRule] = &[
    JumpRule {
        table: "filter",
        from: "INPUT",
        to: KUBE_FIREWALL,
        comment: "",
        extra: "",
    },
    JumpRule {
        table: "filter",
        from: "OUTPUT",
        to: KUBE_FIREWALL,
        comment: "",
        extra: "",
    },
];

/// What to render.
#[derive(Clone, Copy, Debug)]
pub enum Scope<'a> {
    /// Everything; chains in `existing` that are no longer needed are deleted.
    Full {
        /// Per-service chains currently in the kernel (from `iptables-save`).
        existing: &'a BTreeSet<String>,
    },
    /// Only the chains of these services, plus all shared chains.
    Partial {
        /// Services whose ports or endpoints changed since the last render.
        changed: &'a BTreeSet<ServiceName>,
    },
}

/// A rendered `iptables-restore` input and what it does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rendered {
    /// The restore input (`*filter … COMMIT *nat … COMMIT`), for `--noflush`.
    pub text: String,
    /// Whether this is a full render (a partial request may be upgraded to full).
    pub full: bool,
    /// A partial render in which no changed service has rules in this family (before or
    /// after): applying it would only rewrite the shared chains with identical content.
    pub noop: bool,
    /// Per-service chains written (declared and filled).
    pub chains_written: Vec<String>,
    /// Per-service chains deleted.
    pub chains_deleted: Vec<String>,
    /// ITP Local service ports without local endpoints.
    pub no_local_internal: usize,
    /// ETP Local service ports without local endpoints.
    pub no_local_external: usize,
    /// Per-service rules in the filter table after this render.
    pub filter_rules: usize,
    /// Per-service rules in the nat table after this render.
    pub nat_rules: usize,
}

/// Renders snapshots for one family, caching per-port fragments between renders.
#[derive(Debug)]
pub struct Renderer {
    cfg: RenderConfig,
    /// Fragments in snapshot order, so assembly is a walk without lookups.
    fragments: BTreeMap<ServicePortName, PortFragment>,
    /// Node and comment mode the cached fragments were rendered with.
    cached_for: Option<(NodeInfo, bool)>,
    /// Jump rules to insert in the next render; `None` means all that apply.
    pending_jumps: Option<Vec<JumpRule>>,
}

impl Renderer {
    /// A renderer with an empty cache; the first render is always full.
    pub fn new(cfg: RenderConfig) -> Self {
        Self {
            cfg,
            fragments: BTreeMap::new(),
            cached_for: None,
            pending_jumps: None,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &RenderConfig {
        &self.cfg
    }

    /// Controls whether the next renders insert all jump rules from the built-in chains
    /// (true for a fresh node) or none (they are in the kernel already).
    pub fn set_insert_jumps(&mut self, insert: bool) {
        self.pending_jumps = if insert { None } else { Some(Vec::new()) };
    }

    /// No jump rules are waiting to be inserted.
    pub fn pending_jumps_empty(&self) -> bool {
        self.pending_jumps.as_ref().is_some_and(Vec::is_empty)
    }

    /// Inserts exactly these jump rules in the next renders (the ones missing in the kernel).
    pub fn set_missing_jumps(&mut self, jumps: Vec<JumpRule>) {
        self.pending_jumps = Some(jumps);
    }

    /// The jump rules this configuration installs.
    pub fn applicable_jumps(&self) -> Vec<JumpRule> {
        let localnet: &[JumpRule] = if self.cfg.serves_localhost_node_ports() {
            LOCALNET_JUMP_RULES
        } else {
            &[]
        };
        JUMP_RULES.iter().chain(localnet).copied().collect()
    }

    /// Replaces the configuration; a different one invalidates every cached fragment.
    pub fn set_config(&mut self, cfg: RenderConfig) {
        if cfg != self.cfg {
            self.cfg = cfg;
            self.invalidate();
        }
    }

    /// Per-service chains the current rule set uses.
    pub fn desired_chains(&self) -> impl Iterator<Item = &str> {
        self.fragments
            .values()
            .flat_map(|f| f.chains.iter().map(String::as_str))
    }

    /// Forgets every cached fragment, so the next render is full.
    pub fn invalidate(&mut self) {
        self.fragments.clear();
        self.cached_for = None;
    }

    /// Whether a partial render of `snap` is possible: fragments are cached and were rendered
    /// for the same node facts and comment mode.
    pub fn can_render_partial(&self, snap: &Snapshot) -> bool {
        let comments = snap.endpoint_count() <= self.cfg.large_cluster_endpoints;
        self.cached_for
            .as_ref()
            .is_some_and(|(node, c)| *c == comments && *node == snap.node)
    }

    /// Renders `snap`. A partial scope is upgraded to full when nothing is cached yet or when
    /// node facts or the comment mode changed (every fragment depends on them).
    pub fn render(&mut self, snap: &Snapshot, scope: Scope<'_>) -> Rendered {
        let comments = snap.endpoint_count() <= self.cfg.large_cluster_endpoints;
        let cache_key = (snap.node.clone(), comments);
        let cache_valid = self.cached_for.as_ref() == Some(&cache_key);
        let empty = BTreeSet::new();
        let scope = match scope {
            Scope::Partial { .. } if !cache_valid => Scope::Full { existing: &empty },
            s => s,
        };

        let mut out = Rendered::default();
        let mut stale: BTreeSet<String> = BTreeSet::new();
        let mut delta = SharedDelta::default();
        let changed_ports: Vec<&ServicePortName> = match scope {
            Scope::Full { existing } => {
                out.full = true;
                // Snapshot order is the map order: bulk-building from it needs no lookups.
                self.fragments = snap
                    .ports
                    .iter()
                    .map(|(name, st)| {
                        (
                            name.clone(),
                            render_port(&self.cfg, &snap.node, st, comments),
                        )
                    })
                    .collect();
                if !existing.is_empty() {
                    let desired: HashSet<&str> = self.desired_chains().collect();
                    stale.extend(
                        existing
                            .iter()
                            .filter(|c| !desired.contains(c.as_str()))
                            .cloned(),
                    );
                }
                snap.ports.keys().collect()
            }
            Scope::Partial { changed } => {
                let mut old: BTreeMap<ServicePortName, PortFragment> = BTreeMap::new();
                for service in changed {
                    let keys: Vec<ServicePortName> = self
                        .fragments
                        .range(ServicePortName::first_of(service)..)
                        .take_while(|(k, _)| &k.service == service)
                        .map(|(k, _)| k.clone())
                        .collect();
                    for k in keys {
                        if let Some(f) = self.fragments.remove(&k) {
                            old.insert(k, f);
                        }
                    }
                }
                let mut new_ports = Vec::new();
                for service in changed {
                    for (name, st) in snap.ports_of(service) {
                        let f = render_port(&self.cfg, &snap.node, st, comments);
                        // A port whose rules did not change needs nothing in the kernel.
                        if old.get(name) == Some(&f) {
                            old.remove(name);
                        } else {
                            new_ports.push(name);
                        }
                        self.fragments.insert(name.clone(), f);
                    }
                }
                let new_frags: Vec<&PortFragment> = new_ports
                    .iter()
                    .filter_map(|k| self.fragments.get(*k))
                    .collect();
                let mut old_chains: BTreeSet<String> = old
                    .values()
                    .flat_map(|f| f.chains.iter().cloned())
                    .collect();
                for f in &new_frags {
                    for c in &f.chains {
                        old_chains.remove(c);
                    }
                }
                stale = old_chains;
                let old_frags: Vec<&PortFragment> = old.values().collect();
                delta = SharedDelta::between(&old_frags, &new_frags);
                out.noop = delta.is_empty()
                    && new_frags.iter().all(|f| f.chains.is_empty())
                    && stale.is_empty();
                new_ports
            }
        };
        self.cached_for = Some(cache_key);

        out.text = if out.full {
            self.assemble(&changed_ports, &stale)
        } else {
            self.assemble_partial(&changed_ports, &stale, &delta)
        };
        out.chains_written = changed_ports
            .iter()
            .filter_map(|p| self.fragments.get(*p))
            .flat_map(|f| f.chains.iter().cloned())
            .collect();
        out.chains_deleted = stale
            .into_iter()
            .filter(|c| naming::is_service_chain(c))
            .collect();
        for f in self.fragments.values() {
            out.no_local_internal += usize::from(f.no_local_internal);
            out.no_local_external += usize::from(f.no_local_external);
            out.filter_rules += f.filter_rules as usize;
            out.nat_rules += f.nat_rules as usize;
        }
        out
    }

    fn assemble(&self, written: &[&ServicePortName], stale: &BTreeSet<String>) -> String {
        let cfg = &self.cfg;
        let mark = cfg.masquerade_mark();
        let localnet = cfg.serves_localhost_node_ports();
        let ordered: Vec<&PortFragment> = self.fragments.values().collect();
        let size: usize = ordered
            .iter()
            .map(|f| {
                f.nat_services.len()
                    + f.nat_nodeports.len()
                    + f.filter_services.len()
                    + f.filter_external.len()
            })
            .sum::<usize>()
            + written
                .iter()
                .filter_map(|k| self.fragments.get(*k))
                .map(|f| f.chain_rules.len() + f.chains.len() * 40)
                .sum::<usize>();
        let mut s = String::with_capacity(size + 4096);

        // filter table
        s.push_str("*filter\n");
        let mut filter_chains = vec![KUBE_NODEPORTS, KUBE_SERVICES, KUBE_EXTERNAL_SERVICES];
        if localnet {
            filter_chains.push(KUBE_FIREWALL);
        }
        filter_chains.extend([KUBE_FORWARD, KUBE_PROXY_FIREWALL]);
        for c in &filter_chains {
            declare(&mut s, c);
        }
        declare(&mut s, KUBE_PROXY_CANARY);
        self.insert_jumps(&mut s, "filter");
        s.push_str(&format!("-A {KUBE_PROXY_CANARY} {CANARY_RULE}\n"));
        for f in &ordered {
            s.push_str(&f.filter_nodeports);
        }
        for f in &ordered {
            s.push_str(&f.filter_services);
        }
        for f in &ordered {
            s.push_str(&f.filter_external);
        }
        if localnet {
            s.push_str("-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n");
        }
        if !cfg.conntrack_tcp_liberal {
            s.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n");
        }
        s.push_str(&format!(
            "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {mark}/{mark} -j ACCEPT\n"
        ));
        s.push_str("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
        for f in &ordered {
            s.push_str(&f.filter_firewall);
        }
        s.push_str("COMMIT\n");

        // nat table
        s.push_str("*nat\n");
        for c in [
            KUBE_SERVICES,
            KUBE_NODEPORTS,
            KUBE_POSTROUTING,
            KUBE_MARK_MASQ,
        ] {
            declare(&mut s, c);
        }
        self.declare_port_chains(&mut s, written, stale);
        declare(&mut s, KUBE_PROXY_CANARY);
        self.insert_jumps(&mut s, "nat");
        s.push_str(&format!("-A {KUBE_PROXY_CANARY} {CANARY_RULE}\n"));
        for f in &ordered {
            s.push_str(&f.nat_services);
        }
        self.write_nodeports_jump(&mut s, localnet);
        for f in &ordered {
            s.push_str(&f.nat_nodeports);
        }
        s.push_str(&format!(
            "-A KUBE-POSTROUTING -m mark ! --mark {mark}/{mark} -j RETURN\n"
        ));
        s.push_str(&format!("-A KUBE-POSTROUTING -j MARK --xor-mark {mark}\n"));
        s.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE");
        if cfg.random_fully {
            s.push_str(" --random-fully");
        }
        s.push('\n');
        s.push_str(&format!("-A KUBE-MARK-MASQ -j MARK --or-mark {mark}\n"));
        self.write_port_chains(&mut s, written, stale);
        s.push_str("COMMIT\n");
        s
    }

    /// A partial batch: the changed ports' own chains rewritten, and only the changed lines
    /// of the shared chains deleted (`-D`) or added (`-A`, or `-I … 1` in nat KUBE-SERVICES
    /// so the node-ports rule stays last). The shared chains are never flushed: rewriting
    /// KUBE-SERVICES would name every service chain, which iptables-nft handles in time
    /// quadratic in the number of services (see `hack/NOFLUSH-STUDY.md`).
    fn assemble_partial(
        &self,
        written: &[&ServicePortName],
        stale: &BTreeSet<String>,
        delta: &SharedDelta,
    ) -> String {
        let mut s = String::new();
        let filter_jumps = self.jumps_to_insert().iter().any(|j| j.table == "filter");
        if !delta.filter.is_empty() || filter_jumps {
            s.push_str("*filter\n");
            self.insert_jumps(&mut s, "filter");
            s.push_str(&delta.filter);
            s.push_str("COMMIT\n");
        }
        s.push_str("*nat\n");
        self.declare_port_chains(&mut s, written, stale);
        self.insert_jumps(&mut s, "nat");
        s.push_str(&delta.nat_delete);
        s.push_str(&delta.nat_add);
        self.write_port_chains(&mut s, written, stale);
        s.push_str("COMMIT\n");
        s
    }

    /// Declares (creates or flushes) the chains of the written ports and the stale chains.
    fn declare_port_chains(
        &self,
        s: &mut String,
        written: &[&ServicePortName],
        stale: &BTreeSet<String>,
    ) {
        for c in written
            .iter()
            .filter_map(|k| self.fragments.get(*k))
            .flat_map(|f| &f.chains)
        {
            declare(s, c);
        }
        for c in stale {
            declare(s, c);
        }
    }

    /// Fills the written ports' chains and deletes the stale ones.
    fn write_port_chains(
        &self,
        s: &mut String,
        written: &[&ServicePortName],
        stale: &BTreeSet<String>,
    ) {
        for f in written.iter().filter_map(|k| self.fragments.get(*k)) {
            s.push_str(&f.chain_rules);
        }
        for c in stale {
            s.push_str("-X ");
            s.push_str(c);
            s.push('\n');
        }
    }

    /// The jump rules the next batch inserts: those missing in the kernel, or all on a
    /// fresh node.
    fn jumps_to_insert(&self) -> Vec<JumpRule> {
        self.pending_jumps
            .clone()
            .unwrap_or_else(|| self.applicable_jumps())
    }

    fn insert_jumps(&self, s: &mut String, table: &str) {
        for j in self.jumps_to_insert().iter().filter(|j| j.table == table) {
            s.push_str(&format!("-I {} 1 {}\n", j.from, j.args()));
        }
    }

    fn write_nodeports_jump(&self, s: &mut String, localnet: bool) {
        const COMMENT: &str = "-m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\"";
        match &self.cfg.node_port_addresses {
            NodePortAddresses::All => {
                let exclude = match self.cfg.family {
                    IpFamily::V6 => " ! -d ::1/128",
                    IpFamily::V4 if !localnet => " ! -d 127.0.0.0/8",
                    IpFamily::V4 => "",
                };
                s.push_str(&format!("-A KUBE-SERVICES {COMMENT} -m addrtype --dst-type LOCAL{exclude} -j KUBE-NODEPORTS\n"));
            }
            NodePortAddresses::Ips(ips) => {
                for ip in ips.iter().filter(|ip| self.cfg.family.contains(ip)) {
                    if ip.is_loopback() && !localnet {
                        continue;
                    }
                    s.push_str(&format!(
                        "-A KUBE-SERVICES {COMMENT} -d {ip} -j KUBE-NODEPORTS\n"
                    ));
                }
            }
        }
    }
}

/// Line-level changes of the shared chains between old and new fragments.
#[derive(Debug, Default)]
struct SharedDelta {
    /// filter: `-D` lines, then `-A` lines.
    filter: String,
    /// nat: `-D` lines (before any `-X` of the chains they jump to).
    nat_delete: String,
    /// nat: `-A` lines, and `-I KUBE-SERVICES 1` for KUBE-SERVICES.
    nat_add: String,
}

impl SharedDelta {
    fn between(old: &[&PortFragment], new: &[&PortFragment]) -> SharedDelta {
        fn lines<'a>(frags: &[&'a PortFragment], nat: bool) -> HashSet<&'a str> {
            frags
                .iter()
                .flat_map(|f| {
                    let parts: [&'a str; 4] = if nat {
                        [&f.nat_services, &f.nat_nodeports, "", ""]
                    } else {
                        [
                            &f.filter_services,
                            &f.filter_external,
                            &f.filter_nodeports,
                            &f.filter_firewall,
                        ]
                    };
                    parts.into_iter().flat_map(str::lines)
                })
                .collect()
        }
        let mut d = SharedDelta::default();
        for nat in [false, true] {
            let (old_lines, new_lines) = (lines(old, nat), lines(new, nat));
            let mut removed: Vec<&str> = old_lines.difference(&new_lines).copied().collect();
            let mut added: Vec<&str> = new_lines.difference(&old_lines).copied().collect();
            removed.sort_unstable();
            added.sort_unstable();
            let (del_buf, add_buf) = if nat {
                (&mut d.nat_delete, &mut d.nat_add)
            } else {
                (&mut d.filter, &mut String::new())
            };
            for l in &removed {
                del_buf.push_str("-D");
                del_buf.push_str(&l[2..]);
                del_buf.push('\n');
            }
            let mut filter_adds = String::new();
            let add_buf: &mut String = if nat { add_buf } else { &mut filter_adds };
            for l in &added {
                match l.strip_prefix("-A KUBE-SERVICES ") {
                    Some(rest) if nat => {
                        add_buf.push_str("-I KUBE-SERVICES 1 ");
                        add_buf.push_str(rest);
                    }
                    _ => add_buf.push_str(l),
                }
                add_buf.push('\n');
            }
            if !nat {
                d.filter.push_str(&filter_adds);
            }
        }
        d
    }

    fn is_empty(&self) -> bool {
        self.filter.is_empty() && self.nat_delete.is_empty() && self.nat_add.is_empty()
    }
}

fn declare(s: &mut String, chain: &str) {
    s.push(':');
    s.push_str(chain);
    s.push_str(" - [0:0]\n");
}
