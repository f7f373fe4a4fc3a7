//! The sockets the userspace proxy listens on: which ones a snapshot needs ([`desired`],
//! pure), and the running set that opens and closes them without disturbing the others
//! ([`ListenerSet`]), each with its accept loop and per-connection tasks.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::balancer::{Path, PortBalancer, PortPlan};
use super::copy::{CopyEnd, dial, proxy};
use super::stats::PortCounters;
use crate::dataplane::iptables::NodePortAddresses;
use crate::model::{IpFamily, Protocol, ServicePortName, Snapshot};

/// A listening socket's identity: protocol and bound address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenKey {
    /// Transport protocol.
    pub protocol: Protocol,
    /// Bound address (unspecified for NodePorts on every address).
    pub addr: SocketAddr,
}

impl std::fmt::Display for ListenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.protocol)
    }
}

/// What a listener serves.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerSpec {
    /// The service port.
    pub port: ServicePortName,
    /// The family of its endpoints.
    pub family: IpFamily,
    /// Which endpoint list its connections use.
    pub path: Path,
    /// A load-balancer IP listener: `loadBalancerSourceRanges` apply.
    pub load_balancer: bool,
}

/// The listeners `snap` needs: one per service port on each of its IPs (ClusterIP for the
/// internal path; externalIPs and load-balancer IPs for the external path), and one per
/// NodePort on the node-port addresses (the unspecified address when every local address
/// accepts NodePorts). Ports whose path has nothing to serve get no listener, so the kernel
/// refuses their connections at once. TCP and UDP are proxied, SCTP is not. UDP NodePorts
/// are bound per node address (`udp_node_addresses`) even when every address accepts
/// NodePorts, so replies leave from the address the client sent to. The second value lists
/// addresses claimed by two service ports (the first in name order wins).
pub fn desired(
    snap: &Snapshot,
    plans: &HashMap<(ServicePortName, IpFamily), PortPlan>,
    families: &[IpFamily],
    node_ports: &NodePortAddresses,
    udp_node_addresses: &[IpAddr],
) -> (
    BTreeMap<ListenKey, ListenerSpec>,
    Vec<(ListenKey, ServicePortName)>,
) {
    let mut out: BTreeMap<ListenKey, ListenerSpec> = BTreeMap::new();
    let mut conflicts = Vec::new();
    for (name, state) in &snap.ports {
        let port = &state.port;
        if port.name.protocol == Protocol::Sctp {
            continue;
        }
        for &family in families {
            let Some(plan) = plans.get(&(name.clone(), family)) else {
                continue;
            };
            let lb_ips: Vec<IpAddr> = port.load_balancer_ips_for(family).collect();
            let mut add = |ip: IpAddr, number: u16, path: Path| {
                let key = ListenKey {
                    protocol: port.name.protocol,
                    addr: SocketAddr::new(ip, number),
                };
                let spec = ListenerSpec {
                    port: name.clone(),
                    family,
                    path,
                    load_balancer: path == Path::External && lb_ips.contains(&ip),
                };
                match out.get(&key) {
                    Some(existing) if existing.port != spec.port => {
                        conflicts.push((key, name.clone()));
                    }
                    Some(_) => {}
                    None => {
                        out.insert(key, spec);
                    }
                }
            };
            if plan.serves(Path::Internal)
                && let Some(ip) = port.cluster_ip_for(family)
            {
                add(ip, port.port, Path::Internal);
            }
            if plan.serves(Path::External) {
                for ip in port
                    .external_ips_for(family)
                    .chain(port.load_balancer_ips_for(family))
                {
                    add(ip, port.port, Path::External);
                }
                if let Some(np) = port.node_port {
                    match node_ports {
                        NodePortAddresses::All if port.name.protocol == Protocol::Udp => {
                            for ip in udp_node_addresses.iter().filter(|ip| family.contains(ip)) {
                                add(*ip, np, Path::External);
                            }
                        }
                        NodePortAddresses::All => add(unspecified(family), np, Path::External),
                        NodePortAddresses::Ips(ips) => {
                            for ip in ips.iter().filter(|ip| family.contains(ip)) {
                                add(*ip, np, Path::External);
                            }
                        }
                    }
                }
            }
        }
    }
    (out, conflicts)
}

