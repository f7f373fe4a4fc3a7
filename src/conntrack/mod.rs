//! Stale UDP/SCTP conntrack cleanup: upstream kube-proxy's conntrack reconciler.
//!
//! UDP and SCTP have no connection teardown the kernel could observe, so a conntrack entry
//! created while a service pointed at endpoint A keeps sending the client's datagrams to A
//! after A is gone (until the entry idles out, which never happens for a chatty client), and
//! an entry created while the service had no rules keeps bypassing the DNAT rules installed
//! later. After each successful sync the proxy therefore deletes every UDP/SCTP entry that:
//!
//! - was sent to a service address (cluster IP, external IP or load-balancer IP of the
//!   family) and port, or to a NodePort on any address, and
//! - whose DNAT target (the source of the reply direction) is not one of the endpoints this
//!   node currently sends that service port to.
//!
//! An entry created before the service had endpoints is covered by the same rule: nothing
//! rewrote it, so its reply source is the service address itself, which is never an endpoint.
//! TCP entries and entries to addresses that are not services are never touched.
//!
//! The module is split like the dataplane backends: [`StaleFlowFilter`] is pure (snapshot in,
//! verdict per flow out), [`ConntrackTable`] is the narrow kernel edge with an in-memory
//! [`FakeConntrack`] and the real ctnetlink implementation [`NetlinkConntrack`], and
//! [`cleanup_stale_flows`] ties them together with one dump per family and protocol.

mod netlink;

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};

use crate::model::{IpFamily, Protocol, Snapshot, select};

pub use netlink::NetlinkConntrack;

/// IANA protocol number of TCP, as conntrack reports it.
pub const IPPROTO_TCP: u8 = 6;
/// IANA protocol number of UDP, as conntrack reports it.
pub const IPPROTO_UDP: u8 = 17;
/// IANA protocol number of SCTP, as conntrack reports it.
pub const IPPROTO_SCTP: u8 = 132;

/// The IANA protocol number of a service port protocol: conntrack speaks numbers, the model
/// speaks names, and this is the one place they meet.
pub fn protocol_number(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => IPPROTO_TCP,
        Protocol::Udp => IPPROTO_UDP,
        Protocol::Sctp => IPPROTO_SCTP,
    }
}

/// One conntrack entry, reduced to what the stale-flow decision and an exact delete need.
///
/// The original direction is what the client sent (destination = the service address); the
/// reply direction is what the kernel expects back, so its source is where the flow was
/// DNATed to (or the original destination when nothing rewrote it).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Flow {
    /// IANA L4 protocol number ([`IPPROTO_UDP`], [`IPPROTO_SCTP`], ...).
    pub protocol: u8,
    /// Source of the original direction (the client).
    pub orig_src: SocketAddr,
    /// Destination of the original direction (the service address the client used).
    pub orig_dst: SocketAddr,
    /// Source of the reply direction: the DNAT target, i.e. the endpoint the flow is pinned to.
    pub reply_src: SocketAddr,
    /// Destination of the reply direction (the client, or the SNAT address when masqueraded).
    pub reply_dst: SocketAddr,
    /// Conntrack zone (0 unless something uses `CT --zone`); a delete must name it to find
    /// the entry.
    pub zone: u16,
    /// The kernel's entry id, when known. A delete that carries it removes exactly the dumped
    /// entry and never a newer flow that reuses the same tuple between dump and delete.
    pub id: Option<u32>,
}

impl Flow {
    /// A flow in zone 0 without an entry id (tests and the fake table).
    pub fn new(
        protocol: u8,
        orig_src: SocketAddr,
        orig_dst: SocketAddr,
        reply_src: SocketAddr,
        reply_dst: SocketAddr,
    ) -> Self {
        Flow {
            protocol,
            orig_src,
            orig_dst,
            reply_src,
            reply_dst,
            zone: 0,
            id: None,
        }
    }

    /// The family of the flow (of its original destination).
    pub fn family(&self) -> IpFamily {
        IpFamily::of(&self.orig_dst.ip())
    }
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.protocol {
            IPPROTO_TCP => "tcp",
            IPPROTO_UDP => "udp",
            IPPROTO_SCTP => "sctp",
            _ => "proto",
        };
        write!(
            f,
            "{proto}({}) {} -> {} via {}",
            self.protocol, self.orig_src, self.orig_dst, self.reply_src
        )?;
        if self.zone != 0 {
            write!(f, " zone {}", self.zone)?;
        }
        Ok(())
    }
}

