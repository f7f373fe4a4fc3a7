//! The rules of one service port, rendered in upstream kube-proxy's layout.
//!
//! A [`PortFragment`] holds the lines a service port contributes to the shared chains
//! (KUBE-SERVICES, KUBE-NODEPORTS, ...) and the bodies of the chains it owns (SVC, SVL, EXT,
//! FW, SEP). Fragments are cached by the renderer, so a partial sync re-renders only the
//! services that changed and copies the rest.

use std::fmt::Write as _;

use crate::dataplane::naming::{self, EXT_PREFIX, FW_PREFIX, SVC_PREFIX, SVL_PREFIX};
use crate::model::{
    Endpoint, IpFamily, NodeInfo, PathPlan, ServicePortState, SessionAffinity, select,
};

use super::{
    KUBE_EXTERNAL_SERVICES, KUBE_MARK_MASQ, KUBE_NODEPORTS, KUBE_PROXY_FIREWALL, KUBE_SERVICES,
    RenderConfig,
};

/// What one service port contributes to the rule set of one family.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortFragment {
    /// filter KUBE-SERVICES lines (no-endpoint REJECT / no-local-endpoint DROP).
    pub filter_services: String,
    /// filter KUBE-EXTERNAL-SERVICES lines.
    pub filter_external: String,
    /// filter KUBE-NODEPORTS lines (health-check node port ACCEPT).
    pub filter_nodeports: String,
    /// filter KUBE-PROXY-FIREWALL lines (loadBalancerSourceRanges DROP).
    pub filter_firewall: String,
    /// nat KUBE-SERVICES lines.
    pub nat_services: String,
    /// nat KUBE-NODEPORTS lines.
    pub nat_nodeports: String,
    /// nat chains owned by this port, in declaration order.
    pub chains: Vec<String>,
    /// Rules of the owned chains.
    pub chain_rules: String,
    /// ITP Local without a local endpoint (`kubeproxy_sync_proxy_rules_no_local_endpoints_total`).
    pub no_local_internal: bool,
    /// ETP Local without a local endpoint.
    pub no_local_external: bool,
}

/// Appends one rule line: `-A chain` followed by the given pieces, space-separated.
fn rule(buf: &mut String, chain: &str, parts: &[&str]) {
    buf.push_str("-A ");
    buf.push_str(chain);
    for p in parts {
        if !p.is_empty() {
            buf.push(' ');
            buf.push_str(p);
        }
    }
    buf.push('\n');
}

/// Quotes a comment that contains spaces, as upstream writes it.
fn quoted(text: &str) -> String {
    if text.contains(' ') {
        format!("\"{text}\"")
    } else {
        text.to_string()
    }
}

/// `--probability` value for the i-th of n remaining endpoints, formatted like upstream.
fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

