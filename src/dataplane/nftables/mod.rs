//! nftables mode: one table per family (`ip svcproxy`, `ip6 svcproxy`) with static base and
//! helper chains, and the changing data in verdict maps, sets and per-service chains.
//!
//! The layout is upstream kube-proxy's nftables mode: `services` dispatches through the
//! `service-ips` map (`daddr . l4proto . dport : goto chain`) and the `service-nodeports`
//! map (`l4proto . dport`); services without usable endpoints are refused or dropped
//! through `no-endpoint-services` / `no-endpoint-nodeports`; loadBalancerSourceRanges go
//! through `firewall-ips`. Every service port has readable chains (`service-`, `local-`,
//! `external-`, `firewall-`, `endpoint-` + hash + `ns/name/proto/port`).
//!
//! This module is the pure renderer: [`render_port`] turns one service port into
//! [`PortRules`], [`static_rules`] the node-wide part into [`StaticRules`]. [`diff`] keeps
//! what was committed and writes the transactions; [`backend`] decides when; [`edge`] is
//! the only code that runs `nft`; [`fake`] is an in-memory nftables for tests.

pub mod backend;
pub mod diff;
pub mod edge;
pub mod fake;
mod port;

use std::fmt::Write as _;

pub use port::{local_match, render_port};

use crate::dataplane::iptables::{NodePortAddresses, RenderConfig};
use crate::model::IpFamily;

/// svcproxy's table name (in both families).
pub const TABLE: &str = "svcproxy";
/// Upstream kube-proxy's nftables table name, removed when svcproxy takes a node over.
pub const UPSTREAM_TABLE: &str = "kube-proxy";

/// Verdict map: `daddr . l4proto . dport` of every ClusterIP, external IP and
/// load-balancer IP with endpoints, to the chain that balances it.
pub const SERVICE_IPS: &str = "service-ips";
/// Verdict map: `l4proto . dport` of every NodePort with endpoints.
pub const SERVICE_NODEPORTS: &str = "service-nodeports";
/// Verdict map: service addresses without usable endpoints, to `drop` or the reject chain.
pub const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
/// Verdict map: NodePorts without usable endpoints.
pub const NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";
/// Verdict map: load-balancer addresses with loadBalancerSourceRanges, to their firewall chain.
pub const FIREWALL_IPS: &str = "firewall-ips";
/// Set of every ClusterIP (traffic to a ClusterIP on a port it does not serve is refused).
pub const CLUSTER_IPS: &str = "cluster-ips";
/// Set of the node addresses that accept NodePorts (`--nodeport-addresses`).
pub const NODEPORT_IPS: &str = "nodeport-ips";

/// Helper chain: sets the masquerade mark.
pub const MARK_FOR_MASQUERADE: &str = "mark-for-masquerade";
/// Helper chain: refuses the packet (a verdict map cannot say `reject` itself).
pub const REJECT_CHAIN: &str = "reject-chain";
/// Entry chain of service DNAT.
pub const SERVICES_CHAIN: &str = "services";

/// The `ip` / `ip6` keyword of a family (table family and address match).
pub fn ip_kw(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    }
}

/// The nft address type of a family.
pub fn addr_type(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ipv4_addr",
        IpFamily::V6 => "ipv6_addr",
    }
}

/// One regular chain and its rules (one per line, in nft syntax).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chain {
    /// Chain name.
    pub name: String,
    /// Rules, each ended by `\n`.
    pub body: String,
}

impl Chain {
    /// Number of rules (what the kernel listing is checked against).
    pub fn rule_count(&self) -> usize {
        self.body.lines().count()
    }
}

/// A named set (or map) and its declaration (`type … ; flags … ;`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetDecl {
    /// Set name.
    pub name: String,
    /// What goes between the braces of `add set`.
    pub decl: String,
}

impl SetDecl {
    /// `map` for verdict maps, `set` otherwise.
    pub fn keyword(&self) -> &'static str {
        if self.decl.contains(": verdict") {
            "map"
        } else {
            "set"
        }
    }
}

/// One element of a named set (`value` is `None`) or verdict map.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Element {
    /// The set or map.
    pub map: &'static str,
    /// Key in nft syntax (`10.96.0.1 . tcp . 80`).
    pub key: String,
    /// Verdict in nft syntax (`goto service-…`, `drop`), for maps.
    pub value: Option<String>,
}

