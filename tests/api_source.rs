//! The API-server source against an in-process API server speaking real HTTP list/watch to
//! the real kube client: initial lists, watch add/modify/delete of every kind, 410 Gone and
//! relist, the server going away and coming back, bad objects skipped, the start-up event,
//! and the rules a backend receives.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::mock_api::{self, MockApi};
use serde_json::json;
use svcproxy::dataplane::iptables::RenderConfig;
use svcproxy::dataplane::iptables::backend::IptablesBackend;
use svcproxy::dataplane::iptables::fake::FakeEdge;
use svcproxy::dataplane::{Backend, BackendError, SyncStats};
use svcproxy::model::{ChangeTracker, Changes, IpFamily, NodeInfo, ServiceName, Snapshot};
use svcproxy::source::api;
use svcproxy::sync::{SyncRunner, SyncSettings, SyncTrigger};

const NODE: &str = "node-a";

fn tracker() -> Arc<Mutex<ChangeTracker>> {
    Arc::new(Mutex::new(ChangeTracker::new(NodeInfo {
        name: NODE.into(),
        ..NodeInfo::default()
    })))
}

/// Polls `cond` on the tracker's latest state (pending included) for up to 10 s.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out waiting for {what}");
}

/// Drains the tracker: the snapshot a sync would see and what changed.
fn drain(t: &Arc<Mutex<ChangeTracker>>) -> (Arc<Snapshot>, Changes) {
    t.lock().unwrap().drain()
}

fn endpoints_of(snap: &Snapshot, ns: &str, name: &str) -> Vec<String> {
    let svc = ServiceName::new(ns, name);
    let mut eps: Vec<String> = snap
        .ports_of(&svc)
        .flat_map(|(_, s)| s.endpoints.iter().map(|e| e.addr_string()))
        .collect();
    eps.sort();
    eps
}

fn has_service(snap: &Snapshot, ns: &str, name: &str) -> bool {
    snap.ports_of(&ServiceName::new(ns, name)).next().is_some()
}

fn names(changes: &Changes) -> Vec<String> {
    changes.services.iter().map(|s| s.to_string()).collect()
}

/// Creates `shop/<name>` on `cluster_ip` and its slice `<name>-1` with `ips` on `node`.
fn add_service(api: &MockApi, name: &str, cluster_ip: &str, ips: &[&str], node: &str) {
    api.apply(mock_api::service("shop", name, cluster_ip));
    api.apply(mock_api::slice(
        "shop",
        name,
        &format!("{name}-1"),
        ips,
        node,
    ));
}

/// A mock cluster: this node, another node, two proxied services with endpoints, one
/// handled by another proxy, and one headless service's slice.
fn cluster(api: &MockApi) {
    api.apply(mock_api::node(NODE, "192.168.0.10"));
    api.apply(mock_api::node("node-b", "192.168.0.11"));
    add_service(
        api,
        "web",
        "10.96.0.10",
        &["10.244.1.11", "10.244.1.12"],
        NODE,
    );
    add_service(api, "db", "10.96.0.11", &["10.244.1.13"], "node-b");
    let mut other = mock_api::service("shop", "other-proxy", "10.96.0.12");
    other["metadata"]["labels"] = json!({"service.kubernetes.io/service-proxy-name": "cilium"});
    api.apply(other);
    let mut headless = mock_api::slice("shop", "headless", "headless-1", &["10.244.1.14"], NODE);
    headless["metadata"]["labels"]["service.kubernetes.io/headless"] = json!("");
    api.apply(headless);
}

struct Source {
    tracker: Arc<Mutex<ChangeTracker>>,
    trigger: SyncTrigger,
    _watch: api::ApiWatch,
}

