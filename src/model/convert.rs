//! Conversion of Kubernetes objects (k8s-openapi types) into model types.
//!
//! Objects that cannot be proxied produce a [`ConvertError`] naming the object and the reason,
//! so callers can log and skip exactly that object while everything else keeps working.
//! Objects the proxy deliberately ignores (headless, ExternalName, FQDN slices, services owned
//! by another proxy) convert to "nothing" rather than to an error.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::types::{
    Endpoint, IpFamily, NodeInfo, Protocol, ServiceName, ServicePort, ServicePortName,
    SessionAffinity,
};

/// Label on EndpointSlices naming their Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label that hands a Service to a non-default proxy; such services are skipped, as upstream.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Label marking headless services (no ClusterIP to proxy).
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// Node label with the node's zone, used for topology hints.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Upstream's default ClientIP affinity timeout (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10800;

/// Why an object could not be turned into proxy state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidField {
    /// The object has no name (or no namespace where one is required).
    #[error("metadata.name/namespace is missing")]
    MissingName,
    /// An address field does not parse as an IP.
    #[error("{field}: {value:?} is not a valid IP address")]
    BadIp {
        /// JSON path of the field.
        field: String,
        /// The offending value.
        value: String,
    },
    /// A CIDR field does not parse.
    #[error("{field}: {value:?} is not a valid CIDR")]
    BadCidr {
        /// JSON path of the field.
        field: String,
        /// The offending value.
        value: String,
    },
    /// A port number outside 1..=65535.
    #[error("{field}: {value} is not a valid port number (1-65535)")]
    BadPort {
        /// JSON path of the field.
        field: String,
        /// The offending value.
        value: i64,
    },
    /// A protocol other than TCP, UDP or SCTP.
    #[error("{field}: unsupported protocol {value:?} (want TCP, UDP or SCTP)")]
    BadProtocol {
        /// JSON path of the field.
        field: String,
        /// The offending value.
        value: String,
    },
    /// Two service ports with the same name and protocol.
    #[error("spec.ports: duplicate port {0:?}")]
    DuplicatePort(String),
    /// An EndpointSlice without its `kubernetes.io/service-name` label.
    #[error("label {SERVICE_NAME_LABEL} is missing")]
    MissingServiceLabel,
    /// An addressType that is neither IPv4, IPv6 nor FQDN.
    #[error("addressType {0:?} is not IPv4, IPv6 or FQDN")]
    BadAddressType(String),
    /// An address whose family contradicts the slice's addressType.
    #[error("{field}: {value} does not match addressType {address_type}")]
    FamilyMismatch {
        /// JSON path of the field.
        field: String,
        /// The offending value.
        value: String,
        /// The slice's addressType.
        address_type: String,
    },
}

/// An object that cannot be proxied: which one, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {object}: {reason}")]
pub struct ConvertError {
    /// `Service`, `EndpointSlice` or `Node`.
    pub kind: &'static str,
    /// `namespace/name` (or just `name` for cluster-scoped objects).
    pub object: String,
    /// What is wrong with it.
    pub reason: InvalidField,
}

fn object_ref(meta: &ObjectMeta) -> String {
    match (&meta.namespace, &meta.name) {
        (Some(ns), Some(n)) => format!("{ns}/{n}"),
        (None, Some(n)) => n.clone(),
        (Some(ns), None) => format!("{ns}/<unnamed>"),
        (None, None) => "<unnamed>".to_string(),
    }
}

fn namespaced_name(kind: &'static str, meta: &ObjectMeta) -> Result<ServiceName, ConvertError> {
    match (&meta.namespace, &meta.name) {
        (Some(ns), Some(n)) if !ns.is_empty() && !n.is_empty() => Ok(ServiceName::new(ns, n)),
        _ => Err(ConvertError {
            kind,
            object: object_ref(meta),
            reason: InvalidField::MissingName,
        }),
    }
}

fn parse_ip(field: impl FnOnce() -> String, value: &str) -> Result<IpAddr, InvalidField> {
    value.trim().parse().map_err(|_| InvalidField::BadIp {
        field: field(),
        value: value.to_string(),
    })
}

