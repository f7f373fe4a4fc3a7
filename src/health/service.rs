//! Health-check node ports of `externalTrafficPolicy: Local` load balancers.
//!
//! Cloud load balancers probe `spec.healthCheckNodePort` on every node and send traffic only
//! to nodes answering 200, i.e. nodes with a local ready endpoint. After each sync the
//! servers are reconciled with the snapshot: a port is opened when a service gains one,
//! closed when it loses it, and otherwise only its endpoint count changes (no socket churn).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hyper::{StatusCode, header};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use super::ProxyHealth;
use crate::http::{self, Handler};
use crate::model::{ServiceName, Snapshot};
use crate::sync::{SyncObserver, SyncReport};

/// What a health-check port reports, per service: the local ready endpoints.
pub fn desired_ports(snapshot: &Snapshot) -> BTreeMap<u16, (ServiceName, usize)> {
    let mut local: HashMap<&ServiceName, BTreeSet<IpAddr>> = HashMap::new();
    let mut ports: BTreeMap<u16, (ServiceName, usize)> = BTreeMap::new();
    for (name, state) in &snapshot.ports {
        let ips = local.entry(&name.service).or_default();
        ips.extend(
            state
                .endpoints
                .iter()
                .filter(|e| e.ready && e.is_on_node(&snapshot.node.name))
                .map(|e| e.ip),
        );
        if let Some(hc) = state.port.health_check_node_port {
            ports.insert(hc, (name.service.clone(), 0));
        }
    }
    for (service, count) in ports.values_mut() {
        *count = local.get(service).map_or(0, BTreeSet::len);
    }
    ports
}

struct Server {
    service: ServiceName,
    endpoints: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

/// The open health-check servers; reconciled after every successful sync.
pub struct ServiceHealthServers {
    runtime: Handle,
    health: Arc<ProxyHealth>,
    ipv6: bool,
    servers: BTreeMap<u16, Server>,
    /// Ports that could not be opened (reported once, retried every sync).
    failed: Arc<Mutex<BTreeSet<u16>>>,
}

impl ServiceHealthServers {
    /// Servers spawned on `runtime`; `ipv6` listens dual-stack on `[::]` instead of
    /// `0.0.0.0`.
    pub fn new(runtime: Handle, health: Arc<ProxyHealth>, ipv6: bool) -> Self {
        Self {
            runtime,
            health,
            ipv6,
            servers: BTreeMap::new(),
            failed: Arc::default(),
        }
    }

    /// The ports currently served, with their service.
    pub fn open_ports(&self) -> Vec<(u16, ServiceName)> {
        self.servers
            .iter()
            .map(|(p, s)| (*p, s.service.clone()))
            .collect()
    }

    /// Opens, updates and closes servers so they match `snapshot`.
    pub fn reconcile(&mut self, snapshot: &Snapshot) {
        let desired = desired_ports(snapshot);
        self.servers.retain(|port, server| {
            let keep = desired
                .get(port)
                .is_some_and(|(svc, _)| *svc == server.service);
            if !keep {
                tracing::info!(port, service = %server.service, "closing health check node port");
                server.task.abort();
            }
            keep
        });
        for (port, (service, count)) in desired {
            if let Some(s) = self.servers.get(&port) {
                s.endpoints.store(count, Ordering::Relaxed);
                continue;
            }
            let endpoints = Arc::new(AtomicUsize::new(count));
            let ip = if self.ipv6 {
                IpAddr::V6(Ipv6Addr::UNSPECIFIED)
            } else {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            };
            let handler = service_handler(service.clone(), endpoints.clone(), self.health.clone());
            let what = format!("the health check node port of {service}");
            let _guard = self.runtime.enter();
            match http::spawn_server(&what, SocketAddr::new(ip, port), handler) {
                Ok((task, _)) => {
                    tracing::info!(port, %service, "opened health check node port");
                    self.failed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&port);
                    self.servers.insert(
                        port,
                        Server {
                            service,
                            endpoints,
                            task,
                        },
                    );
                }
                Err(e) => {
                    let first = self
                        .failed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(port);
                    if first {
                        tracing::error!(error = %e, "health check node port not served; retried after each sync");
                    }
                }
            }
        }
    }
}

impl Drop for ServiceHealthServers {
    fn drop(&mut self) {
        for s in self.servers.values() {
            s.task.abort();
        }
    }
}

impl SyncObserver for ServiceHealthServers {
    fn synced(&mut self, report: &SyncReport, snapshot: &Snapshot) {
        if report.result.is_ok() {
            self.reconcile(snapshot);
        }
    }
}

/// Upstream's health-check body and codes: 200 with local endpoints while the proxy is
/// healthy, 503 otherwise, `X-Load-Balancing-Endpoint-Weight` set to the endpoint count.
fn service_handler(
    service: ServiceName,
    endpoints: Arc<AtomicUsize>,
    health: Arc<ProxyHealth>,
) -> Handler {
    Arc::new(move |_req| {
        let count = endpoints.load(Ordering::Relaxed);
        let proxy_healthy = health.status().healthy;
        let code = if count > 0 && proxy_healthy {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let body = serde_json::json!({
            "service": {"namespace": service.namespace, "name": service.name},
            "localEndpoints": count,
            "serviceProxyHealthy": proxy_healthy,
        });
        let mut resp = http::respond(code, "application/json", body.to_string());
        if let Ok(v) = header::HeaderValue::from_str(&count.to_string()) {
            resp.headers_mut()
                .insert("X-Load-Balancing-Endpoint-Weight", v);
        }
        resp
    })
}