/// Everything one service port owns in one family's table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortRules {
    /// Chains owned by the port, in creation order.
    pub chains: Vec<Chain>,
    /// ClientIP affinity sets (dynamic, with timeouts).
    pub sets: Vec<SetDecl>,
    /// Elements of the shared maps and sets.
    pub elements: Vec<Element>,
    /// ITP Local without a local endpoint.
    pub no_local_internal: bool,
    /// ETP Local without a local endpoint.
    pub no_local_external: bool,
}

impl PortRules {
    /// Drops spare capacity: rules stay in the mirror until the service changes.
    fn shrink(&mut self) {
        for c in &mut self.chains {
            c.body.shrink_to_fit();
        }
        self.chains.shrink_to_fit();
        self.sets.shrink_to_fit();
        self.elements.shrink_to_fit();
    }
}

/// A base chain: a regular chain plus its hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseChain {
    /// The chain and its rules.
    pub chain: Chain,
    /// `type … hook … priority … ;`, or empty for a regular chain.
    pub hook: String,
}

/// The node-wide part of a family's table: maps and sets, base chains at upstream's
/// priorities and the helper chains. It only changes with the settings, and a change
/// rewrites the whole table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaticRules {
    /// Named maps and sets.
    pub sets: Vec<SetDecl>,
    /// Base and helper chains.
    pub chains: Vec<BaseChain>,
    /// Elements of node-wide sets (`nodeport-ips`).
    pub elements: Vec<Element>,
}

