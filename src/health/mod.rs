//! Health of the proxy, served like upstream kube-proxy's: `/healthz` and `/livez` on
//! `--healthz-bind-address`, and one health-check node port per `externalTrafficPolicy:
//! Local` load balancer service ([`service`]).
//!
//! The proxy is unhealthy when an update has been queued for longer than the health timeout
//! (twice `--sync-period`, as upstream) without a successful sync: the source saw a change
//! but the kernel did not get it. `/healthz` additionally fails while this node is being
//! deleted (deletion timestamp or the cluster autoscaler's taint), so load balancers drain it
//! first; `/livez` ignores that, so the kubelet does not restart a proxy that works.

pub mod service;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use hyper::StatusCode;

use crate::http::{self, Handler};
use crate::metrics::{CodeLabel, Metrics};
use crate::model::{ChangeTracker, Snapshot};
use crate::sync::{SyncObserver, SyncReport, SyncTrigger};

#[derive(Debug, Default)]
struct State {
    last_updated: Option<SystemTime>,
    /// When the oldest change carried by a failed sync was queued; cleared by a success.
    failing_since: Option<Instant>,
}

/// The proxy's health, shared by the servers and the sync observer.
#[derive(Debug)]
pub struct ProxyHealth {
    timeout: Duration,
    trigger: SyncTrigger,
    tracker: Arc<Mutex<ChangeTracker>>,
    state: Mutex<State>,
}

/// One reading of [`ProxyHealth`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthStatus {
    /// No queued update has waited longer than the timeout.
    pub healthy: bool,
    /// This node may receive new traffic (not being deleted).
    pub node_eligible: bool,
    /// End of the last successful sync.
    pub last_updated: Option<SystemTime>,
    /// When this reading was taken.
    pub current_time: SystemTime,
}

impl ProxyHealth {
    /// Health of the runner driven by `trigger`, with the node facts of `tracker`, unhealthy
    /// once an update waits longer than `timeout`.
    pub fn new(
        timeout: Duration,
        trigger: SyncTrigger,
        tracker: Arc<Mutex<ChangeTracker>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            timeout,
            trigger,
            tracker,
            state: Mutex::new(State::default()),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current reading.
    pub fn status(&self) -> HealthStatus {
        let now = Instant::now();
        let state = self.state();
        let oldest = [self.trigger.pending_since(), state.failing_since]
            .into_iter()
            .flatten()
            .min();
        let healthy = oldest.is_none_or(|t| now.saturating_duration_since(t) <= self.timeout);
        let node_eligible = !self
            .tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .latest_node()
            .deleting;
        HealthStatus {
            healthy,
            node_eligible,
            last_updated: state.last_updated,
            current_time: SystemTime::now(),
        }
    }
}

impl SyncObserver for Arc<ProxyHealth> {
    fn synced(&mut self, report: &SyncReport, _snapshot: &Snapshot) {
        let mut state = self.state();
        if report.result.is_ok() {
            state.last_updated = Some(SystemTime::now());
            state.failing_since = None;
        } else {
            let since = report.queued_since.unwrap_or(report.started);
            state.failing_since.get_or_insert(since);
        }
    }
}

/// A time as Go's `time.Time.String()` prints it (upstream's JSON bodies use that form);
/// `None` is Go's zero time.
pub fn go_time(t: Option<SystemTime>) -> String {
    let Some(t) = t else {
        return "0001-01-01 00:00:00 +0000 UTC".to_string();
    };
    match jiff::Timestamp::try_from(t) {
        Ok(ts) => ts.strftime("%Y-%m-%d %H:%M:%S%.f +0000 UTC").to_string(),
        Err(_) => "0001-01-01 00:00:00 +0000 UTC".to_string(),
    }
}

/// The handler of the healthz server: `/healthz` and `/livez` with upstream's JSON bodies
/// and status codes, counted in `kubeproxy_proxy_healthz_total` / `_livez_total`.
pub fn handler(health: Arc<ProxyHealth>, metrics: Arc<Metrics>) -> Handler {
    Arc::new(move |req| {
        let path = req.uri().path();
        let livez = match path {
            "/healthz" => false,
            "/livez" => true,
            _ => return http::not_found(),
        };
        let st = health.status();
        let ok = if livez {
            st.healthy
        } else {
            st.healthy && st.node_eligible
        };
        let code = if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let counter = if livez {
            &metrics.livez
        } else {
            &metrics.healthz
        };
        counter
            .get_or_create(&CodeLabel {
                code: code.as_u16().to_string(),
            })
            .inc();
        let last = go_time(st.last_updated);
        let now = go_time(Some(st.current_time));
        let body = if livez {
            format!(r#"{{"lastUpdated": "{last}","currentTime": "{now}"}}"#)
        } else {
            format!(
                r#"{{"lastUpdated": "{last}","currentTime": "{now}", "nodeEligible": {}}}"#,
                st.node_eligible
            )
        };
        http::respond(code, "application/json", body)
    })
}
