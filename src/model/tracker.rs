//! The change tracker: the state the dataplane last synced, the updates received since, and
//! the [`Snapshot`] + [`Changes`] a sync works from.
//!
//! Every object is tracked as `{applied, pending}`. An update that brings an object back to
//! what was last applied cancels the pending entry, so a flapping object costs no sync and the
//! pending counters (metrics, health) only count real changes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use super::convert::SliceInfo;
use super::types::{
    Endpoint, NodeInfo, ServiceName, ServicePort, ServicePortName, ServicePortState,
};

/// Every proxied service port with its endpoints, plus this node: the input of a sync.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Service ports in a stable order (by `ns/name:port`, then protocol).
    pub ports: BTreeMap<ServicePortName, ServicePortState>,
    /// This node.
    pub node: NodeInfo,
}

impl Snapshot {
    /// Total number of endpoints over all ports (upstream's large-cluster switch uses it).
    pub fn endpoint_count(&self) -> usize {
        self.ports.values().map(|s| s.endpoints.len()).sum()
    }

    /// The ports of one service.
    pub fn ports_of<'a>(
        &'a self,
        service: &'a ServiceName,
    ) -> impl Iterator<Item = (&'a ServicePortName, &'a ServicePortState)> + 'a {
        self.ports
            .range(ServicePortName::first_of(service)..)
            .take_while(move |(k, _)| &k.service == service)
    }
}

/// What changed since the previous drain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Services whose ports or endpoints changed (added, updated or deleted).
    pub services: BTreeSet<ServiceName>,
    /// Node facts that every service's rules depend on changed: the next sync must be full.
    pub node_changed: bool,
    /// When the EndpointSlice changes in this batch were triggered (their
    /// `endpoints.kubernetes.io/last-change-trigger-time`), for the network-programming
    /// latency metric.
    pub trigger_times: Vec<SystemTime>,
}

impl Changes {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && !self.node_changed
    }
}

/// Tracks services, EndpointSlices and the node; see the module docs.
#[derive(Debug, Default)]
pub struct ChangeTracker {
    services: HashMap<ServiceName, Vec<ServicePort>>,
    pending_services: HashMap<ServiceName, Option<Vec<ServicePort>>>,
    slices: HashMap<ServiceName, BTreeMap<String, SliceInfo>>,
    pending_slices: HashMap<ServiceName, BTreeMap<String, Option<SliceInfo>>>,
    node: NodeInfo,
    pending_node: Option<NodeInfo>,
    snapshot: Arc<Snapshot>,
    trigger_times: Vec<SystemTime>,
    service_changes_total: u64,
    endpoint_changes_total: u64,
}

impl ChangeTracker {
    /// An empty tracker for `node`.
    pub fn new(node: NodeInfo) -> Self {
        Self {
            snapshot: Arc::new(Snapshot {
                ports: BTreeMap::new(),
                node: node.clone(),
            }),
            node,
            ..Self::default()
        }
    }

    /// Records a Service's ports (`None` when it was deleted or is no longer proxied).
    /// Returns whether the pending state changed.
    pub fn update_service(&mut self, name: ServiceName, ports: Option<Vec<ServicePort>>) -> bool {
        let ports = ports.filter(|p| !p.is_empty());
        let applied = self.services.get(&name);
        if applied == ports.as_ref() {
            return self.pending_services.remove(&name).is_some();
        }
        match self.pending_services.get(&name) {
            Some(p) if *p == ports => false,
            _ => {
                self.pending_services.insert(name, ports);
                self.service_changes_total += 1;
                true
            }
        }
    }

    /// Records an EndpointSlice (`info`), or its deletion (`None`).
    /// Returns whether the pending state changed.
    pub fn update_slice(
        &mut self,
        service: ServiceName,
        slice_name: String,
        info: Option<SliceInfo>,
    ) -> bool {
        let applied = self.slices.get(&service).and_then(|s| s.get(&slice_name));
        let pending = self.pending_slices.entry(service.clone()).or_default();
        let changed = if applied == info.as_ref() {
            pending.remove(&slice_name).is_some()
        } else if pending.get(&slice_name) == Some(&info) {
            false
        } else {
            pending.insert(slice_name, info);
            self.endpoint_changes_total += 1;
            true
        };
        if pending.is_empty() {
            self.pending_slices.remove(&service);
        }
        changed
    }

    /// Records the node's current facts. Returns whether the pending state changed.
    pub fn update_node(&mut self, node: NodeInfo) -> bool {
        if node == self.node {
            return self.pending_node.take().is_some();
        }
        if self.pending_node.as_ref() == Some(&node) {
            return false;
        }
        self.pending_node = Some(node);
        true
    }

    /// Number of services with a pending change (`kubeproxy_sync_proxy_rules_service_changes_pending`).
    pub fn pending_service_changes(&self) -> usize {
        self.pending_services.len()
    }

    /// Number of services with pending endpoint changes (`..._endpoint_changes_pending`).
    pub fn pending_endpoint_changes(&self) -> usize {
        self.pending_slices.len()
    }