/// Renders the static part of `cfg.family`'s table.
pub fn static_rules(cfg: &RenderConfig) -> StaticRules {
    let family = cfg.family;
    let ip = ip_kw(family);
    let at = addr_type(family);
    let mark = cfg.masquerade_mark();
    let vmap = |name: &str, key: &str, comment: &str| SetDecl {
        name: name.to_string(),
        decl: format!("type {key} : verdict ; comment \"{comment}\" ;"),
    };
    let sets = vec![
        SetDecl {
            name: CLUSTER_IPS.into(),
            decl: format!("type {at} ; comment \"Active ClusterIPs\" ;"),
        },
        SetDecl {
            name: NODEPORT_IPS.into(),
            decl: format!("type {at} ; comment \"IPs that accept NodePort traffic\" ;"),
        },
        vmap(
            SERVICE_IPS,
            &format!("{at} . inet_proto . inet_service"),
            "ClusterIP, ExternalIP and LoadBalancer IP traffic",
        ),
        vmap(
            SERVICE_NODEPORTS,
            "inet_proto . inet_service",
            "NodePort traffic",
        ),
        vmap(
            NO_ENDPOINT_SERVICES,
            &format!("{at} . inet_proto . inet_service"),
            "vmap to drop or reject packets to services with no endpoints",
        ),
        vmap(
            NO_ENDPOINT_NODEPORTS,
            "inet_proto . inet_service",
            "vmap to drop or reject packets to service nodeports with no endpoints",
        ),
        vmap(
            FIREWALL_IPS,
            &format!("{at} . inet_proto . inet_service"),
            "destinations that are subject to LoadBalancerSourceRanges",
        ),
    ];

    let localnet = cfg.serves_localhost_node_ports();
    // Which destinations are NodePort destinations.
    let nodeport_match = match &cfg.node_port_addresses {
        NodePortAddresses::All => {
            let exclude = match family {
                IpFamily::V6 => " ip6 daddr != ::1",
                IpFamily::V4 if !localnet => " ip daddr != 127.0.0.0/8",
                IpFamily::V4 => "",
            };
            format!("fib daddr type local{exclude}")
        }
        NodePortAddresses::Ips(_) => format!("{ip} daddr @{NODEPORT_IPS}"),
    };
    let elements = match &cfg.node_port_addresses {
        NodePortAddresses::All => Vec::new(),
        NodePortAddresses::Ips(ips) => ips
            .iter()
            .filter(|a| family.contains(a) && (localnet || !a.is_loopback()))
            .map(|a| Element {
                map: NODEPORT_IPS,
                key: a.to_string(),
                value: None,
            })
            .collect(),
    };
    let dispatch = format!("{ip} daddr . meta l4proto . th dport");
    let localnet_drop = "ip daddr 127.0.0.0/8 ip saddr != 127.0.0.0/8 ct state & (established | related) == 0 ct status & dnat == 0 drop comment \"block incoming localnet connections\"\n";

    let base = |name: &str, hook: &str, body: String| BaseChain {
        chain: Chain {
            name: name.to_string(),
            body,
        },
        hook: hook.to_string(),
    };
    let regular = |name: &str, body: String| base(name, "", body);
    // Filter chains run just before DNAT in prerouting and output (priority -110), so the
    // firewall sees the load-balancer address; input and forward come after prerouting's
    // DNAT anyway. The endpoint checks for locally generated traffic run after DNAT (-90),
    // as in iptables mode, so short-circuited traffic is not refused.
    let mut input = String::from(
        "ct state new jump nodeport-endpoints-check\nct state new jump service-endpoints-check\n",
    );
    let mut output_post = String::from(
        "ct state new jump service-endpoints-check\nct state new jump cluster-ips-check\n",
    );
    if localnet {
        input.push_str(localnet_drop);
        output_post.push_str(localnet_drop);
    }
    let mut forward = String::new();
    if !cfg.conntrack_tcp_liberal {
        forward.push_str("ct state invalid drop\n");
    }
    forward.push_str(
        "ct state new jump service-endpoints-check\nct state new jump cluster-ips-check\n",
    );
    let masquerade = if cfg.random_fully {
        "masquerade fully-random"
    } else {
        "masquerade"
    };
    let chains = vec![
        base(
            "filter-prerouting",
            "type filter hook prerouting priority -110 ;",
            "ct state new jump firewall-check\n".into(),
        ),
        base(
            "filter-input",
            "type filter hook input priority -110 ;",
            input,
        ),
        base(
            "filter-forward",
            "type filter hook forward priority -110 ;",
            forward,
        ),
        base(
            "filter-output",
            "type filter hook output priority -110 ;",
            "ct state new jump firewall-check\n".into(),
        ),
        base(
            "filter-output-post-dnat",
            "type filter hook output priority -90 ;",
            output_post,
        ),
        base(
            "nat-prerouting",
            "type nat hook prerouting priority -100 ;",
            format!("jump {SERVICES_CHAIN}\n"),
        ),
        base(
            "nat-output",
            "type nat hook output priority -100 ;",
            format!("jump {SERVICES_CHAIN}\n"),
        ),
        base(
            "nat-postrouting",
            "type nat hook postrouting priority 100 ;",
            "jump masquerading\n".into(),
        ),
        regular(
            "cluster-ips-check",
            format!(
                "{ip} daddr @{CLUSTER_IPS} reject comment \"Reject traffic to invalid ports of ClusterIPs\"\n"
            ),
        ),
        regular(
            "firewall-check",
            format!("{dispatch} vmap @{FIREWALL_IPS}\n"),
        ),
        regular(
            "service-endpoints-check",
            format!("{dispatch} vmap @{NO_ENDPOINT_SERVICES}\n"),
        ),
        regular(
            "nodeport-endpoints-check",
            format!("{nodeport_match} meta l4proto . th dport vmap @{NO_ENDPOINT_NODEPORTS}\n"),
        ),
        regular(REJECT_CHAIN, "reject\n".into()),
        regular(
            MARK_FOR_MASQUERADE,
            format!("meta mark set meta mark or {mark}\n"),
        ),
        regular(
            "masquerading",
            format!(
                "meta mark & {mark} == 0 return\nmeta mark set meta mark xor {mark}\n{masquerade}\n"
            ),
        ),
        regular(
            SERVICES_CHAIN,
            format!(
                "{dispatch} vmap @{SERVICE_IPS}\n{nodeport_match} meta l4proto . th dport vmap @{SERVICE_NODEPORTS}\n"
            ),
        ),
    ];
    StaticRules {
        sets,
        chains,
        elements,
    }
}

/// Writes `add element` commands for `elements` (all of one family), grouped by map.
pub(crate) fn write_elements<'a>(
    out: &mut String,
    family: IpFamily,
    command: &str,
    elements: impl IntoIterator<Item = (&'a str, &'a str, Option<&'a str>)>,
) {
    // Keep the order of first appearance of each map, elements in their given order.
    type Group<'a> = (&'a str, Vec<(&'a str, Option<&'a str>)>);
    let mut groups: Vec<Group> = Vec::new();
    for (map, key, value) in elements {
        match groups.iter_mut().find(|(m, _)| *m == map) {
            Some((_, v)) => v.push((key, value)),
            None => groups.push((map, vec![(key, value)])),
        }
    }
    const CHUNK: usize = 1000;
    for (map, elems) in groups {
        for chunk in elems.chunks(CHUNK) {
            let _ = write!(out, "{command} element {} {TABLE} {map} {{ ", ip_kw(family));
            for (i, (key, value)) in chunk.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(key);
                if let Some(v) = value {
                    out.push_str(" : ");
                    out.push_str(v);
                }
            }
            out.push_str(" }\n");
        }
    }
}