/// Why a conntrack operation failed. Never fatal for the proxy: the next sync tries again.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    /// The netlink socket could not be opened, bound, written or read.
    #[error("conntrack netlink socket: cannot {context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel answered a request with an error.
    #[error("kernel rejected conntrack {op}: {source}")]
    Kernel {
        /// The request (`dump` or `delete`).
        op: &'static str,
        /// The errno the kernel returned.
        #[source]
        source: std::io::Error,
    },
    /// The entry to delete no longer exists (it expired, or someone else deleted it): the
    /// cleanup's goal is met, so this is counted apart from real errors.
    #[error("conntrack entry not found (expired or already deleted)")]
    NotFound,
    /// The kernel sent something that does not parse as netlink.
    #[error("undecodable conntrack netlink message: {0}")]
    Decode(String),
}

/// The kernel edge of the cleanup: one dump per family and protocol, and exact deletes.
///
/// Kept this narrow so that everything above it is tested against [`FakeConntrack`] and the
/// real implementation ([`NetlinkConntrack`]) is a thin translation to ctnetlink.
pub trait ConntrackTable {
    /// Every entry of `family` whose L4 protocol is `protocol` (an IANA number).
    fn dump(&mut self, family: IpFamily, protocol: u8) -> Result<Vec<Flow>, ConntrackError>;

    /// Deletes exactly `flow` (matched by its original tuple, zone and, when known, id).
    /// [`ConntrackError::NotFound`] when it is already gone.
    fn delete(&mut self, flow: &Flow) -> Result<(), ConntrackError>;

    /// Deletes every flow, returning one result per flow in order. One failure never stops
    /// the others. Implementations override it to batch requests; the default deletes one
    /// by one.
    fn delete_all(&mut self, flows: &[Flow]) -> Vec<Result<(), ConntrackError>> {
        flows.iter().map(|flow| self.delete(flow)).collect()
    }
}

/// A DNAT target: endpoint address and target port.
type Target = (IpAddr, u16);

/// Decides, for one family, which conntrack entries a snapshot makes stale. Pure.
///
/// Built once per cleanup from the snapshot; each lookup is two hash probes, so the cost of a
/// cleanup is dominated by the kernel dump, not by the number of services.
#[derive(Clone, Debug)]
pub struct StaleFlowFilter {
    family: IpFamily,
    /// Endpoint sets, shared by every address of a service port.
    targets: Vec<HashSet<Target>>,
    /// `(protocol, service address, service port)` → index into `targets`.
    by_address: HashMap<(u8, IpAddr, u16), usize>,
    /// `(protocol, node port)` → index into `targets`.
    by_node_port: HashMap<(u8, u16), usize>,
    /// Protocols with at least one service port to check: the only ones worth a dump.
    protocols: BTreeSet<u8>,
}

impl StaleFlowFilter {
    /// Builds the lookup maps for `family` from `snapshot`.
    ///
    /// A flow is kept while its DNAT target is any *serving* endpoint of the service port
    /// (ready, or serving while terminating, on any node), as upstream's reconciler does:
    /// established UDP sessions to a draining or remote endpoint are not cut short by the
    /// arrival of a ready or local one. Ports whose protocol needs no cleanup (TCP) are left
    /// out, and so are ports this node cannot send anywhere ([`select`] finds nothing
    /// reachable): there is nowhere better for their flows, and they are cleaned by the first
    /// sync that has endpoints (their reply source will not be one of them).
    pub fn new(snapshot: &Snapshot, family: IpFamily) -> Self {
        let mut filter = StaleFlowFilter {
            family,
            targets: Vec::new(),
            by_address: HashMap::new(),
            by_node_port: HashMap::new(),
            protocols: BTreeSet::new(),
        };
        for state in snapshot.ports.values() {
            let port = &state.port;
            if !port.name.protocol.needs_conntrack_cleanup() {
                continue;
            }
            let selection = select(port, &state.endpoints, family, &snapshot.node);
            if selection.reachable.is_empty() {
                continue;
            }
            let set: HashSet<Target> = state
                .endpoints
                .iter()
                .filter(|ep| family.contains(&ep.ip) && (ep.ready || ep.serving))
                .map(|ep| (ep.ip, ep.port))
                .collect();
            filter.targets.push(set);
            let index = filter.targets.len() - 1;
            let proto = protocol_number(port.name.protocol);
            let addresses = port
                .cluster_ip_for(family)
                .into_iter()
                .chain(port.external_ips_for(family))
                .chain(port.load_balancer_ips_for(family));
            for ip in addresses {
                link(
                    &mut filter.by_address,
                    &mut filter.targets,
                    (proto, ip, port.port),
                    index,
                );
            }
            if let Some(node_port) = port.node_port {
                link(
                    &mut filter.by_node_port,
                    &mut filter.targets,
                    (proto, node_port),
                    index,
                );
            }
            filter.protocols.insert(proto);
        }
        filter
    }

    /// The family this filter judges; flows of the other family are never stale.
    pub fn family(&self) -> IpFamily {
        self.family
    }

