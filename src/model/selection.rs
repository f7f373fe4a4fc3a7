//! Which endpoints each traffic path of a service port uses on this node.
//!
//! This is the one place where traffic policies (internal/external Cluster vs Local), the
//! serving-terminating fallback (KEP-1669) and topology hints (zone and node hints, which the
//! EndpointSlice controller derives from `trafficDistribution`) are decided. Backends only
//! translate the result into rules.

use super::types::{Endpoint, IpFamily, NodeInfo, ServicePort};

/// What happens to traffic of one path (internal = ClusterIP, external = NodePort,
/// externalIPs, load-balancer IPs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathPlan {
    /// Balance over [`Selection::cluster`].
    Cluster,
    /// Balance over [`Selection::local`].
    Local,
    /// The service has no usable endpoints anywhere: refuse at once (ICMP / TCP reset).
    Reject,
    /// The policy is Local and this node has no usable endpoint: drop silently (the load
    /// balancer's health check steers clients elsewhere).
    Drop,
}

/// The endpoints of one service port as seen from one node, and how each path uses them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection<'a> {
    /// Endpoints for Cluster policy (empty when the port never uses Cluster policy).
    pub cluster: Vec<&'a Endpoint>,
    /// Endpoints for Local policy (empty when the port never uses Local policy).
    pub local: Vec<&'a Endpoint>,
    /// Union of `cluster` and `local`: every endpoint this node may send traffic to.
    pub reachable: Vec<&'a Endpoint>,
    /// Some usable endpoint exists somewhere in the cluster.
    pub has_endpoints: bool,
    /// Plan for ClusterIP traffic.
    pub internal: PathPlan,
    /// Plan for external-destination traffic that is not short-circuited (see
    /// [`Selection::short_circuit_local_traffic`]).
    pub external: PathPlan,
}

impl Selection<'_> {
    /// ETP Local with endpoints somewhere: traffic from pods and from the node itself to an
    /// external destination goes to the Cluster endpoints, as if it had left through the load
    /// balancer and come back (upstream's "short-circuit").
    pub fn short_circuit_local_traffic(&self, port: &ServicePort) -> bool {
        self.has_endpoints && port.external_policy_local
    }

    /// A per-service-port Cluster-policy chain/set is needed.
    pub fn uses_cluster_chain(&self) -> bool {
        !self.cluster.is_empty()
    }

    /// A per-service-port Local-policy chain/set is needed.
    pub fn uses_local_chain(&self) -> bool {
        !self.local.is_empty()
    }
}

/// Topology mode chosen from the endpoints' hints, as upstream's `topologyModeFromHints`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TopologyMode {
    None,
    SameNode,
    SameZone,
}

fn topology_mode<'a>(
    endpoints: impl Iterator<Item = &'a Endpoint>,
    node: &NodeInfo,
) -> TopologyMode {
    let mut all_node_hints = true;
    let mut node_hit = false;
    let mut all_zone_hints = true;
    let mut zone_hit = false;
    let mut any_ready = false;
    for ep in endpoints.filter(|e| e.ready) {
        any_ready = true;
        if ep.node_hints.is_empty() {
            all_node_hints = false;
        } else if ep.node_hints.contains(&node.name) {
            node_hit = true;
        }
        if ep.zone_hints.is_empty() {
            all_zone_hints = false;
        } else if node
            .zone
            .as_ref()
            .is_some_and(|z| ep.zone_hints.contains(z))
        {
            zone_hit = true;
        }
    }
    if !any_ready {
        TopologyMode::None
    } else if all_node_hints && node_hit {
        TopologyMode::SameNode
    } else if all_zone_hints && zone_hit {
        TopologyMode::SameZone
    } else {
        TopologyMode::None
    }
}

fn topology_allows(ep: &Endpoint, mode: TopologyMode, node: &NodeInfo) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::SameNode => ep.node_hints.contains(&node.name),
        TopologyMode::SameZone => node
            .zone
            .as_ref()
            .is_some_and(|z| ep.zone_hints.contains(z)),
    }
}

/// Selects the endpoints of `port` (all its endpoints, any family) for `family` on `node`.
///
/// Mirrors upstream's `CategorizeEndpoints`:
/// - Cluster policy uses ready endpoints (narrowed by topology hints when every ready endpoint
///   has hints and one targets this node/zone), else serving-and-terminating ones;
/// - Local policy uses this node's ready endpoints, else its serving-and-terminating ones;
/// - a service has endpoints if any endpoint is ready, or serving and terminating.
pub fn select<'a>(
    port: &ServicePort,
    endpoints: &'a [Endpoint],
    family: IpFamily,
    node: &NodeInfo,
) -> Selection<'a> {
    let endpoints_of_family = || endpoints.iter().filter(move |e| family.contains(&e.ip));
    let serving_terminating = |e: &&Endpoint| e.serving && e.terminating;

    let mut has_endpoints = false;
    let mut cluster: Vec<&Endpoint> = Vec::new();
    if port.uses_cluster_endpoints(family) {
        let mode = topology_mode(endpoints_of_family(), node);
        cluster = endpoints_of_family()
            .filter(|e| e.ready && topology_allows(e, mode, node))
            .collect();
        if cluster.is_empty() {
            cluster = endpoints_of_family().filter(serving_terminating).collect();
        }
        has_endpoints = !cluster.is_empty();
    }

    let mut local: Vec<&Endpoint> = Vec::new();
    if port.uses_local_endpoints(family) {
        let on_node = |e: &&Endpoint| e.is_on_node(&node.name);
        has_endpoints |= endpoints_of_family().any(|e| e.ready || (e.serving && e.terminating));
        local = endpoints_of_family()
            .filter(|e| e.ready)
            .filter(on_node)
            .collect();
        if local.is_empty() {
            local = endpoints_of_family()
                .filter(serving_terminating)
                .filter(on_node)
                .collect();
        }
    }

    let mut reachable = cluster.clone();
    for ep in &local {
        if !reachable.iter().any(|r| std::ptr::eq(*r, *ep)) {
            reachable.push(ep);
        }
    }

    let plan = |policy_local: bool| match (has_endpoints, policy_local) {
        (false, _) => PathPlan::Reject,
        (true, false) => PathPlan::Cluster,
        (true, true) if local.is_empty() => PathPlan::Drop,
        (true, true) => PathPlan::Local,
    };
    Selection {
        internal: plan(port.internal_policy_local),
        external: plan(port.external_policy_local),
        cluster,
        local,
        reachable,
        has_endpoints,
    }
}
