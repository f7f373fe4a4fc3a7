//! `--proxy-mode userspace`: the proxy serves services itself, for nodes where NAT rule
//! programming is not available or not wanted.
//!
//! A sync makes the service IPs (ClusterIPs, externalIPs, load-balancer IPs) local to the
//! node ([`addresses`]: /32 and /128 addresses on a dummy interface, or on `lo` where the
//! kernel has no dummy links, marked so cleanup finds exactly them), updates each service
//! port's endpoint lists in place ([`balancer`]: what [`crate::model::select`] decided,
//! round-robin, ClientIP affinity, retry order), and opens or closes listeners
//! ([`listeners`]: one per service port and IP, NodePorts on the node-port addresses). Each
//! accepted connection is dialled to an endpoint with retries and copied with `splice(2)`
//! ([`copy`]). Counters per service port are in [`stats`].
//!
//! Connection lifetime: an established connection is never moved or closed because its
//! service's endpoints changed, even when its own endpoint was removed (like a TCP conntrack
//! entry in the NAT modes, it ends when either side closes it or it is idle for the idle
//! timeout). When the service port itself is deleted, its listeners close and its open
//! connections are closed at once.
//!
//! UDP service ports are proxied with one session per client address ([`udp`]); SCTP ports
//! get their addresses but no listener. Endpoints see the node as the client (no source-IP
//! preservation, as with any userspace proxy).
//!
//! The [`crate::dataplane::Backend`] methods run on the sync thread; the listeners and
//! connections run on a multi-threaded tokio runtime owned by the backend.

pub mod addresses;
pub mod balancer;
pub mod copy;
pub mod listeners;
pub mod stats;
pub mod udp;

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio_util::sync::CancellationToken;

use self::addresses::{AddressEdge, NetlinkAddresses};
use self::balancer::{PortBalancer, PortPlan, plan_from};
use self::listeners::{ConnSettings, ListenerSet, LocalClients, PortEntry};
use self::stats::UserspaceStats;
use crate::config::ProxyFlags;
use crate::dataplane::iptables::{LocalDetector, NodePortAddresses};
use crate::dataplane::{Backend, BackendError, SyncStats};
use crate::model::{Changes, IpFamily, NodeInfo, PathPlan, ServicePortName, Snapshot, select};

/// A failure of the userspace proxy's kernel edge.
#[derive(Debug, thiserror::Error)]
pub enum UserspaceError {
    /// A netlink request failed.
    #[error("netlink {op} failed: {detail}")]
    Netlink {
        /// What was attempted.
        op: &'static str,
        /// The address or link and the kernel's answer.
        detail: String,
    },
    /// The netlink socket could not be opened.
    #[error("cannot open a netlink socket: {0}")]
    Socket(std::io::Error),
    /// The proxy's runtime could not be started.
    #[error("cannot start the proxy runtime: {0}")]
    Runtime(std::io::Error),
}

/// Node facts the userspace proxy needs on each sync.
#[derive(Clone, Debug, Default)]
pub struct NodeSettings {
    /// `--nodeport-addresses`, resolved against this node.
    pub node_ports: NodePortAddresses,
    /// Pod CIDRs whose clients count as local (ETP Local short-circuit).
    pub local_cidrs: Vec<IpNet>,
    /// This host's addresses (clients from them are local).
    pub local_addresses: Vec<IpAddr>,
}

/// Computes [`NodeSettings`] for the node of each sync.
pub type NodeSettingsFn = Box<dyn Fn(&NodeInfo) -> NodeSettings + Send>;

/// Settings of the userspace backend.
pub struct UserspaceOptions {
    /// Families served.
    pub families: Vec<IpFamily>,
    /// Close a TCP connection when nothing moved in either direction for this long.
    pub idle_timeout: Duration,
    /// Node facts per sync.
    pub node_settings: NodeSettingsFn,
    /// Worker threads of the proxy runtime.
    pub worker_threads: usize,
    /// Where the per-service-port counters go; keep a clone to export them (the backend
    /// itself moves into the sync runner).
    pub stats: Arc<UserspaceStats>,
}