fn start_source(api: &MockApi) -> Source {
    let tracker = tracker();
    let trigger = SyncTrigger::new();
    let watch = api::watch(api.client(), NODE, tracker.clone(), trigger.clone());
    wait_for("the initial lists", || trigger.is_ready());
    Source {
        tracker,
        trigger,
        _watch: watch,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_list_then_watch_events_of_every_kind() {
    let api = MockApi::start().await;
    cluster(&api);
    let src = start_source(&api);

    let (snap, _) = drain(&src.tracker);
    assert_eq!(
        endpoints_of(&snap, "shop", "web"),
        ["10.244.1.11:8080", "10.244.1.12:8080"]
    );
    assert_eq!(endpoints_of(&snap, "shop", "db"), ["10.244.1.13:8080"]);
    assert!(
        !has_service(&snap, "shop", "other-proxy"),
        "service-proxy-name services are left to their proxy"
    );
    assert!(
        endpoints_of(&snap, "shop", "headless").is_empty(),
        "headless slices are not listed"
    );
    assert_eq!(snap.node.zone.as_deref(), Some("zone-a"), "own Node listed");
    assert_eq!(
        snap.node.addresses,
        ["192.168.0.10".parse::<std::net::IpAddr>().unwrap()]
    );
    let reqs = api.requests();
    assert!(
        reqs.iter().any(|r| r.starts_with("GET /api/v1/services?")
            && r.contains("service.kubernetes.io%2Fservice-proxy-name")),
        "the service list carries upstream's label selector: {reqs:?}"
    );
    assert!(
        reqs.iter()
            .any(|r| r.starts_with("GET /api/v1/nodes?") && r.contains("metadata.name%3Dnode-a")),
        "the node watch is narrowed to this node: {reqs:?}"
    );
    drop(snap);

    // Watch: add a service and its slice, modify a slice, delete a service, modify the node.
    add_service(&api, "cart", "10.96.0.20", &["10.244.1.20"], NODE);
    api.apply(mock_api::slice(
        "shop",
        "web",
        "web-1",
        &["10.244.1.12"],
        NODE,
    ));
    api.delete("Service", "shop", "db");
    let mut moved = mock_api::node(NODE, "192.168.0.10");
    moved["metadata"]["labels"]["topology.kubernetes.io/zone"] = json!("zone-b");
    api.apply(moved);
    wait_for("watch events", || {
        let t = src.tracker.lock().unwrap();
        t.pending_service_changes() >= 2 && t.latest_node().zone.as_deref() == Some("zone-b")
    });
    wait_for("the slice update", || {
        src.tracker.lock().unwrap().pending_endpoint_changes() >= 2
    });
    let (snap, changes) = drain(&src.tracker);
    assert_eq!(endpoints_of(&snap, "shop", "cart"), ["10.244.1.20:8080"]);
    assert_eq!(endpoints_of(&snap, "shop", "web"), ["10.244.1.12:8080"]);
    assert!(!has_service(&snap, "shop", "db"), "deleted service gone");
    assert!(changes.node_changed);
    assert_eq!(names(&changes), ["shop/cart", "shop/db", "shop/web"]);
    assert!(
        src.trigger.pending_since().is_some(),
        "changes kicked the runner"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_relists_and_deletes_only_what_disappeared() {
    let api = MockApi::start().await;
    cluster(&api);
    let src = start_source(&api);
    drain(&src.tracker);

    // History compacted and every watch ended with 410: the deletion below is never sent as
    // an event, so only a relist can notice it.
    api.gone();
    api.expire_history();
    {
        // Delete without leaving an event behind.
        api.delete("Service", "shop", "db");
        api.expire_history();
    }
    wait_for("the relist to notice the deletion", || {
        src.tracker.lock().unwrap().pending_service_changes() >= 1
    });
    // Give the relist time to finish, then check nothing else was touched (no flush).
    std::thread::sleep(Duration::from_millis(300));
    let (snap, changes) = drain(&src.tracker);
    assert_eq!(
        names(&changes),
        ["shop/db"],
        "only the vanished service changed"
    );
    assert!(!has_service(&snap, "shop", "db"));
    assert_eq!(
        endpoints_of(&snap, "shop", "web"),
        ["10.244.1.11:8080", "10.244.1.12:8080"]
    );
    let relists = api
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/services?") && !r.contains("watch=true"))
        .count();
    assert!(relists >= 2, "the service list was fetched again after 410");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_away_then_back() {
    let mut api = MockApi::start().await;
    cluster(&api);
    let src = start_source(&api);
    drain(&src.tracker);

    api.stop();
    // While the server is away the state is kept and nothing changes.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !src.tracker.lock().unwrap().has_pending(),
        "an unreachable API server changes nothing"
    );
    add_service(&api, "late", "10.96.0.30", &["10.244.1.30"], NODE);
    api.restart().await;
    wait_for("the new service after the server came back", || {
        src.tracker.lock().unwrap().pending_service_changes() >= 1
    });
    wait_for("its endpoints", || {
        src.tracker.lock().unwrap().pending_endpoint_changes() >= 1
    });
    let (snap, changes) = drain(&src.tracker);
    assert_eq!(names(&changes), ["shop/late"]);
    assert_eq!(endpoints_of(&snap, "shop", "late"), ["10.244.1.30:8080"]);
    assert!(has_service(&snap, "shop", "web"), "the rest kept serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_objects_are_skipped_while_the_rest_syncs() {
    let api = MockApi::start().await;
    cluster(&api);
    api.apply(mock_api::service("shop", "broken", "10.96.0.300"));
    let src = start_source(&api);
    let (snap, _) = drain(&src.tracker);
    assert!(!has_service(&snap, "shop", "broken"), "bad Service skipped");
    assert!(has_service(&snap, "shop", "web"), "good ones listed");
    drop(snap);

    // A bad update to a good service keeps its last good version; later good ones apply.
    api.apply(mock_api::service("shop", "web", "not-an-ip"));
    api.apply(mock_api::service("shop", "fixed", "10.96.0.40"));
    wait_for("the good update", || {
        src.tracker.lock().unwrap().pending_service_changes() >= 1
    });
    std::thread::sleep(Duration::from_millis(200));
    let (snap, changes) = drain(&src.tracker);
    assert_eq!(names(&changes), ["shop/fixed"]);
    assert!(has_service(&snap, "shop", "web"), "last good version kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_event_is_posted_for_the_node() {
    let api = MockApi::start().await;
    api::post_startup_event(api.client(), NODE.into(), "iptables").await;
    let events = api.posted_events();
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e["reason"], "Starting");
    assert_eq!(e["action"], "StartKubeProxy");
    assert_eq!(e["regarding"]["kind"], "Node");
    assert_eq!(e["regarding"]["name"], NODE);
    assert_eq!(e["type"], "Normal");
}

/// A backend that shares its fake kernel with the test.
struct Shared(Arc<Mutex<IptablesBackend<FakeEdge>>>);

impl Backend for Shared {
    fn sync(&mut self, s: &Snapshot, c: &Changes, full: bool) -> Result<SyncStats, BackendError> {
        self.0.lock().unwrap().sync(s, c, full)
    }
    fn rules_intact(&mut self) -> bool {
        self.0.lock().unwrap().rules_intact()
    }
    fn cleanup(&mut self) -> Result<(), BackendError> {
        self.0.lock().unwrap().cleanup()
    }
    fn name(&self) -> &'static str {
        "iptables"
    }
}

fn service_rules(b: &Arc<Mutex<IptablesBackend<FakeEdge>>>) -> String {
    b.lock()
        .unwrap()
        .edge()
        .chain(IpFamily::V4, "nat", "KUBE-SERVICES")
        .cloned()
        .unwrap_or_default()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_changes_reach_the_backend_rules() {
    let api = MockApi::start().await;
    cluster(&api);
    let tracker = tracker();
    let trigger = SyncTrigger::new();
    let backend = Arc::new(Mutex::new(IptablesBackend::new(
        FakeEdge::default(),
        &[IpFamily::V4],
        Box::new(|family, _| RenderConfig {
            family,
            ..RenderConfig::default()
        }),
    )));
    let settings = SyncSettings {
        min_sync_period: Duration::from_millis(10),
        ..SyncSettings::default()
    };
    let runner = SyncRunner::new(
        tracker.clone(),
        Box::new(Shared(backend.clone())),
        trigger.clone(),
        settings,
    );
    let runner = std::thread::spawn(move || runner.run());
    assert!(
        service_rules(&backend).is_empty(),
        "nothing is written before the lists complete"
    );
    let _watch = api::watch(api.client(), NODE, tracker, trigger.clone());
    wait_for("the first sync", || {
        service_rules(&backend).contains("shop/web:http cluster IP")
    });
    add_service(&api, "cart", "10.96.0.20", &["10.244.1.20"], NODE);
    wait_for("the new service's rules", || {
        service_rules(&backend).contains("shop/cart:http cluster IP")
    });
    api.delete("Service", "shop", "web");
    wait_for("the deleted service's rules to go", || {
        !service_rules(&backend).contains("shop/web:http")
    });
    trigger.stop();
    runner.join().unwrap();
}
