//! Choosing the endpoint of each new connection: round-robin over the endpoints the model
//! selected for the connection's path, ClientIP session affinity, and the order in which
//! endpoints are retried when a connect fails.
//!
//! Pure and clock-free (callers pass `now`), so every rule is unit-tested without sockets.
//! Policy (traffic policies, terminating fallback, topology) is not decided here: [`plan`]
//! only translates [`crate::model::select`]'s verdict into address lists.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::model::{
    Endpoint, IpFamily, NodeInfo, PathPlan, Selection, ServicePort, SessionAffinity, select,
};

/// How long an endpoint whose connect failed is tried last (after every other endpoint), so
/// a dead pod costs one connect timeout per cooldown instead of one per connection.
pub const FAILED_ENDPOINT_COOLDOWN: Duration = Duration::from_secs(5);

/// Which traffic path a listener serves; decides which endpoint list a connection uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Path {
    /// ClusterIP.
    Internal,
    /// NodePort, externalIPs, load-balancer IPs.
    External,
}

/// The endpoints of one service port in one family, per path: what [`select`] decided,
/// flattened into socket addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortPlan {
    /// Endpoints for ClusterIP connections (empty: refuse).
    pub internal: Vec<SocketAddr>,
    /// Endpoints for external connections (empty: refuse, unless short-circuited).
    pub external: Vec<SocketAddr>,
    /// Cluster-policy endpoints, used by external connections that come from this node or
    /// its pods when the external policy is Local (upstream's short-circuit).
    pub short_circuit: Vec<SocketAddr>,
    /// ClientIP affinity timeout, when the port has session affinity.
    pub affinity: Option<Duration>,
    /// `loadBalancerSourceRanges` of this family (empty: every client may use the
    /// load-balancer IPs).
    pub source_ranges: Vec<IpNet>,
    /// Extra sources admitted on the load-balancer IPs: the node reaching its own VIP (which
    /// arrives with the VIP as source) when the node's address is in the ranges, as the
    /// iptables mode's firewall chain does.
    pub node_sources: Vec<IpAddr>,
}

impl PortPlan {
    /// Whether `endpoint` is in any of the lists (UDP sessions stay while it is).
    pub fn contains(&self, endpoint: SocketAddr) -> bool {
        self.internal.contains(&endpoint)
            || self.external.contains(&endpoint)
            || self.short_circuit.contains(&endpoint)
    }

    /// Whether `client` may connect through a load-balancer IP of this port.
    pub fn admits_on_load_balancer(&self, client: IpAddr) -> bool {
        self.source_ranges.is_empty()
            || self.source_ranges.iter().any(|n| n.contains(&client))
            || self.node_sources.contains(&client)
    }

    /// Whether a listener for `path` is needed: some connection on it can be served.
    /// Without a listener the kernel refuses connections to the (local) address at once.
    pub fn serves(&self, path: Path) -> bool {
        match path {
            Path::Internal => !self.internal.is_empty(),
            Path::External => !self.external.is_empty() || !self.short_circuit.is_empty(),
        }
    }
}

fn addrs(eps: &[&Endpoint]) -> Vec<SocketAddr> {
    eps.iter().map(|e| SocketAddr::new(e.ip, e.port)).collect()
}

/// The plan of `port` in `family` on `node`.
pub fn plan(
    port: &ServicePort,
    endpoints: &[Endpoint],
    family: IpFamily,
    node: &NodeInfo,
) -> PortPlan {
    plan_from(port, &select(port, endpoints, family, node), family, node)
}