impl UserspaceOptions {
    /// Options from the proxy flags: `--nodeport-addresses` resolved against this host's
    /// addresses on every sync, and the pod CIDRs of `--detect-local-mode` (ClusterCIDR or
    /// NodeCIDR; the interface-based modes cannot be told from a client address, so with
    /// them only the node's own addresses count as local clients).
    pub fn from_flags(flags: &ProxyFlags, families: &[IpFamily]) -> Self {
        let flags = flags.clone();
        UserspaceOptions {
            families: families.to_vec(),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            node_settings: Box::new(move |node| {
                let local = crate::daemon::local_addresses();
                let local_cidrs = match flags.local_detector(node) {
                    Ok(LocalDetector::Cidrs(c)) => c,
                    _ => Vec::new(),
                };
                NodeSettings {
                    node_ports: flags.node_port_addresses(node, &local),
                    local_cidrs,
                    local_addresses: local,
                }
            }),
            worker_threads: std::thread::available_parallelism().map_or(2, |n| n.get().min(4)),
            stats: UserspaceStats::new(),
        }
    }
}

/// Default idle timeout of proxied TCP connections: one hour (long enough for idle
/// keep-alive pools, short enough that abandoned half-open connections do not pile up).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// The userspace proxy backend; see the module docs.
pub struct UserspaceBackend {
    runtime: tokio::runtime::Runtime,
    addresses: Box<dyn AddressEdge>,
    listeners: ListenerSet,
    entries: HashMap<(ServicePortName, IpFamily), Arc<PortEntry>>,
    desired_addresses: BTreeSet<IpAddr>,
    /// Listeners the last sync could not open (retried through the canary).
    listen_failures: usize,
    stats: Arc<UserspaceStats>,
    settings: ConnSettings,
    opts: UserspaceOptions,
}

fn runtime(workers: usize) -> Result<tokio::runtime::Runtime, UserspaceError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .thread_name("userspace-proxy")
        .enable_all()
        .build()
        .map_err(UserspaceError::Runtime)
}

impl UserspaceBackend {
    /// The real backend: sets the ARP sysctls that keep service addresses from being
    /// announced on other links (`arp_ignore=1`, `arp_announce=2`, in this network namespace
    /// only) and opens the netlink address edge (dummy interface, else `lo`).
    pub fn new(opts: UserspaceOptions) -> Result<Self, BackendError> {
        crate::daemon::set_sysctl("net/ipv4/conf/all/arp_ignore", "1")?;
        crate::daemon::set_sysctl("net/ipv4/conf/all/arp_announce", "2")?;
        raise_open_files_limit();
        let rt = runtime(opts.worker_threads)?;
        let edge = NetlinkAddresses::open(rt.handle().clone(), true)?;
        Ok(Self::with_parts(opts, rt, Box::new(edge)))
    }

    /// A backend with another address edge (tests: [`addresses::FakeAddresses`]).
    pub fn with_edge(
        opts: UserspaceOptions,
        edge: Box<dyn AddressEdge>,
    ) -> Result<Self, BackendError> {
        let rt = runtime(opts.worker_threads)?;
        Ok(Self::with_parts(opts, rt, edge))
    }

    fn with_parts(
        opts: UserspaceOptions,
        runtime: tokio::runtime::Runtime,
        addresses: Box<dyn AddressEdge>,
    ) -> Self {
        Self {
            runtime,
            addresses,
            listeners: ListenerSet::default(),
            entries: HashMap::new(),
            desired_addresses: BTreeSet::new(),
            listen_failures: 0,
            stats: opts.stats.clone(),
            settings: ConnSettings {
                idle_timeout: opts.idle_timeout,
                local: Arc::new(LocalClients::default()),
            },
            opts,
        }
    }

    /// The per-service-port connection counters, for the metrics exporter.
    pub fn stats(&self) -> Arc<UserspaceStats> {
        self.stats.clone()
    }