fn parse_port(field: impl FnOnce() -> String, value: i32) -> Result<u16, InvalidField> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| InvalidField::BadPort {
            field: field(),
            value: value.into(),
        })
}

fn parse_protocol(
    field: impl FnOnce() -> String,
    value: Option<&str>,
) -> Result<Protocol, InvalidField> {
    match value.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        other => Err(InvalidField::BadProtocol {
            field: field(),
            value: other.to_string(),
        }),
    }
}

/// Whether a Service is meant for this proxy at all (not labelled for another proxy, not
/// headless). The API source also applies this as a label selector; files need it here.
pub fn service_is_proxied(svc: &Service) -> bool {
    let labels = svc.metadata.labels.as_ref();
    let has = |l: &str| labels.is_some_and(|m| m.contains_key(l));
    !has(SERVICE_PROXY_NAME_LABEL) && !has(HEADLESS_LABEL)
}

/// Converts a Service into its proxied ports.
///
/// Returns an empty list for services the proxy deliberately ignores: headless (`clusterIP:
/// None`), ExternalName, no ports, or labelled for another proxy.
pub fn service_ports(svc: &Service) -> Result<Vec<ServicePort>, ConvertError> {
    let name = namespaced_name("Service", &svc.metadata)?;
    let fail = |reason| ConvertError {
        kind: "Service",
        object: name.to_string(),
        reason,
    };
    let Some(spec) = svc.spec.as_ref() else {
        return Ok(Vec::new());
    };
    if !service_is_proxied(svc) || spec.type_.as_deref() == Some("ExternalName") {
        return Ok(Vec::new());
    }
    // clusterIP is normally set; files may carry only clusterIPs.
    let primary = spec
        .cluster_ip
        .as_deref()
        .filter(|ip| !ip.is_empty())
        .or_else(|| {
            spec.cluster_ips
                .as_ref()
                .and_then(|ips| ips.first())
                .map(String::as_str)
        })
        .unwrap_or("");
    if primary.is_empty() || primary == "None" {
        return Ok(Vec::new());
    }

    let mut cluster_ips = Vec::new();
    let listed: Vec<&str> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => vec![primary],
    };
    for (i, ip) in listed.iter().enumerate() {
        let ip = parse_ip(|| format!("spec.clusterIPs[{i}]"), ip).map_err(fail)?;
        if !cluster_ips
            .iter()
            .any(|c: &IpAddr| IpFamily::of(c) == IpFamily::of(&ip))
        {
            cluster_ips.push(ip);
        }
    }

    let external_ips = parse_ips(spec.external_ips.as_deref(), "spec.externalIPs").map_err(fail)?;
    let mut load_balancer_ips = Vec::new();
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_deref())
        .unwrap_or(&[]);
    for (i, ing) in ingress.iter().enumerate() {
        // ipMode Proxy means the load balancer delivers to the node, not to the VIP.
        if ing.ip_mode.as_deref() == Some("Proxy") {
            continue;
        }
        if let Some(ip) = ing.ip.as_deref().filter(|s| !s.is_empty()) {
            let ip =
                parse_ip(|| format!("status.loadBalancer.ingress[{i}].ip"), ip).map_err(fail)?;
            load_balancer_ips.push(ip);
        }
    }
    let mut load_balancer_source_ranges = Vec::new();
    for (i, cidr) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        let net = cidr
            .trim()
            .parse::<IpNet>()
            .map_err(|_| {
                fail(InvalidField::BadCidr {
                    field: format!("spec.loadBalancerSourceRanges[{i}]"),
                    value: cidr.clone(),
                })
            })?
            .trunc();
        load_balancer_source_ranges.push(net);
    }
    let health_check_node_port = spec
        .health_check_node_port
        .filter(|p| *p != 0)
        .map(|p| parse_port(|| "spec.healthCheckNodePort".into(), p))
        .transpose()
        .map_err(fail)?;
    let session_affinity = match spec.session_affinity.as_deref() {
        Some("ClientIP") => SessionAffinity::ClientIp {
            timeout_seconds: spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .and_then(|t| u32::try_from(t).ok())
                .filter(|t| *t > 0)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECONDS),
        },
        _ => SessionAffinity::None,
    };
    let externally_typed = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"))
        || !external_ips.is_empty();
    let external_policy_local =
        externally_typed && spec.external_traffic_policy.as_deref() == Some("Local");
    let internal_policy_local = spec.internal_traffic_policy.as_deref() == Some("Local");

    let mut out: Vec<ServicePort> = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let protocol = parse_protocol(
            || format!("spec.ports[{i}].protocol"),
            p.protocol.as_deref(),
        )
        .map_err(fail)?;
        let port = parse_port(|| format!("spec.ports[{i}].port"), p.port).map_err(fail)?;
        let node_port = p
            .node_port
            .filter(|n| *n != 0)
            .map(|n| parse_port(|| format!("spec.ports[{i}].nodePort"), n))
            .transpose()
            .map_err(fail)?;
        let spn = ServicePortName {
            service: name.clone(),
            port: p.name.clone().unwrap_or_default(),
            protocol,
        };
        if out.iter().any(|o| o.name == spn) {
            return Err(fail(InvalidField::DuplicatePort(spn.to_string())));
        }
        out.push(ServicePort {
            name: spn,
            port,
            node_port,
            cluster_ips: cluster_ips.clone(),
            external_ips: external_ips.clone(),
            load_balancer_ips: load_balancer_ips.clone(),
            load_balancer_source_ranges: load_balancer_source_ranges.clone(),
            health_check_node_port,
            session_affinity,
            external_policy_local,
            internal_policy_local,
            traffic_distribution: spec.traffic_distribution.clone(),
        });
    }
    Ok(out)
}