    /// The protocols worth dumping (UDP and/or SCTP, only when some such port has endpoints),
    /// in ascending order.
    pub fn protocols(&self) -> impl Iterator<Item = u8> + '_ {
        self.protocols.iter().copied()
    }

    /// No service port can have stale flows: the cleanup can skip the kernel entirely.
    pub fn is_empty(&self) -> bool {
        self.protocols.is_empty()
    }

    /// Whether `flow` must be deleted: it targets a UDP/SCTP service address and port (or a
    /// NodePort on any address) and its DNAT target is not a current endpoint of that port.
    ///
    /// A service address takes precedence over a NodePort with the same number, so a flow to
    /// a cluster IP is judged against its own service only.
    pub fn is_stale(&self, flow: &Flow) -> bool {
        if !self.protocols.contains(&flow.protocol) {
            return false;
        }
        let dst = flow.orig_dst;
        if !self.family.contains(&dst.ip()) {
            return false;
        }
        let index = match self
            .by_address
            .get(&(flow.protocol, dst.ip(), dst.port()))
            .or_else(|| self.by_node_port.get(&(flow.protocol, dst.port())))
        {
            Some(index) => *index,
            None => return false,
        };
        !self.targets[index].contains(&(flow.reply_src.ip(), flow.reply_src.port()))
    }
}

/// Points `key` at endpoint set `index`; when two service ports claim the same key (two
/// services sharing an external IP and port), the key gets the union of both sets, so a flow
/// is stale only when neither service sends there.
fn link<K: Hash + Eq>(
    map: &mut HashMap<K, usize>,
    targets: &mut Vec<HashSet<Target>>,
    key: K,
    index: usize,
) {
    match map.entry(key) {
        Entry::Vacant(slot) => {
            slot.insert(index);
        }
        Entry::Occupied(mut slot) => {
            let old = *slot.get();
            if old != index {
                let merged = targets[old].union(&targets[index]).copied().collect();
                targets.push(merged);
                *slot.get_mut() = targets.len() - 1;
            }
        }
    }
}

/// What one cleanup did, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CleanupStats {
    /// Entries dumped and judged.
    pub examined: usize,
    /// Stale entries deleted.
    pub deleted: usize,
    /// Stale entries that were gone by the time of the delete (expired or deleted
    /// elsewhere): not errors, the goal is met.
    pub already_gone: usize,
    /// Failed dumps and failed deletes; those entries are retried by the next cleanup.
    pub errors: usize,
}

/// Deletes the stale UDP/SCTP conntrack entries of `family` (see the module docs).
///
/// Dumps the table once per protocol that has service ports with endpoints (nothing at all
/// when none has), judges every entry with [`StaleFlowFilter`] and deletes the stale ones with
/// [`ConntrackTable::delete_all`]. A failed delete is counted and logged and never stops the
/// others; a failed dump is counted and the other protocols still run. It returns an error
/// only when every dump failed, i.e. the table could not be read at all.
pub fn cleanup_stale_flows(
    table: &mut dyn ConntrackTable,
    snapshot: &Snapshot,
    family: IpFamily,
) -> Result<CleanupStats, ConntrackError> {
    let filter = StaleFlowFilter::new(snapshot, family);
    let mut stats = CleanupStats::default();
    let mut dump_error = None;
    let mut dumps_ok = 0;
    for protocol in filter.protocols() {
        let flows = match table.dump(family, protocol) {
            Ok(flows) => flows,
            Err(e) => {
                tracing::warn!(?family, protocol, error = %e, "cannot dump conntrack entries");
                stats.errors += 1;
                dump_error.get_or_insert(e);
                continue;
            }
        };
        dumps_ok += 1;
        stats.examined += flows.len();
        let stale: Vec<Flow> = flows.into_iter().filter(|f| filter.is_stale(f)).collect();
        if stale.is_empty() {
            continue;
        }
        let mut failed = 0usize;
        for (flow, result) in stale.iter().zip(table.delete_all(&stale)) {
            match result {
                Ok(()) => {
                    stats.deleted += 1;
                    tracing::debug!(%flow, "deleted stale conntrack entry");
                }
                Err(ConntrackError::NotFound) => stats.already_gone += 1,
                Err(e) => {
                    failed += 1;
                    // One line per failure would flood the log when the kernel refuses
                    // everything (e.g. missing CAP_NET_ADMIN): the first few, then a count.
                    if failed <= 3 {
                        tracing::warn!(%flow, error = %e, "cannot delete stale conntrack entry");
                    }
                }
            }
        }
        if failed > 3 {
            tracing::warn!(
                ?family,
                protocol,
                failed,
                "cannot delete stale conntrack entries"
            );
        }
        stats.errors += failed;
    }
    match dump_error {
        Some(e) if dumps_ok == 0 => Err(e),
        _ => Ok(stats),
    }
}

