//! Metrics, health and health-check node ports over real HTTP on loopback: metrics parsed
//! with a Prometheus text parser, `/healthz` and `/livez` in each state (healthy, stale
//! update, node being deleted), and the per-service health-check JSON as services change.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::builders::{endpoint, service, slice};
use prometheus_client::registry::Registry;
use svcproxy::dataplane::SyncStats;
use svcproxy::health::service::ServiceHealthServers;
use svcproxy::health::{self, ProxyHealth};
use svcproxy::http::spawn_server;
use svcproxy::metrics::{self, Metrics, MetricsObserver, ProcessCollector};
use svcproxy::model::{ChangeTracker, Changes, NodeInfo, ServiceName, Snapshot};
use svcproxy::sync::{SyncObserver, SyncReport, SyncTrigger};

/// GET `path` from `addr`: (status, headers, body).
fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("http response");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_string(), body.to_string())
}

fn node_tracker() -> Arc<Mutex<ChangeTracker>> {
    Arc::new(Mutex::new(ChangeTracker::new(NodeInfo {
        name: "node-a".into(),
        ..NodeInfo::default()
    })))
}

fn report(ok: bool, full: bool, changes: Changes) -> SyncReport {
    SyncReport {
        result: if ok {
            Ok(SyncStats {
                full,
                no_local_external: 2,
                ..SyncStats::default()
            })
        } else {
            Err("iptables-restore failed".into())
        },
        full_requested: full,
        changes,
        started: Instant::now(),
        duration: Duration::from_millis(12),
        queued_since: None,
        drift_detected: !ok,
    }
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_upstream_names_and_move_with_syncs() {
    let tracker = node_tracker();
    let trigger = SyncTrigger::new();
    let mut registry = Registry::default();
    let m = Arc::new(Metrics::register(&mut registry));
    registry.register_collector(Box::new(ProcessCollector));
    let handler = metrics::handler(
        Arc::new(registry),
        m.clone(),
        tracker.clone(),
        trigger.clone(),
        "iptables",
    );
    let (_task, addr) = spawn_server("metrics", "127.0.0.1:0".parse().unwrap(), handler).unwrap();

    // A change arrives, then a full and a partial sync, one of them carrying a trigger time
    // 1.5 s old, then a failed sync.
    tracker.lock().unwrap().update_slice(
        ServiceName::new("ns", "web"),
        "web-1".into(),
        Some(slice("web", &["10.0.0.1"])),
    );
    trigger.kick();
    let mut obs = MetricsObserver::new(m.clone(), "iptables");
    let snap = Snapshot::default();
    obs.synced(&report(true, true, Changes::default()), &snap);
    let changes = Changes {
        trigger_times: vec![SystemTime::now() - Duration::from_millis(1500)],
        ..Changes::default()
    };
    obs.synced(&report(true, false, changes), &snap);
    obs.synced(&report(false, false, Changes::default()), &snap);

    let (status, head, body) = get(addr, "/metrics");
    assert_eq!(status, 200);
    assert!(head.contains("openmetrics-text"), "{head}");
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text parses");
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        let s = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in:\n{body}"));
        match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
            other => panic!("{name}: unexpected {other:?}"),
        }
    };
    assert_eq!(
        value("kubeproxy_sync_proxy_rules_duration_seconds_count", &[]),
        3.0
    );
    assert_eq!(
        value(
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
            &[]
        ),
        1.0
    );
    assert_eq!(
        value(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count",
            &[]
        ),
        1.0
    );
    assert_eq!(
        value(
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
            &[]
        ),
        1.0
    );
    assert_eq!(
        value("kubeproxy_network_programming_duration_seconds_count", &[]),
        1.0
    );
    assert!(value("kubeproxy_network_programming_duration_seconds_sum", &[]) >= 1.5);
    assert_eq!(
        value("kubeproxy_sync_proxy_rules_endpoint_changes_total", &[]),
        1.0
    );
    assert_eq!(
        value("kubeproxy_sync_proxy_rules_endpoint_changes_pending", &[]),
        1.0
    );
    assert_eq!(
        value("kubeproxy_sync_proxy_rules_service_changes_pending", &[]),
        0.0
    );
    assert_eq!(
        value(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            &[("traffic_policy", "external")]
        ),
        2.0
    );
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let last = value("kubeproxy_sync_proxy_rules_last_timestamp_seconds", &[]);
    assert!(
        (now - last).abs() < 60.0,
        "last sync timestamp {last} vs now {now}"
    );
    let queued = value(
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        &[],
    );
    assert!((now - queued).abs() < 60.0, "last queued {queued}");
    assert!(value("process_resident_memory_bytes", &[]) > 1e6);
    assert!(value("process_open_fds", &[]) > 0.0);
    // Upstream's bucket layout of the sync histogram: 1 ms doubling, 15 buckets.
    assert!(body.contains("kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.001\"}"));
    assert!(body.contains("kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"16.384\"}"));
    assert_eq!(get(addr, "/proxyMode").2, "iptables");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_livez_in_each_state() {
    let tracker = node_tracker();
    let trigger = SyncTrigger::new();
    let mut registry = Registry::default();
    let m = Arc::new(Metrics::register(&mut registry));
    let health = ProxyHealth::new(Duration::from_millis(300), trigger.clone(), tracker.clone());
    let (_task, addr) = spawn_server(
        "healthz",
        "127.0.0.1:0".parse().unwrap(),
        health::handler(health.clone(), m.clone()),
    )
    .unwrap();

    // Healthy: nothing queued; then a successful sync sets lastUpdated.
    let mut obs = health.clone();
    obs.synced(
        &report(true, true, Changes::default()),
        &Snapshot::default(),
    );
    let (status, head, body) = get(addr, "/healthz");
    assert_eq!(status, 200, "{body}");
    assert!(
        head.to_lowercase()
            .contains("content-type: application/json")
    );
    let v = json(&body);
    assert_eq!(v["nodeEligible"], true);
    assert!(v["lastUpdated"].as_str().unwrap().ends_with("+0000 UTC"));
    assert!(!v["lastUpdated"].as_str().unwrap().starts_with("0001"));
    assert_eq!(get(addr, "/livez").0, 200);

    // Stale: a change queued and not synced for longer than the timeout.
    trigger.kick();
    assert_eq!(get(addr, "/healthz").0, 200, "fresh queued change is fine");
    std::thread::sleep(Duration::from_millis(450));
    assert_eq!(
        get(addr, "/healthz").0,
        503,
        "queued change waited too long"
    );
    assert_eq!(get(addr, "/livez").0, 503);

    // Failed syncs keep it unhealthy even though the runner took the change.
    let tracker2 = node_tracker();
    let trigger2 = SyncTrigger::new();
    let h2 = ProxyHealth::new(Duration::from_millis(200), trigger2, tracker2);
    let mut o2 = h2.clone();
    o2.synced(
        &report(false, true, Changes::default()),
        &Snapshot::default(),
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(!h2.status().healthy, "failing syncs past the timeout");
    o2.synced(
        &report(true, true, Changes::default()),
        &Snapshot::default(),
    );
    assert!(h2.status().healthy, "a successful sync heals");

    // Node being deleted: /healthz fails with nodeEligible false, /livez stays up.
    let tracker3 = node_tracker();
    let h3 = ProxyHealth::new(
        Duration::from_secs(60),
        SyncTrigger::new(),
        tracker3.clone(),
    );
    let (_t3, addr3) = spawn_server(
        "healthz",
        "127.0.0.1:0".parse().unwrap(),
        health::handler(h3, m.clone()),
    )
    .unwrap();
    assert_eq!(get(addr3, "/healthz").0, 200);
    svcproxy::source::delete_ref(
        &mut tracker3.lock().unwrap(),
        "node-a",
        &svcproxy::source::ObjectRef::Node("node-a".into()),
    );
    let (status, _, body) = get(addr3, "/healthz");
    assert_eq!(status, 503, "{body}");
    assert_eq!(json(&body)["nodeEligible"], false);
    let (status, _, body) = get(addr3, "/livez");
    assert_eq!(status, 200, "{body}");
    assert!(json(&body).get("nodeEligible").is_none());

    // The health counters moved with the answers.
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("kubeproxy_proxy_healthz_total{code=\"503\"}"),
        "{text}"
    );
    assert!(
        text.contains("kubeproxy_proxy_livez_total{code=\"200\"}"),
        "{text}"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A snapshot with an ETP Local load balancer on `hc` whose endpoints are `eps`.
fn lb_snapshot(hc: Option<u16>, eps: &[(&str, &str)]) -> Snapshot {
    let mut t = ChangeTracker::new(NodeInfo {
        name: "node-a".into(),
        ..NodeInfo::default()
    });
    let mut port = service("lb", "10.96.0.50", 80);
    port.external_policy_local = true;
    port.health_check_node_port = hc;
    t.update_service(ServiceName::new("ns", "lb"), Some(vec![port]));
    let mut info = slice("lb", &[]);
    info.endpoints = eps.iter().map(|(ip, node)| endpoint(ip, node)).collect();
    t.update_slice(ServiceName::new("ns", "lb"), "lb-1".into(), Some(info));
    let (snap, _) = t.drain();
    Arc::try_unwrap(snap).unwrap_or_else(|a| (*a).clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_node_ports_follow_services() {
    let health = ProxyHealth::new(Duration::from_secs(60), SyncTrigger::new(), node_tracker());
    let mut servers =
        ServiceHealthServers::new(tokio::runtime::Handle::current(), health.clone(), false);
    let hc = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{hc}").parse().unwrap();

    let mut obs = servers;
    obs.synced(
        &report(true, true, Changes::default()),
        &lb_snapshot(
            Some(hc),
            &[
                ("10.244.1.11", "node-a"),
                ("10.244.1.12", "node-a"),
                ("10.244.2.10", "node-b"),
            ],
        ),
    );
    let (status, head, body) = get(addr, "/");
    assert_eq!(status, 200, "{body}");
    assert!(
        head.contains("X-Load-Balancing-Endpoint-Weight: 2")
            || head
                .to_lowercase()
                .contains("x-load-balancing-endpoint-weight: 2"),
        "{head}"
    );
    let v = json(&body);
    assert_eq!(v["service"]["namespace"], "ns");
    assert_eq!(v["service"]["name"], "lb");
    assert_eq!(
        v["localEndpoints"], 2,
        "only this node's ready endpoints count"
    );
    assert_eq!(v["serviceProxyHealthy"], true);

    // No local endpoint left: 503 with 0.
    obs.synced(
        &report(true, false, Changes::default()),
        &lb_snapshot(Some(hc), &[("10.244.2.10", "node-b")]),
    );
    let (status, _, body) = get(addr, "/healthz");
    assert_eq!(status, 503);
    assert_eq!(json(&body)["localEndpoints"], 0);

    // The service loses its health check node port: the port closes.
    obs.synced(
        &report(true, false, Changes::default()),
        &lb_snapshot(None, &[("10.244.1.11", "node-a")]),
    );
    let end = Instant::now() + Duration::from_secs(2);
    while TcpStream::connect(addr).is_ok() {
        assert!(Instant::now() < end, "health check port still open");
        std::thread::sleep(Duration::from_millis(20));
    }
    servers = obs;
    assert!(servers.open_ports().is_empty());
}
