//! Prometheus metrics under upstream kube-proxy's names, types, labels and buckets, so
//! dashboards and alerts written for kube-proxy keep working after the swap.
//!
//! [`Metrics`] is a plain struct registered into a registry the caller passes in (no globals),
//! so tests can build as many independent sets as they like. Values are recorded by
//! [`MetricsObserver`] after every sync and refreshed from the change tracker at scrape time
//! ([`Metrics::refresh`]), so nothing on the hot path of a source takes another lock.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets, linear_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::dataplane::userspace::stats::UserspaceStats;
use crate::model::{ChangeTracker, Snapshot};
use crate::sync::{SyncObserver, SyncReport, SyncTrigger};

/// A gauge holding a float (timestamps, seconds).
type FloatGauge = Gauge<f64, AtomicU64>;

/// `code` label of the health counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// HTTP status code returned.
    pub code: String,
}

/// `traffic_policy` label of the no-local-endpoints gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficPolicyLabel {
    /// `internal` or `external`.
    pub traffic_policy: String,
}

/// `table` label of the rule-count gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    /// Netfilter table name.
    pub table: String,
}

/// Every kube-proxy metric svcproxy exports; see the module docs.
#[derive(Debug)]
pub struct Metrics {
    /// `kubeproxy_sync_proxy_rules_duration_seconds`: every sync.
    pub sync_duration: Histogram,
    /// `kubeproxy_sync_full_proxy_rules_duration_seconds`.
    pub sync_full_duration: Histogram,
    /// `kubeproxy_sync_partial_proxy_rules_duration_seconds`.
    pub sync_partial_duration: Histogram,
    /// `kubeproxy_sync_proxy_rules_last_timestamp_seconds`: end of the last successful sync.
    pub last_sync_timestamp: FloatGauge,
    /// `kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds`: last time a change was queued.
    pub last_queued_timestamp: FloatGauge,
    /// `kubeproxy_network_programming_duration_seconds`: from the EndpointSlice trigger time
    /// to the rules being in the kernel.
    pub network_programming_duration: Histogram,
    /// `kubeproxy_sync_proxy_rules_endpoint_changes_pending`.
    pub endpoint_changes_pending: Gauge,
    /// `kubeproxy_sync_proxy_rules_endpoint_changes_total`.
    pub endpoint_changes_total: Counter,
    /// `kubeproxy_sync_proxy_rules_service_changes_pending`.
    pub service_changes_pending: Gauge,
    /// `kubeproxy_sync_proxy_rules_service_changes_total`.
    pub service_changes_total: Counter,
    /// `kubeproxy_sync_proxy_rules_iptables_restore_failures_total`.
    pub iptables_restore_failures: Counter,
    /// `kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total`.
    pub iptables_partial_restore_failures: Counter,
    /// `kubeproxy_sync_proxy_rules_iptables_total{table}`: rules svcproxy keeps per table.
    pub iptables_rules: Family<TableLabel, Gauge>,
    /// `kubeproxy_sync_proxy_rules_nftables_sync_failures_total`.
    pub nftables_sync_failures: Counter,
    /// `kubeproxy_sync_proxy_rules_userspace_sync_failures_total` (svcproxy's own mode).
    pub userspace_sync_failures: Counter,
    /// `kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy}` (a gauge, as
    /// upstream).
    pub no_local_endpoints: Family<TrafficPolicyLabel, Gauge>,
    /// `kubeproxy_proxy_healthz_total{code}`.
    pub healthz: Family<CodeLabel, Counter>,
    /// `kubeproxy_proxy_livez_total{code}`.
    pub livez: Family<CodeLabel, Counter>,
    /// `kubeproxy_conntrack_reconciler_sync_duration_seconds`.
    pub conntrack_cleanup_duration: Histogram,
    /// `kubeproxy_conntrack_reconciler_deleted_entries_total`.
    pub conntrack_deleted_entries: Counter,
    /// `kubeproxy_sync_proxy_rules_state_drift_total` (svcproxy's own): kernel state found to
    /// differ from what svcproxy last wrote (flushed or edited behind its back).
    pub state_drift: Counter,
}

