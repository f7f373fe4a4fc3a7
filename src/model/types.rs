//! The proxy's own view of services and endpoints: what every backend needs and nothing else.
//!
//! These types are built once from Kubernetes objects (see [`super::convert`]) so that backends
//! never look at raw API objects and every semantic default (session affinity timeout, serving
//! defaults, ...) is applied in exactly one place.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

/// `namespace/name` of a Service: the unit the change tracker and partial syncs work in.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName {
    /// Namespace of the Service.
    pub namespace: String,
    /// Name of the Service.
    pub name: String,
}

impl ServiceName {
    /// Builds a name from its two parts.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// L4 protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP
    Tcp,
    /// UDP
    Udp,
    /// SCTP
    Sctp,
}

impl Protocol {
    /// Lower-case name as iptables, nft and upstream's chain hashes spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    /// Connectionless protocols whose conntrack entries must be flushed when endpoints change.
    pub fn needs_conntrack_cleanup(self) -> bool {
        matches!(self, Protocol::Udp | Protocol::Sctp)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// IP family; each kernel table (and each upstream proxier) serves exactly one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpFamily {
    /// IPv4
    V4,
    /// IPv6
    V6,
}

impl IpFamily {
    /// The family of an address.
    pub fn of(ip: &IpAddr) -> Self {
        if ip.is_ipv4() {
            IpFamily::V4
        } else {
            IpFamily::V6
        }
    }

    /// Whether `ip` belongs to this family.
    pub fn contains(self, ip: &IpAddr) -> bool {
        IpFamily::of(ip) == self
    }
}

/// Identity of one service port: upstream's `ServicePortName` plus the protocol.
///
/// Its [`Display`](fmt::Display) form (`ns/name:port`, or `ns/name` for an unnamed port) is the
/// text upstream hashes into chain names and writes into rule comments, so it must not change.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    /// The owning service.
    pub service: ServiceName,
    /// The port's `name` (empty for a single unnamed port).
    pub port: String,
    /// The port's protocol.
    pub protocol: Protocol,
}

impl ServicePortName {
    /// The smallest port name of `service`: where its ports start in port-ordered maps.
    pub fn first_of(service: &ServiceName) -> Self {
        ServicePortName {
            service: service.clone(),
            port: String::new(),
            protocol: Protocol::Tcp,
        }
    }
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port.is_empty() {
            write!(f, "{}", self.service)
        } else {
            write!(f, "{}:{}", self.service, self.port)
        }
    }
}

/// Session affinity of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionAffinity {
    /// Every new connection is balanced independently.
    None,
    /// Connections from one client IP stick to one endpoint for `timeout_seconds`.
    ClientIp {
        /// Stickiness timeout (upstream default 10800 s).
        timeout_seconds: u32,
    },
}

/// One port of one proxied Service, with every address it is reachable on.
///
/// Addresses of both families are kept; backends select theirs with the `*_for` helpers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// Identity (`ns/name:port` + protocol).
    pub name: ServicePortName,
    /// The service port number (`spec.ports[].port`).
    pub port: u16,
    /// `spec.ports[].nodePort`, when allocated.
    pub node_port: Option<u16>,
    /// `spec.clusterIPs` (one per family).
    pub cluster_ips: Vec<IpAddr>,
    /// `spec.externalIPs`.
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` whose `ipMode` is not `Proxy`.
    pub load_balancer_ips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges`; empty means "allow all".
    pub load_balancer_source_ranges: Vec<IpNet>,
    /// `spec.healthCheckNodePort` (ETP Local load balancers).
    pub health_check_node_port: Option<u16>,
    /// Session affinity.
    pub session_affinity: SessionAffinity,
    /// externalTrafficPolicy is Local and the service is externally accessible.
    pub external_policy_local: bool,
    /// internalTrafficPolicy is Local.
    pub internal_policy_local: bool,
    /// `spec.trafficDistribution`, kept for tooling; the dataplane follows the hints the
    /// EndpointSlice controller derives from it, as upstream does.
    pub traffic_distribution: Option<String>,
}

impl ServicePort {
    /// A plain ClusterIP service port (no node port, external addresses, affinity or
    /// policies); set the other fields with struct-update syntax.
    pub fn cluster_ip(name: ServicePortName, ip: IpAddr, port: u16) -> Self {
        ServicePort {
            name,
            port,
            node_port: None,
            cluster_ips: vec![ip],
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            load_balancer_source_ranges: Vec::new(),
            health_check_node_port: None,
            session_affinity: SessionAffinity::None,
            external_policy_local: false,
            internal_policy_local: false,
            traffic_distribution: None,
        }
    }

    /// The cluster IP of `family`, if the service has one.
    pub fn cluster_ip_for(&self, family: IpFamily) -> Option<IpAddr> {
        self.cluster_ips
            .iter()
            .copied()
            .find(|ip| family.contains(ip))
    }

