//! Per-service-port connection counters of the userspace proxy, for the metrics exporter.
//!
//! The proxy's hot path only touches atomics of one service port (found once per listener,
//! not per connection), and the exporter reads everything with [`UserspaceStats::snapshot`]
//! without stopping the proxy. Nothing here depends on a metrics crate: the exporter maps the
//! snapshot onto whatever registry it uses.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::model::ServicePortName;

/// Live counters of one service port (both families, every listener of the port).
#[derive(Debug, Default)]
pub struct PortCounters {
    /// Client connections currently proxied.
    active: AtomicU64,
    /// Client connections accepted since the port appeared (monotonic).
    accepted: AtomicU64,
    /// Connection attempts to an endpoint that failed or timed out (monotonic; a client
    /// connection that was retried on another endpoint counts each failed attempt).
    connect_errors: AtomicU64,
}

impl PortCounters {
    /// Counts an accepted connection and returns a guard that keeps it counted as active
    /// until dropped (so a panicking or cancelled connection task cannot leak the count).
    pub fn connection(self: &Arc<Self>) -> ActiveGuard {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self.clone())
    }

    /// Counts one failed connection attempt to an endpoint.
    pub fn connect_error(&self) {
        self.connect_errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// Keeps one connection counted as active; see [`PortCounters::connection`].
#[derive(Debug)]
pub struct ActiveGuard(Arc<PortCounters>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One service port's counters at one instant, as [`UserspaceStats::snapshot`] returns them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortStatsSnapshot {
    /// The service port (`ns/name:port` + protocol).
    pub name: ServicePortName,
    /// Client connections currently proxied (a gauge).
    pub active: u64,
    /// Endpoint connection attempts that failed or timed out (a counter).
    pub connect_errors: u64,
    /// Client connections accepted (a counter).
    pub accepted: u64,
}

/// Counters of every proxied service port; shared (`Arc`) between the backend, which adds and
/// removes ports as services change, and the metrics exporter, which only reads.
#[derive(Debug, Default)]
pub struct UserspaceStats {
    ports: RwLock<BTreeMap<ServicePortName, Arc<PortCounters>>>,
}

impl UserspaceStats {
    /// Empty stats.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The counters of `name`, created on first use.
    pub fn port(&self, name: &ServicePortName) -> Arc<PortCounters> {
        if let Some(c) = self
            .ports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            return c.clone();
        }
        self.ports
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.clone())
            .or_default()
            .clone()
    }

    /// Forgets the counters of service ports that are no longer proxied (their series end).
    pub fn retain(&self, keep: impl Fn(&ServicePortName) -> bool) {
        self.ports
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|name, _| keep(name));
    }

    /// Every port's counters, ordered by service port name. Cheap: one read lock and three
    /// relaxed loads per port.
    pub fn snapshot(&self) -> Vec<PortStatsSnapshot> {
        self.ports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(name, c)| PortStatsSnapshot {
                name: name.clone(),
                active: c.active.load(Ordering::Relaxed),
                connect_errors: c.connect_errors.load(Ordering::Relaxed),
                accepted: c.accepted.load(Ordering::Relaxed),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ServiceName};

    fn name(n: &str) -> ServicePortName {
        ServicePortName {
            service: ServiceName::new("ns", n),
            port: "http".into(),
            protocol: Protocol::Tcp,
        }
    }

    #[test]
    fn guards_count_active_connections() {
        let stats = UserspaceStats::new();
        let c = stats.port(&name("a"));
        let g1 = c.connection();
        let g2 = stats.port(&name("a")).connection();
        c.connect_error();
        let snap = stats.snapshot();
        assert_eq!(
            snap,
            vec![PortStatsSnapshot {
                name: name("a"),
                active: 2,
                connect_errors: 1,
                accepted: 2
            }]
        );
        drop(g1);
        drop(g2);
        assert_eq!(stats.snapshot()[0].active, 0);
        assert_eq!(stats.snapshot()[0].accepted, 2);
        stats.retain(|n| n != &name("a"));
        assert!(stats.snapshot().is_empty());
    }
}