    /// The addresses of the open listeners (tests, debugging).
    pub fn listening(&self) -> Vec<SocketAddr> {
        self.listeners.keys().map(|k| k.addr).collect()
    }

    fn desired_addresses(&self, snap: &Snapshot) -> BTreeSet<IpAddr> {
        let mut out = BTreeSet::new();
        for state in snap.ports.values() {
            let p = &state.port;
            for &family in &self.opts.families {
                out.extend(p.cluster_ip_for(family));
                out.extend(p.external_ips_for(family));
                out.extend(p.load_balancer_ips_for(family));
            }
        }
        out
    }
}

impl Backend for UserspaceBackend {
    fn sync(
        &mut self,
        snap: &Snapshot,
        _changes: &Changes,
        full: bool,
    ) -> Result<SyncStats, BackendError> {
        let started = Instant::now();
        let mut stats = SyncStats {
            // Listeners and endpoint lists are always reconciled against the whole snapshot
            // (cheap, in memory); only the address listing is skipped on partial syncs.
            full,
            ..SyncStats::default()
        };
        let node = (self.opts.node_settings)(&snap.node);
        self.settings
            .local
            .update(node.local_cidrs, node.local_addresses.clone());
        let node_done = Instant::now();

        // 1. Addresses first, so new listeners bind to local addresses. A full sync compares
        // with the kernel's listing (repairs removals behind our back); a partial one applies
        // the difference from the previous sync.
        let desired_addresses = self.desired_addresses(snap);
        let address_result = if full {
            addresses::reconcile(self.addresses.as_mut(), &desired_addresses)
        } else {
            addresses::apply(
                self.addresses.as_mut(),
                &self.desired_addresses,
                &desired_addresses,
            )
        };
        self.desired_addresses = desired_addresses;
        let addresses_done = Instant::now();
        if let Ok(c) = &address_result {
            stats.objects_written += c.added;
            stats.objects_deleted += c.removed;
        }

        // The node's own addresses (not svcproxy's, not IPv6 link-local ones, which would
        // need a scope): where UDP NodePorts are bound when every address accepts them.
        let udp_node_addresses: Vec<IpAddr> = node
            .local_addresses
            .iter()
            .copied()
            .filter(|ip| !self.desired_addresses.contains(ip))
            .filter(|ip| !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local()))
            .collect();

        // 2. Endpoint lists, updated in place.
        let now = Instant::now();
        let mut plans: HashMap<(ServicePortName, IpFamily), PortPlan> = HashMap::new();
        for (name, state) in &snap.ports {
            for &family in &self.opts.families {
                let sel = select(&state.port, &state.endpoints, family, &snap.node);
                if sel.internal == PathPlan::Drop {
                    stats.no_local_internal += 1;
                }
                if sel.external == PathPlan::Drop && state.port.externally_accessible(family) {
                    stats.no_local_external += 1;
                }
                plans.insert(
                    (name.clone(), family),
                    plan_from(&state.port, &sel, family, &snap.node),
                );
            }
        }
        let gone: Vec<(ServicePortName, IpFamily)> = self
            .entries
            .keys()
            .filter(|k| !plans.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(e) = self.entries.remove(&key) {
                tracing::debug!(service = %key.0, family = ?key.1, "service port deleted; closing its connections");
                e.connections.cancel();
            }
        }
        for (key, p) in &plans {
            match self.entries.get(key) {
                Some(e) => {
                    e.balancer
                        .lock()
                        .unwrap_or_else(|x| x.into_inner())
                        .update(p.clone(), now);
                    e.generation
                        .fetch_add(1, std::sync::atomic::Ordering::Release);
                }
                None => {
                    self.entries.insert(
                        key.clone(),
                        Arc::new(PortEntry {
                            balancer: Mutex::new(PortBalancer::new(p.clone())),
                            counters: self.stats.port(&key.0),
                            connections: CancellationToken::new(),
                            generation: Default::default(),
                        }),
                    );
                }
            }
        }
        self.stats.retain(|n| snap.ports.contains_key(n));
        let plans_done = Instant::now();

