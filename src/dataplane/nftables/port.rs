//! The nftables objects of one service port: its chains, its affinity sets and the map
//! elements that lead traffic into them.
//!
//! The translation follows the iptables fragment ([`crate::dataplane::iptables::render_port`])
//! path for path, with upstream kube-proxy's nftables names: what [`select`] decided is only
//! translated here, never re-decided.

use std::fmt::Write as _;

use crate::dataplane::iptables::{LocalDetector, RenderConfig};
use crate::dataplane::naming::nft_base;
use crate::model::types::push_ip;
use crate::model::{
    Endpoint, IpFamily, NodeInfo, PathPlan, ServicePortState, SessionAffinity, select,
};

use super::{
    CLUSTER_IPS, Chain, Element, FIREWALL_IPS, MARK_FOR_MASQUERADE, NO_ENDPOINT_NODEPORTS,
    NO_ENDPOINT_SERVICES, PortRules, REJECT_CHAIN, SERVICE_IPS, SERVICE_NODEPORTS, SetDecl,
    addr_type, ip_kw,
};

/// The `ip saddr 10.0.0.0/8` / `iifname "cbr0"` match for "from a local pod", or its
/// negation, if detection is configured for `family`.
pub fn local_match(det: &LocalDetector, family: IpFamily, negate: bool) -> Option<String> {
    let op = if negate { "!= " } else { "" };
    match det {
        LocalDetector::None => None,
        LocalDetector::Cidrs(nets) => nets
            .iter()
            .find(|n| family.contains(&n.addr()))
            .map(|n| format!("{} saddr {op}{n}", ip_kw(family))),
        LocalDetector::BridgeInterface(i) => Some(format!("iifname {op}\"{i}\"")),
        LocalDetector::InterfaceNamePrefix(p) => Some(format!("iifname {op}\"{p}*\"")),
    }
}

/// `dnat to` argument of an endpoint (`[ip]:port` for IPv6).
fn dnat_target(ep: &Endpoint) -> String {
    let mut s = String::with_capacity(24);
    if ep.ip.is_ipv6() {
        s.push('[');
        push_ip(&mut s, &ep.ip);
        s.push(']');
    } else {
        push_ip(&mut s, &ep.ip);
    }
    let _ = write!(s, ":{}", ep.port);
    s
}

/// Endpoint part of an endpoint chain name: `10.180.0.1/80`, `fd00.1..5/80` (no `:`, which
/// nft does not accept in names).
fn endpoint_text(ep: &Endpoint) -> String {
    let mut s = String::with_capacity(24);
    push_ip(&mut s, &ep.ip);
    let mut s = s.replace(':', ".");
    let _ = write!(s, "/{}", ep.port);
    s
}

struct EndpointNames<'a> {
    ep: &'a Endpoint,
    chain: String,
    affinity_set: String,
}