fn parse_ips(values: Option<&[String]>, field: &str) -> Result<Vec<IpAddr>, InvalidField> {
    let mut out = Vec::new();
    for (i, v) in values.unwrap_or(&[]).iter().enumerate() {
        let ip = parse_ip(|| format!("{field}[{i}]"), v)?;
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

/// One port of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    /// Port name (matches the service port's name).
    pub name: String,
    /// Protocol.
    pub protocol: Protocol,
    /// Target port number.
    pub port: u16,
}

/// The proxy-relevant content of one EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInfo {
    /// The Service the slice belongs to.
    pub service: ServiceName,
    /// The slice's own name (slices of one service are merged by the tracker).
    pub slice_name: String,
    /// Ports with a number; endpoints apply to each.
    pub ports: Vec<SlicePort>,
    /// Endpoints with the port left at 0 (filled in per port on merge).
    pub endpoints: Vec<Endpoint>,
}

impl SliceInfo {
    /// Expands the slice into `(service port name, endpoint)` pairs.
    pub fn port_endpoints(&self) -> impl Iterator<Item = (ServicePortName, Endpoint)> + '_ {
        self.ports.iter().flat_map(move |p| {
            let spn = ServicePortName {
                service: self.service.clone(),
                port: p.name.clone(),
                protocol: p.protocol,
            };
            self.endpoints.iter().map(move |e| {
                let mut e = e.clone();
                e.port = p.port;
                (spn.clone(), e)
            })
        })
    }
}