    /// External IPs of `family`.
    pub fn external_ips_for(&self, family: IpFamily) -> impl Iterator<Item = IpAddr> + '_ {
        self.external_ips
            .iter()
            .copied()
            .filter(move |ip| family.contains(ip))
    }

    /// Load-balancer ingress IPs of `family`.
    pub fn load_balancer_ips_for(&self, family: IpFamily) -> impl Iterator<Item = IpAddr> + '_ {
        self.load_balancer_ips
            .iter()
            .copied()
            .filter(move |ip| family.contains(ip))
    }

    /// Source ranges of `family`.
    pub fn source_ranges_for(&self, family: IpFamily) -> impl Iterator<Item = IpNet> + '_ {
        self.load_balancer_source_ranges
            .iter()
            .copied()
            .filter(move |net| family.contains(&net.addr()))
    }

    /// Reachable from outside the cluster in `family`: it has a NodePort, an external IP or a
    /// load-balancer IP (upstream's `ExternallyAccessible`).
    pub fn externally_accessible(&self, family: IpFamily) -> bool {
        self.node_port.is_some()
            || self.external_ips_for(family).next().is_some()
            || self.load_balancer_ips_for(family).next().is_some()
    }

    /// Needs the cluster-wide endpoint set: internal policy Cluster, or any external access
    /// (ETP Local still short-circuits pod and node traffic to all endpoints).
    pub fn uses_cluster_endpoints(&self, family: IpFamily) -> bool {
        !self.internal_policy_local || self.externally_accessible(family)
    }

    /// Needs the node-local endpoint set: ITP Local, or ETP Local with external access.
    pub fn uses_local_endpoints(&self, family: IpFamily) -> bool {
        self.internal_policy_local
            || (self.external_policy_local && self.externally_accessible(family))
    }
}

/// One endpoint (address + target port) of a service port, merged from its EndpointSlices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Pod (or other backend) address.
    pub ip: IpAddr,
    /// Target port.
    pub port: u16,
    /// `conditions.ready` (nil means true).
    pub ready: bool,
    /// `conditions.serving` (nil means true).
    pub serving: bool,
    /// `conditions.terminating` (nil means false).
    pub terminating: bool,
    /// `nodeName`, when set (shared: every endpoint of a node names it, and endpoints are
    /// cloned once per service port they serve).
    pub node_name: Option<Arc<str>>,
    /// `zone`, when set.
    pub zone: Option<Arc<str>>,
    /// `hints.forZones[].name`.
    pub zone_hints: Vec<String>,
    /// `hints.forNodes[].name`.
    pub node_hints: Vec<String>,
}

impl Endpoint {
    /// A ready, serving, non-terminating endpoint with no node, zone or hints; set the
    /// other fields with struct-update syntax.
    pub fn ready_at(ip: IpAddr, port: u16) -> Self {
        Endpoint {
            ip,
            port,
            ready: true,
            serving: true,
            terminating: false,
            node_name: None,
            zone: None,
            zone_hints: Vec::new(),
            node_hints: Vec::new(),
        }
    }

    /// `ip:port` (`[ip]:port` for IPv6): the text upstream sorts, hashes and comments with.
    pub fn addr_string(&self) -> String {
        let mut s = String::with_capacity(24);
        match self.ip {
            IpAddr::V4(_) => push_ip(&mut s, &self.ip),
            IpAddr::V6(_) => {
                s.push('[');
                push_ip(&mut s, &self.ip);
                s.push(']');
            }
        }
        s.push(':');
        push_u16(&mut s, self.port);
        s
    }

    /// Whether the endpoint runs on `node`.
    pub fn is_on_node(&self, node: &str) -> bool {
        self.node_name.as_deref() == Some(node)
    }
}

/// A service port with the endpoints currently known for it, as handed to backends.
#[derive(Clone, Debug)]
pub struct ServicePortState {
    /// The service port.
    pub port: Arc<ServicePort>,
    /// All endpoints (any node, any condition), sorted by `ip:port` text like upstream.
    pub endpoints: Arc<[Endpoint]>,
}

/// What the proxy needs to know about its own Node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// Node name (`--hostname-override`).
    pub name: String,
    /// `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
    /// `status.addresses` of type InternalIP / ExternalIP.
    pub addresses: Vec<IpAddr>,
    /// `spec.podCIDRs` (for `--detect-local-mode NodeCIDR`).
    pub pod_cidrs: Vec<IpNet>,
    /// The Node has a deletion timestamp (health reports unhealthy).
    pub deleting: bool,
}

/// Appends an address in its standard text form. IPv4 is written by hand: rule rendering
/// formats hundreds of thousands of addresses and `Display` is several times slower.
pub fn push_ip(buf: &mut String, ip: &IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().iter().enumerate() {
                if i > 0 {
                    buf.push('.');
                }
                push_u16(buf, u16::from(*octet));
            }
        }
        IpAddr::V6(v6) => {
            use std::fmt::Write;
            let _ = write!(buf, "{v6}");
        }
    }
}

/// Appends a decimal number without going through `fmt`.
pub fn push_u16(buf: &mut String, n: u16) {
    let mut digits = [0u8; 5];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for d in &digits[i..] {
        buf.push(char::from(*d));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_text_matches_display() {
        for ip in [
            "0.0.0.0",
            "10.244.1.5",
            "255.255.255.255",
            "192.168.0.10",
            "fd00::1",
            "::1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut s = String::new();
            push_ip(&mut s, &ip);
            assert_eq!(s, ip.to_string());
            for port in [1u16, 9, 10, 80, 8080, 65535] {
                let ep = Endpoint::ready_at(ip, port);
                assert_eq!(
                    ep.addr_string(),
                    std::net::SocketAddr::new(ip, port).to_string()
                );
            }
        }
    }
}