/// Upstream's sync-duration buckets: `ExponentialBuckets(0.001, 2, 15)`.
fn sync_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Upstream's network-programming buckets: 0.25 s steps to 0.5 s, 1 s steps to 59 s, 5 s
/// steps to 115 s, 30 s steps to 300 s.
fn programming_buckets() -> Histogram {
    let buckets = linear_buckets(0.25, 0.25, 2)
        .chain(linear_buckets(1.0, 1.0, 59))
        .chain(linear_buckets(60.0, 5.0, 12))
        .chain(linear_buckets(120.0, 30.0, 7));
    Histogram::new(buckets)
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

impl Metrics {
    /// Creates the metrics and registers them (with the `kubeproxy` prefix) into `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics {
            sync_duration: sync_buckets(),
            sync_full_duration: sync_buckets(),
            sync_partial_duration: sync_buckets(),
            last_sync_timestamp: FloatGauge::default(),
            last_queued_timestamp: FloatGauge::default(),
            network_programming_duration: programming_buckets(),
            endpoint_changes_pending: Gauge::default(),
            endpoint_changes_total: Counter::default(),
            service_changes_pending: Gauge::default(),
            service_changes_total: Counter::default(),
            iptables_restore_failures: Counter::default(),
            iptables_partial_restore_failures: Counter::default(),
            iptables_rules: Family::default(),
            nftables_sync_failures: Counter::default(),
            userspace_sync_failures: Counter::default(),
            no_local_endpoints: Family::default(),
            healthz: Family::default(),
            livez: Family::default(),
            conntrack_cleanup_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            conntrack_deleted_entries: Counter::default(),
            state_drift: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("kubeproxy");
        r.register_with_unit(
            "sync_proxy_rules_duration",
            "SyncProxyRules latency in seconds",
            Unit::Seconds,
            m.sync_duration.clone(),
        );
        r.register_with_unit(
            "sync_full_proxy_rules_duration",
            "SyncProxyRules latency in seconds for full resyncs",
            Unit::Seconds,
            m.sync_full_duration.clone(),
        );
        r.register_with_unit(
            "sync_partial_proxy_rules_duration",
            "SyncProxyRules latency in seconds for partial resyncs",
            Unit::Seconds,
            m.sync_partial_duration.clone(),
        );
        r.register_with_unit(
            "sync_proxy_rules_last_timestamp",
            "The last time proxy rules were successfully synced",
            Unit::Seconds,
            m.last_sync_timestamp.clone(),
        );
        r.register_with_unit(
            "sync_proxy_rules_last_queued_timestamp",
            "The last time a sync of proxy rules was queued",
            Unit::Seconds,
            m.last_queued_timestamp.clone(),
        );
        r.register_with_unit(
            "network_programming_duration",
            "In Cluster Network Programming Latency in seconds",
            Unit::Seconds,
            m.network_programming_duration.clone(),
        );
        r.register(
            "sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            m.endpoint_changes_pending.clone(),
        );
        r.register(
            "sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            m.endpoint_changes_total.clone(),
        );
        r.register(
            "sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            m.service_changes_pending.clone(),
        );
        r.register(
            "sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            m.service_changes_total.clone(),
        );
        r.register(
            "sync_proxy_rules_iptables_restore_failures",
            "Cumulative proxy iptables restore failures",
            m.iptables_restore_failures.clone(),
        );
        r.register(
            "sync_proxy_rules_iptables_partial_restore_failures",
            "Cumulative proxy iptables partial restore failures",
            m.iptables_partial_restore_failures.clone(),
        );
        r.register(
            "sync_proxy_rules_iptables_total",
            "Total number of iptables rules owned by kube-proxy",
            m.iptables_rules.clone(),
        );
        r.register(
            "sync_proxy_rules_nftables_sync_failures",
            "Cumulative proxy nftables sync failures",
            m.nftables_sync_failures.clone(),
        );
        r.register(
            "sync_proxy_rules_userspace_sync_failures",
            "Cumulative userspace proxy reconcile failures",
            m.userspace_sync_failures.clone(),
        );
        r.register(
            "sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            m.no_local_endpoints.clone(),
        );
        r.register(
            "proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            m.healthz.clone(),
        );
        r.register(
            "proxy_livez",
            "Cumulative proxy livez HTTP status",
            m.livez.clone(),
        );
        r.register_with_unit(
            "conntrack_reconciler_sync_duration",
            "Duration of one stale-conntrack cleanup pass in seconds",
            Unit::Seconds,
            m.conntrack_cleanup_duration.clone(),
        );
        r.register(
            "conntrack_reconciler_deleted_entries",
            "Cumulative conntrack flows deleted by the reconciler",
            m.conntrack_deleted_entries.clone(),
        );
        r.register(
            "sync_proxy_rules_state_drift",
            "Times the kernel rules were found changed behind svcproxy's back",
            m.state_drift.clone(),
        );
        m
    }

    /// Copies the change tracker's pending and cumulative change counts and the trigger's
    /// last queued change into the metrics; called before each scrape.
    pub fn refresh(&self, tracker: &ChangeTracker, trigger: &SyncTrigger) {
        if let Some(at) = trigger.last_kick() {
            let at = SystemTime::now() - at.elapsed();
            self.last_queued_timestamp.set(unix_seconds(at));
        }
        self.service_changes_pending
            .set(tracker.pending_service_changes() as i64);
        self.endpoint_changes_pending
            .set(tracker.pending_endpoint_changes() as i64);
        let (services, endpoints) = tracker.changes_total();
        catch_up(&self.service_changes_total, services);
        catch_up(&self.endpoint_changes_total, endpoints);
    }
}