/// Converts an EndpointSlice. `Ok(None)` for slices the proxy ignores (FQDN).
pub fn endpoint_slice(slice: &EndpointSlice) -> Result<Option<SliceInfo>, ConvertError> {
    let object = object_ref(&slice.metadata);
    let fail = |reason| ConvertError {
        kind: "EndpointSlice",
        object: object.clone(),
        reason,
    };
    let (Some(ns), Some(slice_name)) = (&slice.metadata.namespace, &slice.metadata.name) else {
        return Err(fail(InvalidField::MissingName));
    };
    let family = match slice.address_type.as_str() {
        "IPv4" => IpFamily::V4,
        "IPv6" => IpFamily::V6,
        "FQDN" => return Ok(None),
        other => return Err(fail(InvalidField::BadAddressType(other.to_string()))),
    };
    let svc_name = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .filter(|s| !s.is_empty())
        .ok_or_else(|| fail(InvalidField::MissingServiceLabel))?;

    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        // A port without a number means "all ports" for selector-less services; not proxied.
        let Some(num) = p.port else { continue };
        ports.push(SlicePort {
            name: p.name.clone().unwrap_or_default(),
            protocol: parse_protocol(|| format!("ports[{i}].protocol"), p.protocol.as_deref())
                .map_err(fail)?,
            port: parse_port(|| format!("ports[{i}].port"), num).map_err(fail)?,
        });
    }

    let mut endpoints = Vec::new();
    for (i, ep) in slice.endpoints.iter().flatten().enumerate() {
        let Some(addr) = ep.addresses.first() else {
            continue;
        };
        let ip = parse_ip(|| format!("endpoints[{i}].addresses[0]"), addr).map_err(fail)?;
        if IpFamily::of(&ip) != family {
            return Err(fail(InvalidField::FamilyMismatch {
                field: format!("endpoints[{i}].addresses[0]"),
                value: addr.clone(),
                address_type: slice.address_type.clone(),
            }));
        }
        let cond = ep.conditions.as_ref();
        let ready = cond.and_then(|c| c.ready).unwrap_or(true);
        let hints = ep.hints.as_ref();
        endpoints.push(Endpoint {
            ip,
            port: 0,
            ready,
            // nil means true (the API's documented default, and upstream's reading).
            serving: cond.and_then(|c| c.serving).unwrap_or(true),
            terminating: cond.and_then(|c| c.terminating).unwrap_or(false),
            node_name: ep.node_name.as_deref().map(Arc::from),
            zone: ep.zone.as_deref().map(Arc::from),
            zone_hints: hints
                .and_then(|h| h.for_zones.as_ref())
                .map(|z| z.iter().map(|z| z.name.clone()).collect())
                .unwrap_or_default(),
            node_hints: hints
                .and_then(|h| h.for_nodes.as_ref())
                .map(|n| n.iter().map(|n| n.name.clone()).collect())
                .unwrap_or_default(),
        });
    }
    Ok(Some(SliceInfo {
        service: ServiceName::new(ns, svc_name),
        slice_name: slice_name.clone(),
        ports,
        endpoints,
    }))
}

/// Converts the proxy's own Node.
pub fn node_info(node: &Node) -> Result<NodeInfo, ConvertError> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let fail = |reason| ConvertError {
        kind: "Node",
        object: name.clone(),
        reason,
    };
    if name.is_empty() {
        return Err(fail(InvalidField::MissingName));
    }
    let labels: BTreeMap<String, String> = node.metadata.labels.clone().unwrap_or_default();
    let mut addresses = Vec::new();
    if let Some(status) = &node.status {
        for (i, a) in status.addresses.iter().flatten().enumerate() {
            if a.type_ == "InternalIP" || a.type_ == "ExternalIP" {
                let ip = parse_ip(|| format!("status.addresses[{i}].address"), &a.address)
                    .map_err(fail)?;
                if !addresses.contains(&ip) {
                    addresses.push(ip);
                }
            }
        }
    }
    let mut pod_cidrs = Vec::new();
    if let Some(spec) = &node.spec {
        let cidrs = spec
            .pod_cidrs
            .clone()
            .filter(|c| !c.is_empty())
            .or_else(|| spec.pod_cidr.clone().map(|c| vec![c]))
            .unwrap_or_default();
        for (i, c) in cidrs.iter().enumerate() {
            let net = c.parse::<IpNet>().map_err(|_| {
                fail(InvalidField::BadCidr {
                    field: format!("spec.podCIDRs[{i}]"),
                    value: c.clone(),
                })
            })?;
            pod_cidrs.push(net.trunc());
        }
    }
    Ok(NodeInfo {
        name: name.clone(),
        zone: labels.get(ZONE_LABEL).cloned(),
        addresses,
        pod_cidrs,
        deleting: node.metadata.deletion_timestamp.is_some() || tainted_for_deletion(node),
    })
}

/// The taint the cluster autoscaler puts on a node it is about to delete; upstream's health
/// check reports such a node as not eligible for new load-balancer traffic.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

fn tainted_for_deletion(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT))
}