/// Renders the fragment of one service port for `cfg.family`.
///
/// `comments_on_endpoints` is false in upstream's large-cluster mode, where the per-endpoint
/// comments are omitted to shrink the restore input.
pub fn render_port(
    cfg: &RenderConfig,
    node: &NodeInfo,
    st: &ServicePortState,
    comments_on_endpoints: bool,
) -> PortFragment {
    let mut f = PortFragment::default();
    let port = &*st.port;
    let family = cfg.family;
    // A service without a cluster IP of this family is served by the other family's proxier.
    let Some(cluster_ip) = port.cluster_ip_for(family) else {
        return f;
    };
    let sel = select(port, &st.endpoints, family, node);
    let spn = port.name.to_string();
    let proto = port.name.protocol.as_str();
    let hash = naming::port_hash(&port.name);
    let svc_chain = format!("{SVC_PREFIX}{hash}");
    let svl_chain = format!("{SVL_PREFIX}{hash}");
    let ext_chain = format!("{EXT_PREFIX}{hash}");
    let fw_chain = format!("{FW_PREFIX}{hash}");
    let cluster_ip = cluster_ip.to_string();
    let port_num = port.port.to_string();
    let external_ips: Vec<String> = port
        .external_ips_for(family)
        .map(|ip| ip.to_string())
        .collect();
    let lb_ips: Vec<String> = port
        .load_balancer_ips_for(family)
        .map(|ip| ip.to_string())
        .collect();
    let source_ranges: Vec<_> = port.source_ranges_for(family).collect();
    let externally_accessible = port.externally_accessible(family);

    let internal_chain = if port.internal_policy_local {
        &svl_chain
    } else {
        &svc_chain
    };
    let external_policy_chain = if port.external_policy_local {
        &svl_chain
    } else {
        &svc_chain
    };
    let uses_ext_chain = sel.has_endpoints && externally_accessible;
    let uses_fw_chain = sel.has_endpoints && !lb_ips.is_empty() && !source_ranges.is_empty();
    let lb_chain = if uses_fw_chain { &fw_chain } else { &ext_chain };

    let no_endpoints_comment = quoted(&format!("{spn} has no endpoints"));
    let no_local_comment = quoted(&format!("{spn} has no local endpoints"));
    let filter_for = |plan: PathPlan| match plan {
        PathPlan::Reject => Some(("REJECT", &no_endpoints_comment)),
        PathPlan::Drop => Some(("DROP", &no_local_comment)),
        PathPlan::Cluster | PathPlan::Local => None,
    };
    let internal_filter = filter_for(sel.internal);
    let external_filter = filter_for(sel.external);
    f.no_local_internal = sel.internal == PathPlan::Drop;
    f.no_local_external = sel.external == PathPlan::Drop && externally_accessible;

    let m_proto = ["-m", proto, "-p", proto];
    let cluster_ip_comment = quoted(&format!("{spn} cluster IP"));

    // ClusterIP.
    match internal_filter {
        None => rule(
            &mut f.nat_services,
            KUBE_SERVICES,
            &[
                "-m comment --comment",
                &cluster_ip_comment,
                &m_proto.join(" "),
                "-d",
                &cluster_ip,
                "--dport",
                &port_num,
                "-j",
                internal_chain,
            ],
        ),
        Some((target, comment)) => rule(
            &mut f.filter_services,
            KUBE_SERVICES,
            &[
                "-m comment --comment",
                comment,
                &m_proto.join(" "),
                "-d",
                &cluster_ip,
                "--dport",
                &port_num,
                "-j",
                target,
            ],
        ),
    }

    // External IPs.
    let external_ip_comment = quoted(&format!("{spn} external IP"));
    for ip in &external_ips {
        if sel.has_endpoints {
            rule(
                &mut f.nat_services,
                KUBE_SERVICES,
                &[
                    "-m comment --comment",
                    &external_ip_comment,
                    &m_proto.join(" "),
                    "-d",
                    ip,
                    "--dport",
                    &port_num,
                    "-j",
                    &ext_chain,
                ],
            );
        }
        if let Some((target, comment)) = external_filter {
            rule(
                &mut f.filter_external,
                KUBE_EXTERNAL_SERVICES,
                &[
                    "-m comment --comment",
                    comment,
                    &m_proto.join(" "),
                    "-d",
                    ip,
                    "--dport",
                    &port_num,
                    "-j",
                    target,
                ],
            );
        }
    }

    // Load-balancer IPs.
    let lb_comment = quoted(&format!("{spn} loadbalancer IP"));
    let fw_drop_comment = quoted(&format!("{spn} traffic not accepted by {fw_chain}"));
    for ip in &lb_ips {
        if sel.has_endpoints {
            rule(
                &mut f.nat_services,
                KUBE_SERVICES,
                &[
                    "-m comment --comment",
                    &lb_comment,
                    &m_proto.join(" "),
                    "-d",
                    ip,
                    "--dport",
                    &port_num,
                    "-j",
                    lb_chain,
                ],
            );
        }
        if uses_fw_chain {
            rule(
                &mut f.filter_firewall,
                KUBE_PROXY_FIREWALL,
                &[
                    "-m comment --comment",
                    &fw_drop_comment,
                    &m_proto.join(" "),
                    "-d",
                    ip,
                    "--dport",
                    &port_num,
                    "-j DROP",
                ],
            );
        }
    }
    if let Some((target, comment)) = external_filter {
        for ip in &lb_ips {
            rule(
                &mut f.filter_external,
                KUBE_EXTERNAL_SERVICES,
                &[
                    "-m comment --comment",
                    comment,
                    &m_proto.join(" "),
                    "-d",
                    ip,
                    "--dport",
                    &port_num,
                    "-j",
                    target,
                ],
            );
        }
    }

    // NodePort.
    if let Some(node_port) = port.node_port {
        let np = node_port.to_string();
        if sel.has_endpoints {
            rule(
                &mut f.nat_nodeports,
                KUBE_NODEPORTS,
                &[
                    "-m comment --comment",
                    &spn,
                    &m_proto.join(" "),
                    "--dport",
                    &np,
                    "-j",
                    &ext_chain,
                ],
            );
        }
        if let Some((target, comment)) = external_filter {
            rule(
                &mut f.filter_external,
                KUBE_EXTERNAL_SERVICES,
                &[
                    "-m comment --comment",
                    comment,
                    "-m addrtype --dst-type LOCAL",
                    &m_proto.join(" "),
                    "--dport",
                    &np,
                    "-j",
                    target,
                ],
            );
        }
    }

    // Health-check node port: accepted whether or not there are local endpoints.
    if let Some(hc) = port.health_check_node_port {
        let comment = quoted(&format!("{spn} health check node port"));
        rule(
            &mut f.filter_nodeports,
            KUBE_NODEPORTS,
            &[
                "-m comment --comment",
                &comment,
                "-m tcp -p tcp --dport",
                &hc.to_string(),
                "-j ACCEPT",
            ],
        );
    }

    // Per-service chains. Declaration order: EXT, FW, SVC, SVL, then SEPs.
    let rules = &mut f.chain_rules;
    if sel.internal != PathPlan::Reject && sel.internal != PathPlan::Drop {
        let args = format!(
            "-m comment --comment {cluster_ip_comment} {} -d {cluster_ip} --dport {port_num}",
            m_proto.join(" ")
        );
        if cfg.masquerade_all {
            rule(rules, internal_chain, &[&args, "-j", KUBE_MARK_MASQ]);
        } else if let Some(not_local) = cfg.local_detector.if_not_local(family) {
            rule(
                rules,
                internal_chain,
                &[&args, &not_local, "-j", KUBE_MARK_MASQ],
            );
        }
    }

    if uses_ext_chain {
        f.chains.push(ext_chain.clone());
        if !port.external_policy_local {
            let c = quoted(&format!(
                "masquerade traffic for {spn} external destinations"
            ));
            rule(
                rules,
                &ext_chain,
                &["-m comment --comment", &c, "-j", KUBE_MARK_MASQ],
            );
        } else {
            if let Some(local) = cfg.local_detector.if_local(family) {
                let c = quoted(&format!("pod traffic for {spn} external destinations"));
                rule(
                    rules,
                    &ext_chain,
                    &["-m comment --comment", &c, &local, "-j", &svc_chain],
                );
            }
            let c = quoted(&format!(
                "masquerade LOCAL traffic for {spn} external destinations"
            ));
            rule(
                rules,
                &ext_chain,
                &[
                    "-m comment --comment",
                    &c,
                    "-m addrtype --src-type LOCAL -j",
                    KUBE_MARK_MASQ,
                ],
            );
            let c = quoted(&format!(
                "route LOCAL traffic for {spn} external destinations"
            ));
            rule(
                rules,
                &ext_chain,
                &[
                    "-m comment --comment",
                    &c,
                    "-m addrtype --src-type LOCAL -j",
                    &svc_chain,
                ],
            );
        }
        if external_filter.is_none() {
            rule(rules, &ext_chain, &["-j", external_policy_chain]);
        }
    }

    if uses_fw_chain {
        f.chains.push(fw_chain.clone());
        let allow_from_node = node
            .addresses
            .iter()
            .filter(|ip| family.contains(ip))
            .take(1)
            .any(|ip| source_ranges.iter().any(|n| n.contains(ip)));
        for net in &source_ranges {
            rule(
                rules,
                &fw_chain,
                &[
                    "-m comment --comment",
                    &lb_comment,
                    "-s",
                    &net.to_string(),
                    "-j",
                    &ext_chain,
                ],
            );
        }
        if allow_from_node {
            for ip in &lb_ips {
                rule(
                    rules,
                    &fw_chain,
                    &[
                        "-m comment --comment",
                        &lb_comment,
                        "-s",
                        ip,
                        "-j",
                        &ext_chain,
                    ],
                );
            }
        }
        let c = quoted(&format!(
            "other traffic to {spn} will be dropped by {KUBE_PROXY_FIREWALL}"
        ));
        rule(rules, &fw_chain, &["-m comment --comment", &c]);
    }

    let sep_chains: Vec<(&Endpoint, String)> = sel
        .reachable
        .iter()
        .map(|ep| (*ep, naming::endpoint_chain(&spn, proto, ep)))
        .collect();
    let chain_of = |ep: &Endpoint| -> &str {
        sep_chains
            .iter()
            .find(|(e, _)| std::ptr::eq(*e, ep))
            .map(|(_, c)| c.as_str())
            .unwrap_or_default()
    };
    let ep_comment = |ep: &Endpoint| {
        if comments_on_endpoints {
            format!("-m comment --comment \"{spn} -> {}\"", ep.addr_string())
        } else {
            String::new()
        }
    };
    let write_balancing = |rules: &mut String, chain: &str, eps: &[&Endpoint]| {
        if let SessionAffinity::ClientIp { timeout_seconds } = port.session_affinity {
            for ep in eps {
                let sep = chain_of(ep);
                let recent =
                    format!("-m recent --name {sep} --rcheck --seconds {timeout_seconds} --reap");
                rule(rules, chain, &[&ep_comment(ep), &recent, "-j", sep]);
            }
        }
        let n = eps.len();
        for (i, ep) in eps.iter().enumerate() {
            let stat = if i + 1 < n {
                format!(
                    "-m statistic --mode random --probability {}",
                    probability(n - i)
                )
            } else {
                String::new()
            };
            rule(rules, chain, &[&ep_comment(ep), &stat, "-j", chain_of(ep)]);
        }
    };
    if sel.uses_cluster_chain() {
        f.chains.push(svc_chain.clone());
        write_balancing(rules, &svc_chain, &sel.cluster);
    }
    if sel.uses_local_chain() {
        f.chains.push(svl_chain.clone());
        write_balancing(rules, &svl_chain, &sel.local);
    }

    let sep_comment = if comments_on_endpoints {
        format!("-m comment --comment {spn}")
    } else {
        String::new()
    };
    for (ep, sep) in &sep_chains {
        f.chains.push(sep.clone());
        let ip = ep.ip.to_string();
        rule(rules, sep, &[&sep_comment, "-s", &ip, "-j", KUBE_MARK_MASQ]);
        let affinity = match port.session_affinity {
            SessionAffinity::ClientIp { .. } => format!("-m recent --name {sep} --set"),
            SessionAffinity::None => String::new(),
        };
        let mut dnat = String::with_capacity(48);
        let _ = write!(
            dnat,
            "-m {proto} -p {proto} -j DNAT --to-destination {}",
            ep.addr_string()
        );
        rule(rules, sep, &[&sep_comment, &affinity, &dnat]);
    }
    f
}

