//! The rules of one service port, rendered in upstream kube-proxy's layout.
//!
//! A [`PortFragment`] holds the lines a service port contributes to the shared chains
//! (KUBE-SERVICES, KUBE-NODEPORTS, ...) and the bodies of the chains it owns (SVC, SVL, EXT,
//! FW, SEP). Fragments are cached by the renderer, so a partial sync re-renders only the
//! services that changed and copies the rest.

use crate::dataplane::naming::{self, EXT_PREFIX, FW_PREFIX, SVC_PREFIX, SVL_PREFIX};
use crate::model::types::push_ip;
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
    /// Rules this fragment adds to the filter table (`kubeproxy_sync_proxy_rules_iptables_total`).
    pub filter_rules: u32,
    /// Rules this fragment adds to the nat table.
    pub nat_rules: u32,
}

/// Lines in rule text (every rule ends with a newline).
fn lines(text: &str) -> u32 {
    text.bytes().filter(|b| *b == b'\n').count() as u32
}

/// Writes one rule line straight into a buffer: `-A chain` and then the pieces.
struct Line<'a> {
    buf: &'a mut String,
}

fn line<'a>(buf: &'a mut String, chain: &str) -> Line<'a> {
    buf.push_str("-A ");
    buf.push_str(chain);
    Line { buf }
}

impl Line<'_> {
    /// Appends ` piece` (nothing when empty).
    fn arg(self, piece: &str) -> Self {
        if !piece.is_empty() {
            self.buf.push(' ');
            self.buf.push_str(piece);
        }
        self
    }

    /// Appends `-m comment --comment TEXT`, quoted when it contains spaces, as upstream.
    fn comment(self, parts: &[&str]) -> Self {
        let spaced = parts.iter().any(|p| p.contains(' '));
        self.buf.push_str(" -m comment --comment ");
        if spaced {
            self.buf.push('"');
        }
        for p in parts {
            self.buf.push_str(p);
        }
        if spaced {
            self.buf.push('"');
        }
        self
    }

    /// Ends the line with `-j target`.
    fn jump(self, target: &str) {
        self.buf.push_str(" -j ");
        self.buf.push_str(target);
        self.buf.push('\n');
    }

    /// Ends the line without a target.
    fn end(self) {
        self.buf.push('\n');
    }
}

/// `--probability` value when `n` endpoints remain, formatted like upstream (`%0.10f`).
/// The common small values are formatted once per process.
fn probability(n: usize) -> std::borrow::Cow<'static, str> {
    static TABLE: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        (0..256)
            .map(|n| format!("{:.10}", 1.0 / n as f64))
            .collect()
    });
    match table.get(n) {
        Some(s) => std::borrow::Cow::Borrowed(s.as_str()),
        None => std::borrow::Cow::Owned(format!("{:.10}", 1.0 / n as f64)),
    }
}