/// The plan of `port` from its selection `sel` (when the caller already selected).
pub fn plan_from(
    port: &ServicePort,
    sel: &Selection<'_>,
    family: IpFamily,
    node: &NodeInfo,
) -> PortPlan {
    let pick = |p: PathPlan| match p {
        PathPlan::Cluster => addrs(&sel.cluster),
        PathPlan::Local => addrs(&sel.local),
        PathPlan::Reject | PathPlan::Drop => Vec::new(),
    };
    let short_circuit = if sel.short_circuit_local_traffic(port) {
        addrs(&sel.cluster)
    } else {
        Vec::new()
    };
    let source_ranges: Vec<IpNet> = port.source_ranges_for(family).collect();
    let node_in_ranges = node
        .addresses
        .iter()
        .find(|ip| family.contains(ip))
        .is_some_and(|ip| source_ranges.iter().any(|n| n.contains(ip)));
    let node_sources = if node_in_ranges {
        port.load_balancer_ips_for(family).collect()
    } else {
        Vec::new()
    };
    PortPlan {
        source_ranges,
        node_sources,
        internal: pick(sel.internal),
        external: if port.externally_accessible(family) {
            pick(sel.external)
        } else {
            Vec::new()
        },
        short_circuit,
        affinity: match port.session_affinity {
            SessionAffinity::None => None,
            SessionAffinity::ClientIp { timeout_seconds } => {
                Some(Duration::from_secs(u64::from(timeout_seconds)))
            }
        },
    }
}

/// Balancing state of one service port in one family, shared by its listeners. Updated in
/// place on every sync so the round-robin position and affinity survive endpoint changes.
#[derive(Debug, Default)]
pub struct PortBalancer {
    plan: PortPlan,
    next_internal: usize,
    next_external: usize,
    sticky: HashMap<IpAddr, (SocketAddr, Instant)>,
    failed: HashMap<SocketAddr, Instant>,
}

impl PortBalancer {
    /// A balancer for `plan`.
    pub fn new(plan: PortPlan) -> Self {
        Self {
            plan,
            ..Self::default()
        }
    }

    /// The current plan.
    pub fn plan(&self) -> &PortPlan {
        &self.plan
    }

    /// Replaces the endpoints (after a sync). Affinity entries and failure marks of
    /// endpoints that are gone are forgotten; the others are kept.
    pub fn update(&mut self, plan: PortPlan, now: Instant) {
        self.plan = plan;
        if self.plan.affinity.is_none() {
            self.sticky.clear();
        }
        let known = |ep: &SocketAddr| {
            self.plan.internal.contains(ep)
                || self.plan.external.contains(ep)
                || self.plan.short_circuit.contains(ep)
        };
        let timeout = self.plan.affinity.unwrap_or_default();
        self.sticky
            .retain(|_, (ep, last)| known(ep) && now.duration_since(*last) < timeout);
        let plan = &self.plan;
        self.failed.retain(|ep, _| {
            plan.internal.contains(ep)
                || plan.external.contains(ep)
                || plan.short_circuit.contains(ep)
        });
    }

    /// The endpoints to try, in order, for a new connection from `client` on `path`
    /// (`client_is_local`: it comes from this node or one of its pods). Empty means refuse.
    ///
    /// Order: the client's affinity endpoint (if any, still valid and not expired), then
    /// round-robin from the next position; endpoints whose connect failed within
    /// [`FAILED_ENDPOINT_COOLDOWN`] go last. Every endpoint appears once, so a connection is
    /// retried on each endpoint at most once.
    pub fn candidates(
        &mut self,
        client: IpAddr,
        path: Path,
        client_is_local: bool,
        now: Instant,
    ) -> Vec<SocketAddr> {
        let (list, cursor) = match path {
            Path::Internal => (&self.plan.internal, &mut self.next_internal),
            Path::External if client_is_local && !self.plan.short_circuit.is_empty() => {
                (&self.plan.short_circuit, &mut self.next_external)
            }
            Path::External => (&self.plan.external, &mut self.next_external),
        };
        if list.is_empty() {
            return Vec::new();
        }
        let start = *cursor % list.len();
        *cursor = cursor.wrapping_add(1);
        let mut order: Vec<SocketAddr> = list[start..]
            .iter()
            .chain(&list[..start])
            .copied()
            .collect();
        self.failed.retain(|_, until| *until > now);
        if !self.failed.is_empty() {
            // Stable: healthy endpoints keep their round-robin order, cooling ones go last.
            order.sort_by_key(|ep| self.failed.contains_key(ep));
        }
        if let Some(timeout) = self.plan.affinity
            && let Some((ep, last)) = self.sticky.get(&client)
            && now.duration_since(*last) < timeout
            && let Some(pos) = order.iter().position(|e| e == ep)
        {
            let ep = order.remove(pos);
            order.insert(0, ep);
            // The round-robin position was not used.
            *cursor = start;
        }
        order
    }