    /// Service and EndpointSlice changes accepted since start-up (no-op updates are not
    /// counted): `..._service_changes_total` and `..._endpoint_changes_total`.
    pub fn changes_total(&self) -> (u64, u64) {
        (self.service_changes_total, self.endpoint_changes_total)
    }

    /// Remembers when a pending EndpointSlice change was triggered in the cluster; handed to
    /// the sync that applies it (see [`Changes::trigger_times`]).
    pub fn record_trigger_time(&mut self, at: SystemTime) {
        self.trigger_times.push(at);
    }

    /// The node including a pending, not yet synced update (health reports a node being
    /// deleted at once, before any sync).
    pub fn latest_node(&self) -> &NodeInfo {
        self.pending_node.as_ref().unwrap_or(&self.node)
    }

    /// Whether anything is waiting to be synced.
    pub fn has_pending(&self) -> bool {
        !self.pending_services.is_empty()
            || !self.pending_slices.is_empty()
            || self.pending_node.is_some()
    }

    /// The node as of the last drain.
    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    /// Applies every pending update and returns the new snapshot and what changed.
    ///
    /// The snapshot is shared copy-on-write: drop the previous one before draining again to
    /// avoid a copy of the whole map.
    pub fn drain(&mut self) -> (Arc<Snapshot>, Changes) {
        let mut changes = Changes {
            trigger_times: std::mem::take(&mut self.trigger_times),
            ..Changes::default()
        };
        let snapshot = Arc::make_mut(&mut self.snapshot);
        if let Some(node) = self.pending_node.take() {
            changes.node_changed = true;
            self.node = node.clone();
            snapshot.node = node;
        }
        for (name, ports) in self.pending_services.drain() {
            match ports {
                Some(p) => self.services.insert(name.clone(), p),
                None => self.services.remove(&name),
            };
            changes.services.insert(name);
        }
        for (service, slices) in self.pending_slices.drain() {
            let applied = self.slices.entry(service.clone()).or_default();
            for (slice_name, info) in slices {
                match info {
                    Some(i) => applied.insert(slice_name, i),
                    None => applied.remove(&slice_name),
                };
            }
            if applied.is_empty() {
                self.slices.remove(&service);
            }
            changes.services.insert(service);
        }
        for service in &changes.services {
            rebuild_service(
                snapshot,
                service,
                self.services.get(service),
                self.slices.get(service),
            );
        }
        (Arc::clone(&self.snapshot), changes)
    }
}

/// Replaces the snapshot entries of one service from its ports and slices.
fn rebuild_service(
    snapshot: &mut Snapshot,
    service: &ServiceName,
    ports: Option<&Vec<ServicePort>>,
    slices: Option<&BTreeMap<String, SliceInfo>>,
) {
    let old: Vec<ServicePortName> = snapshot.ports_of(service).map(|(k, _)| k.clone()).collect();
    for k in old {
        snapshot.ports.remove(&k);
    }
    let Some(ports) = ports else { return };
    let mut merged = merge_slices(slices);
    for port in ports {
        let endpoints = merged.remove(&port.name).unwrap_or_default();
        let state = ServicePortState {
            port: Arc::new(port.clone()),
            endpoints: endpoints.into(),
        };
        snapshot.ports.insert(port.name.clone(), state);
    }
}

/// Merges a service's slices into endpoints per service port: deduplicated by `ip:port`
/// (a ready copy wins over a not-ready one) and sorted by `ip:port` text as upstream does.
///
/// A service has a handful of ports, so ports are found by a linear scan rather than by
/// hashing three strings per endpoint.
pub fn merge_slices(
    slices: Option<&BTreeMap<String, SliceInfo>>,
) -> HashMap<ServicePortName, Vec<Endpoint>> {
    let mut by_port: Vec<(ServicePortName, Vec<(String, Endpoint)>)> = Vec::new();
    for slice in slices.into_iter().flat_map(|s| s.values()) {
        for p in &slice.ports {
            let idx = match by_port
                .iter()
                .position(|(k, _)| k.port == p.name && k.protocol == p.protocol)
            {
                Some(i) => i,
                None => {
                    let spn = ServicePortName {
                        service: slice.service.clone(),
                        port: p.name.clone(),
                        protocol: p.protocol,
                    };
                    by_port.push((spn, Vec::with_capacity(slice.endpoints.len())));
                    by_port.len() - 1
                }
            };
            let eps = &mut by_port[idx].1;
            for e in &slice.endpoints {
                let mut e = e.clone();
                e.port = p.port;
                eps.push((e.addr_string(), e));
            }
        }
    }
    by_port
        .into_iter()
        .map(|(k, mut eps)| {
            // Stable sort keeps slice order among duplicates; ready copies sort first.
            eps.sort_by(|(a, ea), (b, eb)| a.cmp(b).then(eb.ready.cmp(&ea.ready)));
            eps.dedup_by(|(a, _), (b, _)| a == b);
            (k, eps.into_iter().map(|(_, e)| e).collect())
        })
        .collect()
}