/// An in-memory conntrack table for tests of everything above the kernel edge.
///
/// It records the dumps it served, and can be told to fail dumps of some protocols or deletes
/// of some flows, to exercise the error paths.
#[derive(Clone, Debug, Default)]
pub struct FakeConntrack {
    /// The entries currently "in the kernel".
    pub flows: Vec<Flow>,
    /// Every `(family, protocol)` dumped, in order.
    pub dumps: Vec<(IpFamily, u8)>,
    /// Protocols whose dumps fail.
    pub failing_dumps: BTreeSet<u8>,
    /// Flows whose deletes fail (with `EPERM`) and which stay in the table.
    pub failing_deletes: HashSet<Flow>,
}

impl FakeConntrack {
    /// A table holding `flows`.
    pub fn with_flows(flows: Vec<Flow>) -> Self {
        FakeConntrack {
            flows,
            ..FakeConntrack::default()
        }
    }
}

impl ConntrackTable for FakeConntrack {
    fn dump(&mut self, family: IpFamily, protocol: u8) -> Result<Vec<Flow>, ConntrackError> {
        self.dumps.push((family, protocol));
        if self.failing_dumps.contains(&protocol) {
            return Err(ConntrackError::Kernel {
                op: "dump",
                source: std::io::Error::from_raw_os_error(1),
            });
        }
        Ok(self
            .flows
            .iter()
            .filter(|f| f.protocol == protocol && f.family() == family)
            .cloned()
            .collect())
    }