/// How "traffic from a local pod" is recognised (`--detect-local-mode`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum LocalDetector {
    /// No detection: no masquerade of off-cluster ClusterIP traffic, no pod short-circuit.
    #[default]
    None,
    /// `ClusterCIDR` / `NodeCIDR`: pods are the sources inside these CIDRs (one per family).
    Cidrs(Vec<ipnet::IpNet>),
    /// `BridgeInterface`: pods arrive through this bridge.
    BridgeInterface(String),
    /// `InterfaceNamePrefix`: pods arrive through interfaces with this prefix.
    InterfaceNamePrefix(String),
}

impl LocalDetector {
    fn cidr(&self, family: IpFamily) -> Option<ipnet::IpNet> {
        match self {
            LocalDetector::Cidrs(c) => c.iter().copied().find(|n| family.contains(&n.addr())),
            _ => None,
        }
    }

    /// Match arguments for "from a local pod", if detection is configured for `family`.
    pub fn if_local(&self, family: IpFamily) -> Option<String> {
        match self {
            LocalDetector::None => None,
            LocalDetector::Cidrs(_) => self.cidr(family).map(|n| format!("-s {n}")),
            LocalDetector::BridgeInterface(i) => Some(format!("-i {i}")),
            LocalDetector::InterfaceNamePrefix(p) => Some(format!("-i {p}+")),
        }
    }

    /// Match arguments for "not from a local pod".
    pub fn if_not_local(&self, family: IpFamily) -> Option<String> {
        self.if_local(family).map(|m| format!("! {m}"))
    }
}