/// One reachable endpoint with the text its rules need.
struct EndpointText<'a> {
    ep: &'a Endpoint,
    ip: String,
    addr: String,
    chain: String,
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
    let m_proto = format!("-m {proto} -p {proto}");
    let dport = format!("--dport {}", port.port);
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

    // Filter verdict and comment for a path that has nowhere to go.
    let filter_for = |plan: PathPlan| match plan {
        PathPlan::Reject => Some(("REJECT", " has no endpoints")),
        PathPlan::Drop => Some(("DROP", " has no local endpoints")),
        PathPlan::Cluster | PathPlan::Local => None,
    };
    let internal_filter = filter_for(sel.internal);
    let external_filter = filter_for(sel.external);
    f.no_local_internal = sel.internal == PathPlan::Drop;
    f.no_local_external = sel.external == PathPlan::Drop && externally_accessible;

    let cluster_dest = format!("{m_proto} -d {cluster_ip} {dport}");

    // ClusterIP.
    match internal_filter {
        None => line(&mut f.nat_services, KUBE_SERVICES)
            .comment(&[&spn, " cluster IP"])
            .arg(&cluster_dest)
            .jump(internal_chain),
        Some((target, why)) => line(&mut f.filter_services, KUBE_SERVICES)
            .comment(&[&spn, why])
            .arg(&cluster_dest)
            .jump(target),
    }

    // External IPs and load-balancer IPs.
    let dest = |ip: &str| format!("{m_proto} -d {ip} {dport}");
    for ip in &external_ips {
        if sel.has_endpoints {
            line(&mut f.nat_services, KUBE_SERVICES)
                .comment(&[&spn, " external IP"])
                .arg(&dest(ip))
                .jump(&ext_chain);
        }
    }
    for ip in &lb_ips {
        if sel.has_endpoints {
            line(&mut f.nat_services, KUBE_SERVICES)
                .comment(&[&spn, " loadbalancer IP"])
                .arg(&dest(ip))
                .jump(lb_chain);
        }
        if uses_fw_chain {
            line(&mut f.filter_firewall, KUBE_PROXY_FIREWALL)
                .comment(&[&spn, " traffic not accepted by ", &fw_chain])
                .arg(&dest(ip))
                .jump("DROP");
        }
    }
    if let Some((target, why)) = external_filter {
        for ip in external_ips.iter().chain(&lb_ips) {
            line(&mut f.filter_external, KUBE_EXTERNAL_SERVICES)
                .comment(&[&spn, why])
                .arg(&dest(ip))
                .jump(target);
        }
    }

    // NodePort.
    if let Some(node_port) = port.node_port {
        let np = format!("--dport {node_port}");
        if sel.has_endpoints {
            line(&mut f.nat_nodeports, KUBE_NODEPORTS)
                .comment(&[&spn])
                .arg(&m_proto)
                .arg(&np)
                .jump(&ext_chain);
        }
        if let Some((target, why)) = external_filter {
            line(&mut f.filter_external, KUBE_EXTERNAL_SERVICES)
                .comment(&[&spn, why])
                .arg("-m addrtype --dst-type LOCAL")
                .arg(&m_proto)
                .arg(&np)
                .jump(target);
        }
    }

    // Health-check node port: accepted whether or not there are local endpoints.
    if let Some(hc) = port.health_check_node_port {
        line(&mut f.filter_nodeports, KUBE_NODEPORTS)
            .comment(&[&spn, " health check node port"])
            .arg("-m tcp -p tcp --dport")
            .arg(&hc.to_string())
            .jump("ACCEPT");
    }

    // Per-service chains. Declaration order: EXT, FW, SVC, SVL, then SEPs.
    // Roughly 4 lines of ~100 bytes per endpoint chain plus the service chains.
    f.chain_rules.reserve(512 + sel.reachable.len() * 400);
    let rules = &mut f.chain_rules;
    if internal_filter.is_none() {
        if cfg.masquerade_all {
            line(rules, internal_chain)
                .comment(&[&spn, " cluster IP"])
                .arg(&cluster_dest)
                .jump(KUBE_MARK_MASQ);
        } else if let Some(not_local) = cfg.local_detector.if_not_local(family) {
            line(rules, internal_chain)
                .comment(&[&spn, " cluster IP"])
                .arg(&cluster_dest)
                .arg(&not_local)
                .jump(KUBE_MARK_MASQ);
        }
    }

    if uses_ext_chain {
        f.chains.push(ext_chain.clone());
        if !port.external_policy_local {
            line(rules, &ext_chain)
                .comment(&["masquerade traffic for ", &spn, " external destinations"])
                .jump(KUBE_MARK_MASQ);
        } else {
            if let Some(local) = cfg.local_detector.if_local(family) {
                line(rules, &ext_chain)
                    .comment(&["pod traffic for ", &spn, " external destinations"])
                    .arg(&local)
                    .jump(&svc_chain);
            }
            line(rules, &ext_chain)
                .comment(&[
                    "masquerade LOCAL traffic for ",
                    &spn,
                    " external destinations",
                ])
                .arg("-m addrtype --src-type LOCAL")
                .jump(KUBE_MARK_MASQ);
            line(rules, &ext_chain)
                .comment(&["route LOCAL traffic for ", &spn, " external destinations"])
                .arg("-m addrtype --src-type LOCAL")
                .jump(&svc_chain);
        }
        if external_filter.is_none() {
            line(rules, &ext_chain).jump(external_policy_chain);
        }
    }

    if uses_fw_chain {
        f.chains.push(fw_chain.clone());
        // Traffic from the node to its own VIP arrives with the VIP as source.
        let allow_from_node = node
            .addresses
            .iter()
            .find(|ip| family.contains(ip))
            .is_some_and(|ip| source_ranges.iter().any(|n| n.contains(ip)));
        for net in &source_ranges {
            line(rules, &fw_chain)
                .comment(&[&spn, " loadbalancer IP"])
                .arg("-s")
                .arg(&net.to_string())
                .jump(&ext_chain);
        }
        if allow_from_node {
            for ip in &lb_ips {
                line(rules, &fw_chain)
                    .comment(&[&spn, " loadbalancer IP"])
                    .arg("-s")
                    .arg(ip)
                    .jump(&ext_chain);
            }
        }
        line(rules, &fw_chain)
            .comment(&[
                "other traffic to ",
                &spn,
                " will be dropped by ",
                KUBE_PROXY_FIREWALL,
            ])
            .end();
    }

    let endpoints: Vec<EndpointText> = sel
        .reachable
        .iter()
        .map(|ep| {
            let addr = ep.addr_string();
            let mut ip = String::with_capacity(16);
            push_ip(&mut ip, &ep.ip);
            EndpointText {
                ep,
                ip,
                chain: naming::endpoint_chain(&spn, proto, &addr),
                addr,
            }
        })
        .collect();
    let text_of = |ep: &Endpoint| -> &EndpointText {
        endpoints
            .iter()
            .find(|t| std::ptr::eq(t.ep, ep))
            .expect("selected endpoints are reachable")
    };
    let write_balancing = |rules: &mut String, chain: &str, eps: &[&Endpoint]| {
        let affinity = match port.session_affinity {
            SessionAffinity::ClientIp { timeout_seconds } => Some(timeout_seconds.to_string()),
            SessionAffinity::None => None,
        };
        if let Some(timeout) = &affinity {
            for ep in eps {
                let t = text_of(ep);
                let mut l = line(rules, chain);
                if comments_on_endpoints {
                    l = l.comment(&[&spn, " -> ", &t.addr]);
                }
                l.arg("-m recent --name")
                    .arg(&t.chain)
                    .arg("--rcheck --seconds")
                    .arg(timeout)
                    .arg("--reap")
                    .jump(&t.chain);
            }
        }
        let n = eps.len();
        for (i, ep) in eps.iter().enumerate() {
            let t = text_of(ep);
            let mut l = line(rules, chain);
            if comments_on_endpoints {
                l = l.comment(&[&spn, " -> ", &t.addr]);
            }
            if i + 1 < n {
                l = l
                    .arg("-m statistic --mode random --probability")
                    .arg(&probability(n - i));
            }
            l.jump(&t.chain);
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

    let affinity = matches!(port.session_affinity, SessionAffinity::ClientIp { .. });
    for t in &endpoints {
        let mut l = line(rules, &t.chain);
        if comments_on_endpoints {
            l = l.comment(&[&spn]);
        }
        l.arg("-s").arg(&t.ip).jump(KUBE_MARK_MASQ);
        let mut l = line(rules, &t.chain);
        if comments_on_endpoints {
            l = l.comment(&[&spn]);
        }
        if affinity {
            l = l.arg("-m recent --name").arg(&t.chain).arg("--set");
        }
        l.arg(&m_proto)
            .arg("-j DNAT --to-destination")
            .arg(&t.addr)
            .end();
    }
    f.chains.extend(endpoints.into_iter().map(|t| t.chain));
    f.filter_rules = lines(&f.filter_services)
        + lines(&f.filter_external)
        + lines(&f.filter_nodeports)
        + lines(&f.filter_firewall);
    f.nat_rules = lines(&f.nat_services) + lines(&f.nat_nodeports) + lines(&f.chain_rules);
    // Fragments live in the cache until their service changes: keep no slack.
    f.chain_rules.shrink_to_fit();
    f.chains.shrink_to_fit();
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