    fn delete(&mut self, flow: &Flow) -> Result<(), ConntrackError> {
        if self.failing_deletes.contains(flow) {
            return Err(ConntrackError::Kernel {
                op: "delete",
                source: std::io::Error::from_raw_os_error(1),
            });
        }
        // The kernel finds an entry by its original tuple and zone, and checks the id when
        // the request carries one.
        let position = self.flows.iter().position(|f| {
            f.protocol == flow.protocol
                && f.orig_src == flow.orig_src
                && f.orig_dst == flow.orig_dst
                && f.zone == flow.zone
                && (flow.id.is_none() || f.id == flow.id)
        });
        match position {
            Some(i) => {
                self.flows.remove(i);
                Ok(())
            }
            None => Err(ConntrackError::NotFound),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use crate::model::{
        Endpoint, NodeInfo, ServiceName, ServicePort, ServicePortName, ServicePortState,
    };

    const NODE: &str = "node-a";

    fn sa(s: &str) -> SocketAddr {
        s.parse()
            .unwrap_or_else(|e| panic!("bad socket address {s:?}: {e}"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("bad IP {s:?}: {e}"))
    }

    /// A ready endpoint `addr:5353` on `node`.
    fn ep(addr: &str, node: &str) -> Endpoint {
        Endpoint {
            node_name: Some(node.into()),
            ..Endpoint::ready_at(ip(addr), 5353)
        }
    }

    /// `default/<name>:dns`, port 53, with the given cluster IPs.
    fn port(name: &str, protocol: Protocol, cluster_ips: &[&str]) -> ServicePort {
        let name = ServicePortName {
            service: ServiceName::new("default", name),
            port: "dns".into(),
            protocol,
        };
        ServicePort {
            cluster_ips: cluster_ips.iter().map(|s| ip(s)).collect(),
            ..ServicePort::cluster_ip(name, ip(cluster_ips[0]), 53)
        }
    }

    fn snapshot(ports: Vec<(ServicePort, Vec<Endpoint>)>) -> Snapshot {
        let mut map = BTreeMap::new();
        for (port, endpoints) in ports {
            map.insert(
                port.name.clone(),
                ServicePortState {
                    port: Arc::new(port),
                    endpoints: endpoints.into(),
                },
            );
        }
        Snapshot {
            ports: map,
            node: NodeInfo {
                name: NODE.into(),
                ..NodeInfo::default()
            },
        }
    }

    /// A UDP flow from a client to `dst`, DNATed to `target` (`dst` itself: not rewritten).
    fn udp(dst: &str, target: &str) -> Flow {
        flow(IPPROTO_UDP, dst, target)
    }

    /// Every test flow gets its own client port, so original tuples never collide.
    fn flow(protocol: u8, dst: &str, target: &str) -> Flow {
        static NEXT_PORT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(40000);
        let client_port = NEXT_PORT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dst = sa(dst);
        let client = if dst.is_ipv4() {
            SocketAddr::new(ip("192.0.2.7"), client_port)
        } else {
            SocketAddr::new(ip("2001:db8::7"), client_port)
        };
        Flow::new(protocol, client, dst, sa(target), client)
    }

    /// The standard UDP service: 10.96.0.10:53, endpoints B (local) and C (remote).
    fn dns() -> (ServicePort, Vec<Endpoint>) {
        (
            port("dns", Protocol::Udp, &["10.96.0.10"]),
            vec![ep("10.244.1.11", NODE), ep("10.244.2.12", "node-b")],
        )
    }

    fn v4(snap: &Snapshot) -> StaleFlowFilter {
        StaleFlowFilter::new(snap, IpFamily::V4)
    }

    #[test]
    fn removed_endpoint_is_stale() {
        let f = v4(&snapshot(vec![dns()]));
        assert!(f.is_stale(&udp("10.96.0.10:53", "10.244.1.10:5353")));
    }

    #[test]
    fn current_endpoint_is_kept() {
        let f = v4(&snapshot(vec![dns()]));
        assert!(!f.is_stale(&udp("10.96.0.10:53", "10.244.1.11:5353")));
        assert!(!f.is_stale(&udp("10.96.0.10:53", "10.244.2.12:5353")));
    }

    #[test]
    fn changed_target_port_is_stale() {
        let f = v4(&snapshot(vec![dns()]));
        assert!(f.is_stale(&udp("10.96.0.10:53", "10.244.1.11:5354")));
    }

    #[test]
    fn flow_created_without_endpoints_is_stale_once_there_are_some() {
        let f = v4(&snapshot(vec![dns()]));
        assert!(f.is_stale(&udp("10.96.0.10:53", "10.96.0.10:53")));
    }

    #[test]
    fn service_still_without_endpoints_is_left_alone() {
        let (p, _) = dns();
        let f = v4(&snapshot(vec![(p, vec![])]));
        assert!(f.is_empty());
        assert!(!f.is_stale(&udp("10.96.0.10:53", "10.96.0.10:53")));
        assert!(!f.is_stale(&udp("10.96.0.10:53", "10.244.1.10:5353")));
    }

    #[test]
    fn not_ready_endpoint_is_not_current() {
        let (p, mut eps) = dns();
        eps[1].ready = false;
        eps[1].serving = false;
        let f = v4(&snapshot(vec![(p, eps)]));
        assert!(f.is_stale(&udp("10.96.0.10:53", "10.244.2.12:5353")));
        assert!(!f.is_stale(&udp("10.96.0.10:53", "10.244.1.11:5353")));
    }

    /// Flows to a serving-but-terminating endpoint are kept, also once a ready endpoint
    /// exists (graceful termination, as upstream); once it stops serving they are stale.
    #[test]
    fn terminating_endpoints_keep_their_flows_while_serving() {
        let (p, _) = dns();
        let mut term = ep("10.244.1.13", NODE);
        term.ready = false;
        term.terminating = true;
        let only_terminating = v4(&snapshot(vec![(p.clone(), vec![term.clone()])]));
        assert!(!only_terminating.is_stale(&udp("10.96.0.10:53", "10.244.1.13:5353")));
        let with_ready = v4(&snapshot(vec![(
            p.clone(),
            vec![ep("10.244.1.11", NODE), term.clone()],
        )]));
        assert!(!with_ready.is_stale(&udp("10.96.0.10:53", "10.244.1.13:5353")));
        term.serving = false;
        let stopped = v4(&snapshot(vec![(p, vec![ep("10.244.1.11", NODE), term])]));
        assert!(stopped.is_stale(&udp("10.96.0.10:53", "10.244.1.13:5353")));
    }

    #[test]
    fn nodeport_flow_with_removed_endpoint_is_stale() {
        let (mut p, eps) = dns();
        p.node_port = Some(30053);
        let f = v4(&snapshot(vec![(p, eps)]));
        // Any destination address: node IPs, 127.0.0.1, ...
        assert!(f.is_stale(&udp("192.168.1.5:30053", "10.244.1.10:5353")));
        assert!(f.is_stale(&udp("127.0.0.1:30053", "10.244.1.10:5353")));
        // Not rewritten (sent before the NodePort had rules).
        assert!(f.is_stale(&udp("192.168.1.5:30053", "192.168.1.5:30053")));
        assert!(!f.is_stale(&udp("192.168.1.5:30053", "10.244.1.11:5353")));
        // Same port number, other protocol: untouched.
        assert!(!f.is_stale(&flow(IPPROTO_SCTP, "192.168.1.5:30053", "10.244.1.10:5353")));
    }

    #[test]
    fn external_and_load_balancer_ips_are_service_addresses() {
        let (mut p, eps) = dns();
        p.external_ips = vec![ip("203.0.113.5"), ip("2001:db8::5")];
        p.load_balancer_ips = vec![ip("198.51.100.9")];
        let f = v4(&snapshot(vec![(p, eps)]));
        assert!(f.is_stale(&udp("203.0.113.5:53", "10.244.1.10:5353")));
        assert!(f.is_stale(&udp("198.51.100.9:53", "10.244.1.10:5353")));
        assert!(!f.is_stale(&udp("198.51.100.9:53", "10.244.1.11:5353")));
        // Other port on the same address: not this service.
        assert!(!f.is_stale(&udp("198.51.100.9:54", "10.244.1.10:5353")));
    }

    #[test]
    fn tcp_is_never_touched() {
        let (p, eps) = dns();
        let (mut tcp_port, tcp_eps) = (port("dns", Protocol::Tcp, &["10.96.0.10"]), eps.clone());
        tcp_port.node_port = Some(30054);
        let f = v4(&snapshot(vec![(p, eps), (tcp_port, tcp_eps)]));
        assert!(!f.is_stale(&flow(IPPROTO_TCP, "10.96.0.10:53", "10.244.1.10:5353")));
        assert!(!f.is_stale(&flow(IPPROTO_TCP, "10.96.0.10:53", "10.96.0.10:53")));
        assert!(!f.is_stale(&flow(IPPROTO_TCP, "192.168.1.5:30054", "10.244.1.10:5353")));
        assert_eq!(f.protocols().collect::<Vec<_>>(), vec![IPPROTO_UDP]);
    }

    #[test]
    fn sctp_is_cleaned_like_udp() {
        let (p, eps) = (
            port("sig", Protocol::Sctp, &["10.96.0.20"]),
            vec![ep("10.244.1.11", NODE)],
        );
        let f = v4(&snapshot(vec![(p, eps)]));
        assert!(f.is_stale(&flow(IPPROTO_SCTP, "10.96.0.20:53", "10.244.1.10:5353")));
        assert!(!f.is_stale(&flow(IPPROTO_SCTP, "10.96.0.20:53", "10.244.1.11:5353")));
        // A UDP flow to the SCTP service's address is not the service's.
        assert!(!f.is_stale(&udp("10.96.0.20:53", "10.244.1.10:5353")));
        assert_eq!(f.protocols().collect::<Vec<_>>(), vec![IPPROTO_SCTP]);
    }

    #[test]
    fn non_service_destinations_are_untouched() {
        let f = v4(&snapshot(vec![dns()]));
        assert!(!f.is_stale(&udp("10.96.0.99:53", "10.244.1.10:5353")));
        assert!(!f.is_stale(&udp("8.8.8.8:53", "8.8.8.8:53")));
        assert!(!f.is_stale(&udp("10.244.1.10:5353", "10.244.1.10:5353")));
    }

    #[test]
    fn ipv6() {
        let p = port("dns", Protocol::Udp, &["10.96.0.10", "fd00:96::10"]);
        let eps = vec![ep("10.244.1.11", NODE), ep("fd00:244::11", NODE)];
        let snap = snapshot(vec![(p, eps)]);
        let f6 = StaleFlowFilter::new(&snap, IpFamily::V6);
        assert!(f6.is_stale(&udp("[fd00:96::10]:53", "[fd00:244::10]:5353")));
        assert!(f6.is_stale(&udp("[fd00:96::10]:53", "[fd00:96::10]:53")));
        assert!(!f6.is_stale(&udp("[fd00:96::10]:53", "[fd00:244::11]:5353")));
        // IPv4 flows are not judged by the IPv6 filter, and the other way round.
        assert!(!f6.is_stale(&udp("10.96.0.10:53", "10.244.1.10:5353")));
        let f4 = v4(&snap);
        assert!(!f4.is_stale(&udp("[fd00:96::10]:53", "[fd00:244::10]:5353")));
        assert!(f4.is_stale(&udp("10.96.0.10:53", "10.244.1.10:5353")));
    }

    /// ITP Local without external access: a flow pinned to a remote endpoint that is still
    /// serving is kept (upstream keeps flows to any serving endpoint); with no local endpoint
    /// left there is nowhere to move flows, and they are left alone.
    #[test]
    fn internal_traffic_policy_local_follows_select() {
        let (mut p, eps) = dns();
        p.internal_policy_local = true;
        let f = v4(&snapshot(vec![(p.clone(), eps)]));
        assert!(!f.is_stale(&udp("10.96.0.10:53", "10.244.1.11:5353")));
        assert!(!f.is_stale(&udp("10.96.0.10:53", "10.244.2.12:5353")));
        assert!(
            f.is_stale(&udp("10.96.0.10:53", "10.244.9.9:5353")),
            "not an endpoint at all"
        );

        let remote_only = v4(&snapshot(vec![(p, vec![ep("10.244.2.12", "node-b")])]));
        assert!(remote_only.is_empty());
        assert!(!remote_only.is_stale(&udp("10.96.0.10:53", "10.244.2.12:5353")));
    }

    /// ETP Local with a NodePort: external traffic uses local endpoints but pods and the node
    /// itself are short-circuited to the cluster-wide set, so every ready endpoint is current.
    #[test]
    fn external_traffic_policy_local_follows_select() {
        let (mut p, eps) = dns();
        p.external_policy_local = true;
        p.node_port = Some(30053);
        let f = v4(&snapshot(vec![(p.clone(), eps)]));
        assert!(!f.is_stale(&udp("192.168.1.5:30053", "10.244.1.11:5353")));
        assert!(!f.is_stale(&udp("192.168.1.5:30053", "10.244.2.12:5353")));
        assert!(!f.is_stale(&udp("10.96.0.10:53", "10.244.2.12:5353")));
        assert!(f.is_stale(&udp("192.168.1.5:30053", "10.244.3.13:5353")));

        // No local endpoint: external traffic is dropped, the short-circuit still uses the
        // remote endpoint, so flows to it stay.
        let remote_only = v4(&snapshot(vec![(p, vec![ep("10.244.2.12", "node-b")])]));
        assert!(!remote_only.is_stale(&udp("192.168.1.5:30053", "10.244.2.12:5353")));
        assert!(remote_only.is_stale(&udp("192.168.1.5:30053", "10.244.1.11:5353")));
    }

    #[test]
    fn service_address_wins_over_a_node_port_with_the_same_number() {
        let (mut a, a_eps) = dns();
        a.port = 30053;
        let mut b = port("other", Protocol::Udp, &["10.96.0.20"]);
        b.node_port = Some(30053);
        let b_eps = vec![ep("10.244.2.20", "node-b")];
        let f = v4(&snapshot(vec![(a, a_eps), (b, b_eps)]));
        assert!(!f.is_stale(&udp("10.96.0.10:30053", "10.244.1.11:5353")));
        assert!(f.is_stale(&udp("10.96.0.10:30053", "10.244.2.20:5353")));
        assert!(!f.is_stale(&udp("192.168.1.5:30053", "10.244.2.20:5353")));
    }

    #[test]
    fn shared_external_ip_keeps_flows_of_both_services() {
        let (mut a, a_eps) = dns();
        a.external_ips = vec![ip("203.0.113.5")];
        let mut b = port("other", Protocol::Udp, &["10.96.0.20"]);
        b.external_ips = vec![ip("203.0.113.5")];
        let b_eps = vec![ep("10.244.2.20", "node-b")];
        let f = v4(&snapshot(vec![(a, a_eps), (b, b_eps)]));
        assert!(!f.is_stale(&udp("203.0.113.5:53", "10.244.1.11:5353")));
        assert!(!f.is_stale(&udp("203.0.113.5:53", "10.244.2.20:5353")));
        assert!(f.is_stale(&udp("203.0.113.5:53", "10.244.9.9:5353")));
        // Each cluster IP still only keeps its own endpoints.
        assert!(f.is_stale(&udp("10.96.0.20:53", "10.244.1.11:5353")));
    }

    fn sample_table() -> (Snapshot, FakeConntrack) {
        let (mut p, eps) = dns();
        p.node_port = Some(30053);
        p.cluster_ips.push(ip("fd00:96::10"));
        let mut eps = eps;
        eps.push(ep("fd00:244::11", NODE));
        let sctp = (
            port("sig", Protocol::Sctp, &["10.96.0.20"]),
            vec![ep("10.244.1.21", NODE)],
        );
        let tcp = (
            port("dns", Protocol::Tcp, &["10.96.0.10"]),
            vec![ep("10.244.1.11", NODE)],
        );
        let snap = snapshot(vec![(p, eps), sctp, tcp]);
        let table = FakeConntrack::with_flows(vec![
            udp("10.96.0.10:53", "10.244.1.10:5353"),       // stale
            udp("10.96.0.10:53", "10.244.1.11:5353"),       // kept
            udp("10.96.0.10:53", "10.96.0.10:53"),          // stale
            udp("192.168.1.5:30053", "10.244.1.10:5353"),   // stale
            udp("10.1.2.3:53", "10.1.2.3:53"),              // kept
            udp("[fd00:96::10]:53", "[fd00:244::10]:5353"), // stale (v6)
            flow(IPPROTO_TCP, "10.96.0.10:53", "10.244.1.10:5353"), // kept
            flow(IPPROTO_SCTP, "10.96.0.20:53", "10.244.1.20:5353"), // stale
            flow(IPPROTO_SCTP, "10.96.0.20:53", "10.244.1.21:5353"), // kept
        ]);
        (snap, table)
    }

    #[test]
    fn cleanup_deletes_exactly_the_stale_flows_with_one_dump_per_protocol() {
        let (snap, mut table) = sample_table();
        let before = table.flows.clone();
        let stats = cleanup_stale_flows(&mut table, &snap, IpFamily::V4).unwrap();
        assert_eq!(
            stats,
            CleanupStats {
                examined: 7,
                deleted: 4,
                already_gone: 0,
                errors: 0
            }
        );
        assert_eq!(
            table.dumps,
            vec![(IpFamily::V4, IPPROTO_UDP), (IpFamily::V4, IPPROTO_SCTP)]
        );
        let kept: Vec<&Flow> = before.iter().filter(|f| table.flows.contains(f)).collect();
        assert_eq!(
            kept,
            vec![&before[1], &before[4], &before[5], &before[6], &before[8]]
        );

        let stats6 = cleanup_stale_flows(&mut table, &snap, IpFamily::V6).unwrap();
        assert_eq!(stats6.deleted, 1);
        assert_eq!(stats6.examined, 1);
        assert_eq!(table.dumps.last(), Some(&(IpFamily::V6, IPPROTO_UDP)));

        // Idempotent: nothing left to do.
        let again = cleanup_stale_flows(&mut table, &snap, IpFamily::V4).unwrap();
        assert_eq!(again.deleted, 0);
        assert_eq!(again.examined, 3);
    }

    #[test]
    fn cleanup_without_udp_services_does_not_dump() {
        let tcp = (
            port("web", Protocol::Tcp, &["10.96.0.10"]),
            vec![ep("10.244.1.11", NODE)],
        );
        let mut table = FakeConntrack::with_flows(vec![udp("10.96.0.10:53", "10.244.1.10:5353")]);
        let stats = cleanup_stale_flows(&mut table, &snapshot(vec![tcp]), IpFamily::V4).unwrap();
        assert_eq!(stats, CleanupStats::default());
        assert!(table.dumps.is_empty());
        assert_eq!(table.flows.len(), 1);
    }

    #[test]
    fn one_failed_delete_does_not_stop_the_others() {
        let (snap, mut table) = sample_table();
        let failing = table.flows[0].clone();
        table.failing_deletes.insert(failing.clone());
        // Already gone by the time of the delete: the fake reports NotFound for it.
        let vanished = udp("10.96.0.10:53", "10.244.1.99:5353");
        struct Vanishing<'a> {
            inner: &'a mut FakeConntrack,
            vanished: Flow,
        }
        impl ConntrackTable for Vanishing<'_> {
            fn dump(&mut self, family: IpFamily, proto: u8) -> Result<Vec<Flow>, ConntrackError> {
                let mut flows = self.inner.dump(family, proto)?;
                if proto == IPPROTO_UDP && family == IpFamily::V4 {
                    flows.push(self.vanished.clone());
                }
                Ok(flows)
            }
            fn delete(&mut self, flow: &Flow) -> Result<(), ConntrackError> {
                self.inner.delete(flow)
            }
        }
        let mut wrapped = Vanishing {
            inner: &mut table,
            vanished,
        };
        let stats = cleanup_stale_flows(&mut wrapped, &snap, IpFamily::V4).unwrap();
        assert_eq!(
            stats,
            CleanupStats {
                examined: 8,
                deleted: 3,
                already_gone: 1,
                errors: 1
            }
        );
        assert!(table.flows.contains(&failing));
    }

    #[test]
    fn failed_dump_of_one_protocol_still_cleans_the_other() {
        let (snap, mut table) = sample_table();
        table.failing_dumps.insert(IPPROTO_SCTP);
        let stats = cleanup_stale_flows(&mut table, &snap, IpFamily::V4).unwrap();
        assert_eq!(stats.deleted, 3);
        assert_eq!(stats.errors, 1);

        table.failing_dumps.insert(IPPROTO_UDP);
        let err = cleanup_stale_flows(&mut table, &snap, IpFamily::V4).unwrap_err();
        assert!(
            matches!(err, ConntrackError::Kernel { op: "dump", .. }),
            "{err}"
        );
    }

    #[test]
    fn fake_delete_honours_the_entry_id() {
        let mut f = udp("10.96.0.10:53", "10.244.1.10:5353");
        f.id = Some(7);
        let mut table = FakeConntrack::with_flows(vec![f.clone()]);
        let mut other = f.clone();
        other.id = Some(8);
        assert!(matches!(
            table.delete(&other),
            Err(ConntrackError::NotFound)
        ));
        table.delete(&f).unwrap();
        assert!(table.flows.is_empty());
    }

    #[test]
    fn flow_display_names_protocol_and_target() {
        let mut f = udp("10.96.0.10:53", "10.244.1.10:5353");
        f.orig_src = sa("192.0.2.7:40000");
        assert_eq!(
            f.to_string(),
            "udp(17) 192.0.2.7:40000 -> 10.96.0.10:53 via 10.244.1.10:5353"
        );
        f.zone = 3;
        assert!(f.to_string().ends_with(" zone 3"));
    }
}