fn unspecified(family: IpFamily) -> IpAddr {
    match family {
        IpFamily::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpFamily::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

/// Which clients count as "from this node or its pods" (ETP Local short-circuit): the
/// node's own addresses, loopback, and the pod CIDRs of `--detect-local-mode`. Updated on
/// every sync, read on every external connection.
#[derive(Debug, Default)]
pub struct LocalClients {
    inner: RwLock<(Vec<IpNet>, Vec<IpAddr>)>,
}

impl LocalClients {
    /// Replaces the pod CIDRs and node addresses.
    pub fn update(&self, cidrs: Vec<IpNet>, addresses: Vec<IpAddr>) {
        *self.inner.write().unwrap_or_else(|p| p.into_inner()) = (cidrs, addresses);
    }

    /// Whether `ip` is this node or one of its pods.
    pub fn contains(&self, ip: IpAddr) -> bool {
        if ip.is_loopback() {
            return true;
        }
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        g.1.contains(&ip) || g.0.iter().any(|n| n.contains(&ip))
    }
}

/// Everything a connection of one service port in one family needs; shared by the port's
/// listeners and connections, updated in place by syncs.
#[derive(Debug)]
pub struct PortEntry {
    /// Endpoint choice.
    pub balancer: Mutex<PortBalancer>,
    /// The port's counters.
    pub counters: Arc<PortCounters>,
    /// Cancelled when the service port is deleted: its open connections are closed.
    pub connections: CancellationToken,
    /// Bumped after every endpoint update, so UDP sessions recheck their endpoint.
    pub generation: std::sync::atomic::AtomicU64,
}

/// Per-connection settings shared by every listener.
#[derive(Clone, Debug)]
pub struct ConnSettings {
    /// Close a connection when nothing moved in either direction for this long.
    pub idle_timeout: Duration,
    /// Who counts as a local client.
    pub local: Arc<LocalClients>,
}

struct Running {
    spec: ListenerSpec,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// The open listeners; see the module docs.
#[derive(Default)]
pub struct ListenerSet {
    running: BTreeMap<ListenKey, Running>,
}

/// What one [`ListenerSet::reconcile`] did.
#[derive(Debug, Default)]
pub struct ListenerChanges {
    /// Listeners opened.
    pub opened: usize,
    /// Listeners closed.
    pub closed: usize,
    /// Listeners that could not be opened (retried on the next sync).
    pub failed: Vec<(ListenKey, std::io::Error)>,
}

impl ListenerSet {
    /// The keys of the open listeners.
    pub fn keys(&self) -> impl Iterator<Item = &ListenKey> {
        self.running.keys()
    }

    /// Whether every listener's accept loop is still running.
    pub fn all_running(&self) -> bool {
        self.running.values().all(|r| !r.task.is_finished())
    }

    /// Opens and closes listeners so exactly `desired` are open; listeners whose key and
    /// spec are unchanged are not touched (their accept queues and connections carry on).
    /// Closed listeners are gone (port free) when this returns. Must not be called from a
    /// runtime thread: it blocks on `runtime` while closing.
    pub fn reconcile(
        &mut self,
        runtime: &tokio::runtime::Handle,
        desired: &BTreeMap<ListenKey, ListenerSpec>,
        entries: &HashMap<(ServicePortName, IpFamily), Arc<PortEntry>>,
        settings: &ConnSettings,
    ) -> ListenerChanges {
        let mut changes = ListenerChanges::default();
        let stale: Vec<ListenKey> = self
            .running
            .iter()
            .filter(|(k, r)| desired.get(k) != Some(&r.spec) || r.task.is_finished())
            .map(|(k, _)| *k)
            .collect();
        let mut closing = Vec::new();
        for key in stale {
            if let Some(r) = self.running.remove(&key) {
                r.stop.cancel();
                closing.push(r.task);
                changes.closed += 1;
                tracing::debug!(listener = %key, service = %r.spec.port, "closing listener");
            }
        }
        if !closing.is_empty() {
            runtime.block_on(async {
                for t in closing {
                    let _ = t.await;
                }
            });
        }
        for (key, spec) in desired {
            if self.running.contains_key(key) {
                continue;
            }
            let Some(entry) = entries.get(&(spec.port.clone(), spec.family)) else {
                continue;
            };
            let stop = CancellationToken::new();
            let opened = match key.protocol {
                Protocol::Udp => super::udp::open_udp(runtime, key.addr).map(|socket| {
                    runtime.spawn(super::udp::serve(
                        socket,
                        spec.clone(),
                        entry.clone(),
                        settings.clone(),
                        stop.clone(),
                    ))
                }),
                _ => open_tcp(runtime, key.addr).map(|listener| {
                    runtime.spawn(accept_loop(
                        listener,
                        spec.clone(),
                        entry.clone(),
                        settings.clone(),
                        stop.clone(),
                    ))
                }),
            };
            match opened {
                Ok(task) => {
                    tracing::debug!(listener = %key, service = %spec.port, "opened listener");
                    self.running.insert(
                        *key,
                        Running {
                            spec: spec.clone(),
                            stop,
                            task,
                        },
                    );
                    changes.opened += 1;
                }
                Err(e) => {
                    tracing::warn!(listener = %key, service = %spec.port, error = %e, "cannot open listener");
                    changes.failed.push((*key, e));
                }
            }
        }
        changes
    }

    /// Closes every listener (and waits until their sockets are closed).
    pub fn close_all(&mut self, runtime: &tokio::runtime::Handle) {
        let all = std::mem::take(&mut self.running);
        for r in all.values() {
            r.stop.cancel();
        }
        runtime.block_on(async {
            for (_, r) in all {
                let _ = r.task.await;
            }
        });
    }
}

/// A listening TCP socket on `addr`: SO_REUSEADDR (restarts while old connections linger
/// in TIME_WAIT), IP_FREEBIND (binding does not race with the address being added), v6-only
/// for IPv6 (so `[::]:port` and `0.0.0.0:port` coexist); see [`bound_socket`].
fn open_tcp(runtime: &tokio::runtime::Handle, addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = bound_socket(addr, socket2::Type::STREAM)?;
    socket.listen(4096)?;
    let _guard = runtime.enter();
    TcpListener::from_std(socket.into())
}

async fn accept_loop(
    listener: TcpListener,
    spec: ListenerSpec,
    entry: Arc<PortEntry>,
    settings: ConnSettings,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tokio::spawn(serve(stream, peer, spec.clone(), entry.clone(), settings.clone()));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// Closes `stream` with a reset, as the kernel does for a port nobody listens on.
fn refuse(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

async fn serve(
    mut client: TcpStream,
    peer: SocketAddr,
    spec: ListenerSpec,
    entry: Arc<PortEntry>,
    settings: ConnSettings,
) {
    let _active = entry.counters.connection();
    let path = spec.path;
    let local = path == Path::External && settings.local.contains(peer.ip());
    let candidates = {
        let mut balancer = entry.balancer.lock().unwrap_or_else(|p| p.into_inner());
        if spec.load_balancer && !balancer.plan().admits_on_load_balancer(peer.ip()) {
            tracing::debug!(client = %peer, service = %spec.port, "client outside loadBalancerSourceRanges");
            Vec::new()
        } else {
            balancer.candidates(peer.ip(), path, local, Instant::now())
        }
    };
    if candidates.is_empty() {
        refuse(client);
        return;
    }
    let mut upstream = None;
    for (attempt, endpoint) in candidates.iter().enumerate() {
        let dialed = tokio::select! {
            d = dial(*endpoint, attempt) => d,
            () = entry.connections.cancelled() => return,
        };
        let mut balancer = entry.balancer.lock().unwrap_or_else(|p| p.into_inner());
        match dialed {
            Ok(s) => {
                balancer.connected(peer.ip(), *endpoint, Instant::now());
                upstream = Some(s);
                break;
            }
            Err(e) => {
                entry.counters.connect_error();
                balancer.failed(peer.ip(), *endpoint, Instant::now());
                tracing::debug!(client = %peer, error = %e, "endpoint connect failed; trying the next");
            }
        }
    }
    let Some(mut upstream) = upstream else {
        tracing::info!(client = %peer, tried = candidates.len(), "no endpoint accepted the connection");
        refuse(client);
        return;
    };
    let _ = client.set_nodelay(true);
    let end = proxy(
        &mut client,
        &mut upstream,
        settings.idle_timeout,
        &entry.connections,
    )
    .await;
    if end == CopyEnd::Idle {
        tracing::debug!(client = %peer, "closed idle connection");
    }
}

/// A non-blocking socket of type `ty` bound to `addr` with the options every listener needs:
/// SO_REUSEADDR, IP_FREEBIND, and v6-only for IPv6.
pub(super) fn bound_socket(
    addr: SocketAddr,
    ty: socket2::Type,
) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Socket};
    let socket = Socket::new(Domain::for_address(addr), ty, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
        socket.set_freebind_v6(true)?;
    } else {
        socket.set_freebind_v4(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, NodeInfo, ServiceName, ServicePort, ServicePortState};

    fn sp(name: &str) -> ServicePortName {
        ServicePortName {
            service: ServiceName::new("ns", name),
            port: "http".into(),
            protocol: Protocol::Tcp,
        }
    }

    fn state(port: ServicePort) -> ServicePortState {
        ServicePortState {
            port: Arc::new(port),
            endpoints: Arc::from(Vec::<Endpoint>::new()),
        }
    }

    fn snap(ports: Vec<ServicePort>) -> Snapshot {
        Snapshot {
            ports: ports
                .into_iter()
                .map(|p| (p.name.clone(), state(p)))
                .collect(),
            node: NodeInfo::default(),
        }
    }

    fn serving() -> PortPlan {
        PortPlan {
            internal: vec!["10.0.0.1:80".parse().unwrap()],
            external: vec!["10.0.0.1:80".parse().unwrap()],
            ..PortPlan::default()
        }
    }

    #[test]
    fn one_listener_per_ip_and_node_port() {
        let web = ServicePort {
            node_port: Some(30080),
            external_ips: vec!["198.51.100.1".parse().unwrap()],
            load_balancer_ips: vec![
                "203.0.113.1".parse().unwrap(),
                "2001:db8::1".parse().unwrap(),
            ],
            cluster_ips: vec!["10.96.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
            ..ServicePort::cluster_ip(sp("web"), "10.96.0.1".parse().unwrap(), 80)
        };
        let empty = ServicePort::cluster_ip(sp("empty"), "10.96.0.2".parse().unwrap(), 80);
        let udp = ServicePort {
            node_port: Some(30053),
            ..ServicePort::cluster_ip(
                ServicePortName {
                    protocol: Protocol::Udp,
                    ..sp("dns")
                },
                "10.96.0.3".parse().unwrap(),
                53,
            )
        };
        let s = snap(vec![web, empty, udp.clone()]);
        let mut plans = HashMap::new();
        for f in [IpFamily::V4, IpFamily::V6] {
            plans.insert((sp("web"), f), serving());
            plans.insert((sp("empty"), f), PortPlan::default());
            plans.insert((udp.name.clone(), f), serving());
        }
        let (all, conflicts) = desired(
            &s,
            &plans,
            &[IpFamily::V4, IpFamily::V6],
            &NodePortAddresses::All,
            &["192.168.0.10".parse().unwrap()],
        );
        assert!(conflicts.is_empty());
        let keys: Vec<String> = all.keys().map(|k| k.to_string()).collect();
        assert_eq!(
            keys,
            vec![
                "0.0.0.0:30080/tcp",
                "10.96.0.1:80/tcp",
                "198.51.100.1:80/tcp",
                "203.0.113.1:80/tcp",
                "[::]:30080/tcp",
                "[2001:db8::1]:80/tcp",
                "[fd00::1]:80/tcp",
                // UDP NodePorts: per node address, so replies leave from it.
                "10.96.0.3:53/udp",
                "192.168.0.10:30053/udp",
            ]
        );
        assert_eq!(
            all[&ListenKey {
                protocol: Protocol::Tcp,
                addr: "10.96.0.1:80".parse().unwrap()
            }]
                .path,
            Path::Internal
        );
        assert_eq!(
            all[&ListenKey {
                protocol: Protocol::Tcp,
                addr: "0.0.0.0:30080".parse().unwrap()
            }]
                .path,
            Path::External
        );

        // --nodeport-addresses: only the selected node addresses, per family; v4 only here.
        let (some, _) = desired(
            &s,
            &plans,
            &[IpFamily::V4],
            &NodePortAddresses::Ips(vec![
                "192.168.0.10".parse().unwrap(),
                "fd00:1::10".parse().unwrap(),
            ]),
            &[],
        );
        let keys: Vec<String> = some.keys().map(|k| k.to_string()).collect();
        assert_eq!(
            keys,
            vec![
                "10.96.0.1:80/tcp",
                "192.168.0.10:30080/tcp",
                "198.51.100.1:80/tcp",
                "203.0.113.1:80/tcp",
                "10.96.0.3:53/udp",
                "192.168.0.10:30053/udp",
            ]
        );
    }

    #[test]
    fn a_path_without_endpoints_has_no_listener() {
        let lb = ServicePort {
            node_port: Some(30081),
            load_balancer_ips: vec!["203.0.113.2".parse().unwrap()],
            ..ServicePort::cluster_ip(sp("lb"), "10.96.0.5".parse().unwrap(), 80)
        };
        let s = snap(vec![lb]);
        let mut plans = HashMap::new();
        // ETP Local without a local endpoint and no short-circuit: internal only.
        plans.insert(
            (sp("lb"), IpFamily::V4),
            PortPlan {
                internal: vec!["10.0.2.1:80".parse().unwrap()],
                ..PortPlan::default()
            },
        );
        let (all, _) = desired(&s, &plans, &[IpFamily::V4], &NodePortAddresses::All, &[]);
        let keys: Vec<String> = all.keys().map(|k| k.addr.to_string()).collect();
        assert_eq!(keys, vec!["10.96.0.5:80"]);
    }

    #[test]
    fn address_claimed_twice_goes_to_the_first_port() {
        let a = ServicePort {
            external_ips: vec!["10.96.0.7".parse().unwrap()],
            ..ServicePort::cluster_ip(sp("a"), "10.96.0.6".parse().unwrap(), 80)
        };
        let b = ServicePort::cluster_ip(sp("b"), "10.96.0.7".parse().unwrap(), 80);
        let s = snap(vec![a, b]);
        let mut plans = HashMap::new();
        plans.insert((sp("a"), IpFamily::V4), serving());
        plans.insert((sp("b"), IpFamily::V4), serving());
        let (all, conflicts) = desired(&s, &plans, &[IpFamily::V4], &NodePortAddresses::All, &[]);
        assert_eq!(all.len(), 2);
        assert_eq!(conflicts.len(), 1);
        assert_eq!(conflicts[0].1, sp("b"));
    }

    #[test]
    fn local_clients() {
        let l = LocalClients::default();
        l.update(
            vec!["10.244.0.0/16".parse().unwrap()],
            vec!["192.168.0.10".parse().unwrap()],
        );
        assert!(l.contains("10.244.1.5".parse().unwrap()));
        assert!(l.contains("192.168.0.10".parse().unwrap()));
        assert!(l.contains("127.0.0.1".parse().unwrap()));
        assert!(!l.contains("192.168.0.2".parse().unwrap()));
    }
}