/// Moves a counter up to `total` (counters only ever increase).
fn catch_up(counter: &Counter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

/// `process_*` metrics of this process, read from `/proc/self` at scrape time (upstream's
/// Go client exports the same names).
#[derive(Debug, Default)]
pub struct ProcessCollector;

/// What the process collector reads; `None` where `/proc` does not say.
#[derive(Debug, Default, PartialEq)]
pub struct ProcessStats {
    /// User + system CPU time.
    pub cpu_seconds: f64,
    /// Resident set size.
    pub resident_bytes: u64,
    /// Virtual memory size.
    pub virtual_bytes: u64,
    /// Open file descriptors.
    pub open_fds: u64,
    /// Soft limit on file descriptors.
    pub max_fds: Option<u64>,
    /// Start time since the epoch.
    pub start_time_seconds: f64,
}

impl ProcessStats {
    /// Reads this process's statistics from `/proc`.
    pub fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name, which is in parentheses and may contain spaces.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
        // `rest` starts at field 3 (state): utime is field 14, stime 15, starttime 22,
        // vsize 23, rss 24 (in pages).
        let ticks = 100.0; // USER_HZ is 100 on every Linux architecture svcproxy runs on
        let page = 4096u64;
        let boot_time = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<u64>().ok())?;
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|l| {
                l.lines()
                    .find(|l| l.starts_with("Max open files"))?
                    .split_whitespace()
                    .nth(3)?
                    .parse()
                    .ok()
            });
        Some(Self {
            cpu_seconds: (num(11)? + num(12)?) as f64 / ticks,
            start_time_seconds: boot_time as f64 + num(19)? as f64 / ticks,
            virtual_bytes: num(20)?,
            resident_bytes: num(21)? * page,
            open_fds: std::fs::read_dir("/proc/self/fd").ok()?.count() as u64,
            max_fds,
        })
    }
}

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::MetricType;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let Some(p) = ProcessStats::read() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(p.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            MetricType::Counter,
        )?)?;
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                p.resident_bytes as f64,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                p.virtual_bytes as f64,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                p.open_fds as f64,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                p.start_time_seconds,
            ),
        ];
        for (name, help, value) in gauges.into_iter().chain(p.max_fds.map(|m| {
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                m as f64,
            )
        })) {
            ConstGauge::new(value).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Gauge,
            )?)?;
        }
        Ok(())
    }
}

/// The userspace proxy's per-service-port counters, read at scrape time:
/// `kubeproxy_userspace_active_connections`, `..._connections_accepted_total` and
/// `..._connect_errors_total`, labelled `namespace`, `service`, `port`, `protocol`.
#[derive(Debug)]
pub struct UserspaceCollector(pub std::sync::Arc<UserspaceStats>);

impl prometheus_client::collector::Collector for UserspaceCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::MetricType;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let ports = self.0.snapshot();
        if ports.is_empty() {
            return Ok(());
        }
        let labels = |p: &crate::dataplane::userspace::stats::PortStatsSnapshot| {
            [
                ("namespace", p.name.service.namespace.clone()),
                ("service", p.name.service.name.clone()),
                ("port", p.name.port.clone()),
                ("protocol", p.name.protocol.as_str().to_string()),
            ]
        };
        let mut family = encoder.encode_descriptor(
            "kubeproxy_userspace_active_connections",
            "Client connections the userspace proxy is serving, per service port",
            None,
            MetricType::Gauge,
        )?;
        for p in &ports {
            ConstGauge::new(p.active as i64).encode(family.encode_family(&labels(p))?)?;
        }
        let mut family = encoder.encode_descriptor(
            "kubeproxy_userspace_connections_accepted",
            "Client connections the userspace proxy accepted, per service port",
            None,
            MetricType::Counter,
        )?;
        for p in &ports {
            ConstCounter::new(p.accepted).encode(family.encode_family(&labels(p))?)?;
        }
        let mut family = encoder.encode_descriptor(
            "kubeproxy_userspace_connect_errors",
            "Endpoint connection attempts that failed or timed out, per service port",
            None,
            MetricType::Counter,
        )?;
        for p in &ports {
            ConstCounter::new(p.connect_errors).encode(family.encode_family(&labels(p))?)?;
        }
        Ok(())
    }
}