        // 3. Listeners.
        let (desired, conflicts) = listeners::desired(
            snap,
            &plans,
            &self.opts.families,
            &node.node_ports,
            &udp_node_addresses,
        );
        for (key, port) in conflicts {
            tracing::warn!(listener = %key, service = %port, "address already served by another service port");
        }
        let changes = self.listeners.reconcile(
            self.runtime.handle(),
            &desired,
            &self.entries,
            &self.settings,
        );
        stats.objects_written += changes.opened;
        stats.objects_deleted += changes.closed;
        // Kernel work: address changes, and opening/closing sockets.
        stats.kernel_time = addresses_done.duration_since(node_done) + plans_done.elapsed();
        let ms = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64() * 1e3;
        tracing::debug!(
            full,
            opened = changes.opened,
            closed = changes.closed,
            node_ms = ms(started, node_done),
            addresses_ms = ms(node_done, addresses_done),
            plans_ms = ms(addresses_done, plans_done),
            listeners_ms = ms(plans_done, Instant::now()),
            "userspace sync"
        );

        address_result?;
        // A listener that cannot be opened (say, a NodePort some host process already holds)
        // does not fail the sync, as a port conflict does not in the NAT modes: the others
        // serve, each failure was logged, and the canary check retries it (full sync).
        self.listen_failures = changes.failed.len();
        Ok(stats)
    }

    fn rules_intact(&mut self) -> bool {
        let addresses_there = match self.addresses.list() {
            Ok(present) if self.desired_addresses.is_subset(&present) => true,
            Ok(present) => {
                // A service IP that was already on the node (the admin's, unmarked) is not in
                // svcproxy's list but still local: only a really missing address counts.
                let local = crate::daemon::local_addresses();
                self.desired_addresses
                    .difference(&present)
                    .all(|ip| local.contains(ip))
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list service addresses");
                false
            }
        };
        if !addresses_there {
            tracing::warn!("service addresses were removed behind svcproxy's back; resyncing");
        }
        if self.listen_failures > 0 {
            tracing::info!(
                failed = self.listen_failures,
                "retrying listeners that could not be opened"
            );
        }
        addresses_there && self.listeners.all_running() && self.listen_failures == 0
    }

    fn cleanup(&mut self) -> Result<(), BackendError> {
        self.listeners.close_all(self.runtime.handle());
        for e in self.entries.values() {
            e.connections.cancel();
        }
        self.entries.clear();
        addresses::reconcile(self.addresses.as_mut(), &BTreeSet::new())?;
        self.desired_addresses.clear();
        Ok(())
    }

    fn name(&self) -> &'static str {
        "userspace"
    }
}

/// Every listener, proxied connection (two sockets, two pipes for splice) and UDP session
/// holds descriptors; systemd's default soft limit of 1024 would cap a node at a few hundred
/// connections, so the soft limit is raised to the hard one.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "raised the open files limit"),
            Err(e) => tracing::warn!(error = %e, soft, "cannot raise the open files limit"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open files limit"),
    }
}

/// `--cleanup` for the userspace mode: removes every address svcproxy marked (on any
/// interface) and its dummy interface, then checks none is left. Listeners need no cleanup:
/// they die with the proxy process.
pub fn remove_addresses() -> Result<usize, BackendError> {
    // A worker thread drives the netlink connection while this thread blocks on requests.
    let rt = runtime(1)?;
    let mut edge = NetlinkAddresses::open(rt.handle().clone(), false)?;
    let removed = edge.remove_all()?;
    if edge.delete_dummy()? {
        tracing::info!(
            interface = addresses::DUMMY_INTERFACE,
            "deleted the service address interface"
        );
    }
    let left = edge.list()?;
    if !left.is_empty() {
        return Err(BackendError::Leftovers(format!(
            "service addresses {}",
            left.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(removed)
}