/// Renders the objects of one service port for `cfg.family`.
pub fn render_port(cfg: &RenderConfig, node: &NodeInfo, st: &ServicePortState) -> PortRules {
    let mut out = PortRules::default();
    let port = &*st.port;
    let family = cfg.family;
    let ip = ip_kw(family);
    // A service without a cluster IP of this family is served by the other family's rules.
    let Some(cluster_ip) = port.cluster_ip_for(family) else {
        return out;
    };
    let sel = select(port, &st.endpoints, family, node);
    let proto = port.name.protocol.as_str();
    let base_text = format!(
        "{}/{}/{proto}/{}",
        port.name.service.namespace, port.name.service.name, port.name.port
    );
    let base = nft_base(&base_text);
    let svc_chain = format!("service-{base}");
    let local_chain = format!("local-{base}");
    let ext_chain = format!("external-{base}");
    let fw_chain = format!("firewall-{base}");
    let key = |addr: &std::net::IpAddr| {
        let mut k = String::with_capacity(32);
        push_ip(&mut k, addr);
        let _ = write!(k, " . {proto} . {}", port.port);
        k
    };
    let external_ips: Vec<_> = port.external_ips_for(family).collect();
    let lb_ips: Vec<_> = port.load_balancer_ips_for(family).collect();
    let source_ranges: Vec<_> = port.source_ranges_for(family).collect();
    let externally_accessible = port.externally_accessible(family);

    let internal_chain = if port.internal_policy_local {
        &local_chain
    } else {
        &svc_chain
    };
    let external_policy_chain = if port.external_policy_local {
        &local_chain
    } else {
        &svc_chain
    };
    let uses_ext_chain = sel.has_endpoints && externally_accessible;
    let uses_fw_chain = sel.has_endpoints && !lb_ips.is_empty() && !source_ranges.is_empty();

    // Verdict for a path that has nowhere to go.
    let filter_for = |plan: PathPlan| match plan {
        PathPlan::Reject => Some(format!("goto {REJECT_CHAIN}")),
        PathPlan::Drop => Some("drop".to_string()),
        PathPlan::Cluster | PathPlan::Local => None,
    };
    let internal_filter = filter_for(sel.internal);
    let external_filter = filter_for(sel.external);
    out.no_local_internal = sel.internal == PathPlan::Drop;
    out.no_local_external = sel.external == PathPlan::Drop && externally_accessible;

    let elem = |map: &'static str, key: String, value: Option<String>| Element { map, key, value };

    // ClusterIP.
    let mut cip = String::new();
    push_ip(&mut cip, &cluster_ip);
    out.elements.push(elem(CLUSTER_IPS, cip.clone(), None));
    match &internal_filter {
        None => out.elements.push(elem(
            SERVICE_IPS,
            key(&cluster_ip),
            Some(format!("goto {internal_chain}")),
        )),
        Some(verdict) => out.elements.push(elem(
            NO_ENDPOINT_SERVICES,
            key(&cluster_ip),
            Some(verdict.clone()),
        )),
    }

    // External IPs and load-balancer IPs.
    for addr in external_ips.iter().chain(&lb_ips) {
        if sel.has_endpoints {
            out.elements.push(elem(
                SERVICE_IPS,
                key(addr),
                Some(format!("goto {ext_chain}")),
            ));
        }
        if let Some(verdict) = &external_filter {
            out.elements
                .push(elem(NO_ENDPOINT_SERVICES, key(addr), Some(verdict.clone())));
        }
    }
    if uses_fw_chain {
        for addr in &lb_ips {
            out.elements.push(elem(
                FIREWALL_IPS,
                key(addr),
                Some(format!("goto {fw_chain}")),
            ));
        }
    }

    // NodePort.
    if let Some(node_port) = port.node_port {
        let np_key = format!("{proto} . {node_port}");
        if sel.has_endpoints {
            out.elements.push(elem(
                SERVICE_NODEPORTS,
                np_key.clone(),
                Some(format!("goto {ext_chain}")),
            ));
        }
        if let Some(verdict) = &external_filter {
            out.elements
                .push(elem(NO_ENDPOINT_NODEPORTS, np_key, Some(verdict.clone())));
        }
    }

    // Chains, in creation order: external, firewall, service, local, endpoints.
    let cluster_dest = format!("{ip} daddr {cip} {proto} dport {}", port.port);
    let masquerade_rule = if internal_filter.is_some() {
        None
    } else if cfg.masquerade_all {
        Some(format!("{cluster_dest} jump {MARK_FOR_MASQUERADE}"))
    } else {
        local_match(&cfg.local_detector, family, true)
            .map(|not_local| format!("{cluster_dest} {not_local} jump {MARK_FOR_MASQUERADE}"))
    };

    if uses_ext_chain {
        let mut body = String::new();
        if !port.external_policy_local {
            let _ = writeln!(
                body,
                "jump {MARK_FOR_MASQUERADE} comment \"masquerade traffic for {} external destinations\"",
                port.name
            );
        } else {
            if let Some(local) = local_match(&cfg.local_detector, family, false) {
                let _ = writeln!(
                    body,
                    "{local} goto {svc_chain} comment \"short-circuit pod traffic\""
                );
            }
            let _ = writeln!(
                body,
                "fib saddr type local jump {MARK_FOR_MASQUERADE} comment \"masquerade local traffic\""
            );
            let _ = writeln!(
                body,
                "fib saddr type local goto {svc_chain} comment \"short-circuit local traffic\""
            );
        }
        if external_filter.is_none() {
            let _ = writeln!(body, "goto {external_policy_chain}");
        }
        out.chains.push(Chain {
            name: ext_chain.clone(),
            body,
        });
    }

    if uses_fw_chain {
        // Traffic from the node to its own VIP arrives with the VIP as source.
        let allow_from_node = node
            .addresses
            .iter()
            .find(|a| family.contains(a))
            .is_some_and(|a| source_ranges.iter().any(|n| n.contains(a)));
        let mut allowed: Vec<String> = source_ranges.iter().map(ToString::to_string).collect();
        if allow_from_node {
            allowed.extend(lb_ips.iter().map(ToString::to_string));
        }
        out.chains.push(Chain {
            name: fw_chain.clone(),
            body: format!(
                "{ip} saddr != {{ {} }} drop comment \"{} loadBalancerSourceRanges\"\n",
                allowed.join(", "),
                port.name
            ),
        });
    }

    let names: Vec<EndpointNames> = sel
        .reachable
        .iter()
        .map(|ep| {
            let b = nft_base(&format!("{base_text}__{}", endpoint_text(ep)));
            EndpointNames {
                ep,
                chain: format!("endpoint-{b}"),
                affinity_set: format!("affinity-{b}"),
            }
        })
        .collect();
    let name_of = |ep: &Endpoint| -> &EndpointNames {
        names
            .iter()
            .find(|n| std::ptr::eq(n.ep, ep))
            .expect("selected endpoints are reachable")
    };
    let affinity = match port.session_affinity {
        SessionAffinity::ClientIp { timeout_seconds } => Some(timeout_seconds),
        SessionAffinity::None => None,
    };
    let balancing = |body: &mut String, eps: &[&Endpoint]| {
        if affinity.is_some() {
            for ep in eps {
                let n = name_of(ep);
                let _ = writeln!(body, "{ip} saddr @{} goto {}", n.affinity_set, n.chain);
            }
        }
        // `numgen random mod K == 0` per endpoint with K = endpoints left, like iptables
        // mode's probabilities: uniform, and no anonymous verdict map per service. Those
        // maps made every full load about 4x slower in the kernel and every `nft` call list
        // one set per service (measured at 2k services x 10 endpoints).
        let n = eps.len();
        for (i, ep) in eps.iter().enumerate() {
            if i + 1 < n {
                let _ = write!(body, "numgen random mod {} == 0 ", n - i);
            }
            let _ = writeln!(body, "goto {}", name_of(ep).chain);
        }
    };
    for (chain, eps, used) in [
        (&svc_chain, &sel.cluster, sel.uses_cluster_chain()),
        (&local_chain, &sel.local, sel.uses_local_chain()),
    ] {
        if !used {
            continue;
        }
        let mut body = String::new();
        if chain == internal_chain
            && let Some(rule) = &masquerade_rule
        {
            body.push_str(rule);
            body.push('\n');
        }
        balancing(&mut body, eps);
        out.chains.push(Chain {
            name: chain.clone(),
            body,
        });
    }

    for n in &names {
        let mut body = String::with_capacity(160);
        let mut epip = String::new();
        push_ip(&mut epip, &n.ep.ip);
        let _ = writeln!(body, "{ip} saddr {epip} jump {MARK_FOR_MASQUERADE}");
        if let Some(timeout) = affinity {
            let _ = writeln!(body, "update @{} {{ {ip} saddr }}", n.affinity_set);
            out.sets.push(SetDecl {
                name: n.affinity_set.clone(),
                decl: format!(
                    "type {} ; flags dynamic,timeout ; timeout {timeout}s ;",
                    addr_type(family)
                ),
            });
        }
        let _ = writeln!(body, "meta l4proto {proto} dnat to {}", dnat_target(n.ep));
        out.chains.push(Chain {
            name: n.chain.clone(),
            body,
        });
    }
    out.shrink();
    out
}