/// The handler of the metrics server: `/metrics` (OpenMetrics text, refreshed from the
/// tracker first), `/healthz` (`ok`, as upstream's metrics server) and `/proxyMode`.
pub fn handler(
    registry: std::sync::Arc<Registry>,
    metrics: std::sync::Arc<Metrics>,
    tracker: std::sync::Arc<std::sync::Mutex<ChangeTracker>>,
    trigger: SyncTrigger,
    mode: &'static str,
) -> crate::http::Handler {
    use hyper::StatusCode;
    std::sync::Arc::new(move |req| match req.uri().path() {
        "/metrics" => {
            metrics.refresh(&tracker.lock().unwrap_or_else(|p| p.into_inner()), &trigger);
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, &registry) {
                Ok(()) => crate::http::respond(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Err(_) => crate::http::respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "cannot encode metrics\n",
                ),
            }
        }
        "/healthz" => crate::http::respond(StatusCode::OK, "text/plain", "ok"),
        "/proxyMode" => crate::http::respond(StatusCode::OK, "text/plain", mode),
        _ => crate::http::not_found(),
    })
}

/// Records every sync into [`Metrics`].
pub struct MetricsObserver {
    metrics: std::sync::Arc<Metrics>,
    mode: &'static str,
}

impl MetricsObserver {
    /// An observer for a backend of `mode` (`iptables`, `nftables`, `userspace`): the mode
    /// decides which failure counter a failed sync moves.
    pub fn new(metrics: std::sync::Arc<Metrics>, mode: &'static str) -> Self {
        Self { metrics, mode }
    }
}

impl SyncObserver for MetricsObserver {
    fn synced(&mut self, report: &SyncReport, _snapshot: &Snapshot) {
        let m = &self.metrics;
        if report.drift_detected {
            m.state_drift.inc();
        }
        if let Ok(stats) = &report.result {
            m.state_drift.inc_by(stats.drift as u64);
        }
        let secs = report.duration.as_secs_f64();
        m.sync_duration.observe(secs);
        match &report.result {
            Ok(stats) => {
                if stats.full {
                    m.sync_full_duration.observe(secs);
                } else {
                    m.sync_partial_duration.observe(secs);
                }
                if stats.partial_fell_back {
                    m.iptables_partial_restore_failures.inc();
                }
                let now = SystemTime::now();
                m.last_sync_timestamp.set(unix_seconds(now));
                m.no_local_endpoints
                    .get_or_create(&TrafficPolicyLabel {
                        traffic_policy: "internal".into(),
                    })
                    .set(stats.no_local_internal as i64);
                m.no_local_endpoints
                    .get_or_create(&TrafficPolicyLabel {
                        traffic_policy: "external".into(),
                    })
                    .set(stats.no_local_external as i64);
                for (table, n) in &stats.rule_counts {
                    m.iptables_rules
                        .get_or_create(&TableLabel {
                            table: (*table).to_string(),
                        })
                        .set(*n as i64);
                }
                for t in &report.changes.trigger_times {
                    let latency = now.duration_since(*t).unwrap_or(Duration::ZERO);
                    m.network_programming_duration
                        .observe(latency.as_secs_f64());
                }
            }
            Err(_) => {
                let counter = match self.mode {
                    "iptables" => &m.iptables_restore_failures,
                    "nftables" => &m.nftables_sync_failures,
                    _ => &m.userspace_sync_failures,
                };
                counter.inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn upstream_names_and_buckets() {
        let mut registry = Registry::default();
        let m = Metrics::register(&mut registry);
        m.sync_duration.observe(0.003);
        m.no_local_endpoints
            .get_or_create(&TrafficPolicyLabel {
                traffic_policy: "internal".into(),
            })
            .set(1);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(text.contains("# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram"));
        assert!(
            text.contains("kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"} 1")
        );
        assert!(
            text.contains("kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"16.384\"} 1")
        );
        assert!(text.contains("kubeproxy_sync_proxy_rules_endpoint_changes_total 0"));
        assert!(text.contains("# TYPE kubeproxy_sync_proxy_rules_no_local_endpoints_total gauge"));
        assert!(
            text.contains("kubeproxy_network_programming_duration_seconds_bucket{le=\"300.0\"} 0")
        );
    }
}