    /// A connection from `client` to `endpoint` was established: the client sticks to it
    /// (affinity, refreshed on every connection as upstream's `recent` match does) and the
    /// endpoint is healthy again.
    pub fn connected(&mut self, client: IpAddr, endpoint: SocketAddr, now: Instant) {
        self.failed.remove(&endpoint);
        if self.plan.affinity.is_some() {
            if self.sticky.len() > 65_536 {
                let timeout = self.plan.affinity.unwrap_or_default();
                self.sticky
                    .retain(|_, (_, last)| now.duration_since(*last) < timeout);
            }
            self.sticky.insert(client, (endpoint, now));
        }
    }

    /// A connect from `client` to `endpoint` failed or timed out: the endpoint is tried last
    /// for a while and the client's affinity to it ends.
    pub fn failed(&mut self, client: IpAddr, endpoint: SocketAddr, now: Instant) {
        self.failed.insert(endpoint, now + FAILED_ENDPOINT_COOLDOWN);
        if self
            .sticky
            .get(&client)
            .is_some_and(|(ep, _)| *ep == endpoint)
        {
            self.sticky.remove(&client);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ServiceName, ServicePortName};

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn three() -> PortPlan {
        let eps = vec![sa("10.0.0.1:80"), sa("10.0.0.2:80"), sa("10.0.0.3:80")];
        PortPlan {
            internal: eps.clone(),
            external: eps,
            ..PortPlan::default()
        }
    }

    #[test]
    fn round_robin_visits_every_endpoint_in_turn() {
        let now = Instant::now();
        let mut b = PortBalancer::new(three());
        let firsts: Vec<SocketAddr> = (0..6)
            .map(|_| b.candidates(ip("10.1.0.1"), Path::Internal, false, now)[0])
            .collect();
        assert_eq!(
            firsts,
            vec![
                sa("10.0.0.1:80"),
                sa("10.0.0.2:80"),
                sa("10.0.0.3:80"),
                sa("10.0.0.1:80"),
                sa("10.0.0.2:80"),
                sa("10.0.0.3:80")
            ]
        );
        // Every candidate list holds each endpoint once, for retries.
        let c = b.candidates(ip("10.1.0.1"), Path::Internal, false, now);
        assert_eq!(
            c,
            vec![sa("10.0.0.1:80"), sa("10.0.0.2:80"), sa("10.0.0.3:80")]
        );
    }

    #[test]
    fn empty_path_refuses() {
        let now = Instant::now();
        let mut b = PortBalancer::new(PortPlan {
            internal: vec![sa("10.0.0.1:80")],
            ..PortPlan::default()
        });
        assert!(
            b.candidates(ip("1.2.3.4"), Path::External, false, now)
                .is_empty()
        );
        assert!(!b.plan().serves(Path::External));
        assert!(b.plan().serves(Path::Internal));
    }

    #[test]
    fn failed_endpoint_goes_last_until_cooldown_ends() {
        let now = Instant::now();
        let mut b = PortBalancer::new(three());
        b.failed(ip("10.1.0.1"), sa("10.0.0.1:80"), now);
        for _ in 0..3 {
            let c = b.candidates(ip("10.1.0.1"), Path::Internal, false, now);
            assert_eq!(c.len(), 3);
            assert_eq!(c[2], sa("10.0.0.1:80"), "{c:?}");
        }
        let later = now + FAILED_ENDPOINT_COOLDOWN + Duration::from_millis(1);
        let firsts: Vec<_> = (0..3)
            .map(|_| b.candidates(ip("10.1.0.1"), Path::Internal, false, later)[0])
            .collect();
        assert!(firsts.contains(&sa("10.0.0.1:80")), "{firsts:?}");
        // A success clears the mark at once.
        b.failed(ip("10.1.0.1"), sa("10.0.0.2:80"), later);
        b.connected(ip("10.1.0.1"), sa("10.0.0.2:80"), later);
        let firsts: Vec<_> = (0..3)
            .map(|_| b.candidates(ip("10.1.0.1"), Path::Internal, false, later)[0])
            .collect();
        assert!(firsts.contains(&sa("10.0.0.2:80")), "{firsts:?}");
    }

    #[test]
    fn client_ip_affinity_sticks_until_timeout() {
        let now = Instant::now();
        let mut b = PortBalancer::new(PortPlan {
            affinity: Some(Duration::from_secs(10)),
            ..three()
        });
        let client = ip("10.1.0.7");
        let first = b.candidates(client, Path::Internal, false, now)[0];
        b.connected(client, first, now);
        for i in 1..10 {
            let t = now + Duration::from_secs(i);
            let c = b.candidates(client, Path::Internal, false, t);
            assert_eq!(c[0], first);
            assert_eq!(c.len(), 3, "the others stay as retries");
            b.connected(client, c[0], t);
        }
        // Another client is balanced independently.
        let other = b.candidates(ip("10.1.0.8"), Path::Internal, false, now)[0];
        let other2 = b.candidates(ip("10.1.0.9"), Path::Internal, false, now)[0];
        assert_ne!(other, other2);
        // 10 s after the last use the affinity is gone and round-robin decides again.
        let late = now + Duration::from_secs(9 + 10);
        let picks: Vec<_> = (0..3)
            .map(|_| b.candidates(client, Path::Internal, false, late)[0])
            .collect();
        assert_eq!(picks.len(), 3);
        assert!(picks.iter().any(|p| *p != first), "{picks:?}");
    }

    #[test]
    fn affinity_ends_when_the_endpoint_fails_or_leaves() {
        let now = Instant::now();
        let mut b = PortBalancer::new(PortPlan {
            affinity: Some(Duration::from_secs(100)),
            ..three()
        });
        let client = ip("10.1.0.7");
        b.connected(client, sa("10.0.0.2:80"), now);
        assert_eq!(
            b.candidates(client, Path::Internal, false, now)[0],
            sa("10.0.0.2:80")
        );
        b.failed(client, sa("10.0.0.2:80"), now);
        assert_ne!(
            b.candidates(client, Path::Internal, false, now)[0],
            sa("10.0.0.2:80")
        );

        b.connected(client, sa("10.0.0.3:80"), now);
        let mut p = three();
        p.affinity = Some(Duration::from_secs(100));
        p.internal.retain(|e| *e != sa("10.0.0.3:80"));
        p.external = p.internal.clone();
        b.update(p, now);
        let c = b.candidates(client, Path::Internal, false, now);
        assert!(!c.contains(&sa("10.0.0.3:80")), "{c:?}");
    }

    #[test]
    fn update_keeps_affinity_to_remaining_endpoints() {
        let now = Instant::now();
        let plan = PortPlan {
            affinity: Some(Duration::from_secs(100)),
            ..three()
        };
        let mut b = PortBalancer::new(plan.clone());
        let client = ip("10.1.0.7");
        b.connected(client, sa("10.0.0.3:80"), now);
        let mut bigger = plan;
        bigger.internal.push(sa("10.0.0.4:80"));
        b.update(bigger, now);
        assert_eq!(
            b.candidates(client, Path::Internal, false, now)[0],
            sa("10.0.0.3:80")
        );
    }

    #[test]
    fn local_clients_of_external_local_ports_are_short_circuited() {
        let now = Instant::now();
        let mut b = PortBalancer::new(PortPlan {
            internal: vec![sa("10.0.0.1:80"), sa("10.0.2.1:80")],
            external: vec![sa("10.0.0.1:80")],
            short_circuit: vec![sa("10.0.0.1:80"), sa("10.0.2.1:80")],
            ..PortPlan::default()
        });
        let ext: Vec<_> = (0..4)
            .map(|_| b.candidates(ip("192.0.2.1"), Path::External, false, now))
            .collect();
        assert!(ext.iter().all(|c| c == &vec![sa("10.0.0.1:80")]), "{ext:?}");
        let local: Vec<_> = (0..4)
            .map(|_| b.candidates(ip("10.0.0.9"), Path::External, true, now)[0])
            .collect();
        assert!(local.contains(&sa("10.0.2.1:80")), "{local:?}");
    }

    fn port() -> ServicePort {
        ServicePort::cluster_ip(
            ServicePortName {
                service: ServiceName::new("ns", "svc"),
                port: "http".into(),
                protocol: Protocol::Tcp,
            },
            ip("10.96.0.1"),
            80,
        )
    }

    fn ep(addr: &str, node: &str) -> Endpoint {
        Endpoint {
            node_name: Some(node.into()),
            ..Endpoint::ready_at(ip(addr), 8080)
        }
    }

    fn node() -> NodeInfo {
        NodeInfo {
            name: "node-a".into(),
            ..NodeInfo::default()
        }
    }

    #[test]
    fn plan_follows_the_model_selection() {
        let eps = vec![
            ep("10.0.0.1", "node-a"),
            ep("10.0.2.1", "node-b"),
            ep("fd00::1", "node-a"),
        ];
        // Cluster policy, no external access.
        let p = plan(&port(), &eps, IpFamily::V4, &node());
        assert_eq!(p.internal, vec![sa("10.0.0.1:8080"), sa("10.0.2.1:8080")]);
        assert!(p.external.is_empty() && p.short_circuit.is_empty());
        assert!(!p.serves(Path::External));
        let p6 = plan(&port(), &eps, IpFamily::V6, &node());
        assert_eq!(p6.internal, vec![sa("[fd00::1]:8080")]);

        // ITP Local: only this node's endpoint.
        let itp = ServicePort {
            internal_policy_local: true,
            ..port()
        };
        assert_eq!(
            plan(&itp, &eps, IpFamily::V4, &node()).internal,
            vec![sa("10.0.0.1:8080")]
        );

        // ETP Local NodePort: external is local-only, local clients short-circuit to all.
        let etp = ServicePort {
            node_port: Some(30080),
            external_policy_local: true,
            ..port()
        };
        let p = plan(&etp, &eps, IpFamily::V4, &node());
        assert_eq!(p.external, vec![sa("10.0.0.1:8080")]);
        assert_eq!(
            p.short_circuit,
            vec![sa("10.0.0.1:8080"), sa("10.0.2.1:8080")]
        );
        assert_eq!(p.internal.len(), 2);
        // ...and with no local endpoint, external is empty but local clients still served.
        let remote_only = vec![ep("10.0.2.1", "node-b")];
        let p = plan(&etp, &remote_only, IpFamily::V4, &node());
        assert!(p.external.is_empty());
        assert!(p.serves(Path::External));

        // Terminating fallback comes from the model: only serving-terminating endpoints.
        let term = vec![Endpoint {
            ready: false,
            serving: true,
            terminating: true,
            ..ep("10.0.0.5", "node-a")
        }];
        assert_eq!(
            plan(&port(), &term, IpFamily::V4, &node()).internal,
            vec![sa("10.0.0.5:8080")]
        );

        // No endpoints: nothing to serve.
        let p = plan(&port(), &[], IpFamily::V4, &node());
        assert!(!p.serves(Path::Internal));

        // Source ranges of load-balancer IPs, with the node's own VIP traffic admitted when
        // the node address is in range.
        let fw = ServicePort {
            load_balancer_ips: vec![ip("203.0.113.5")],
            load_balancer_source_ranges: vec!["192.0.2.0/24".parse().unwrap()],
            ..port()
        };
        let p = plan(&fw, &eps, IpFamily::V4, &node());
        assert!(p.admits_on_load_balancer(ip("192.0.2.7")));
        assert!(!p.admits_on_load_balancer(ip("198.51.100.7")));
        assert!(!p.admits_on_load_balancer(ip("203.0.113.5")));
        let in_range = NodeInfo {
            addresses: vec![ip("192.0.2.10")],
            ..node()
        };
        let p = plan(&fw, &eps, IpFamily::V4, &in_range);
        assert!(p.admits_on_load_balancer(ip("203.0.113.5")));
        assert!(
            plan(&port(), &eps, IpFamily::V4, &node()).admits_on_load_balancer(ip("198.51.100.7"))
        );

        // Affinity timeout is carried.
        let sticky = ServicePort {
            session_affinity: SessionAffinity::ClientIp {
                timeout_seconds: 30,
            },
            ..port()
        };
        assert_eq!(
            plan(&sticky, &eps, IpFamily::V4, &node()).affinity,
            Some(Duration::from_secs(30))
        );
    }
}
