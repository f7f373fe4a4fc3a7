//! The real binary against the in-process API server, inside the namespace cluster: a
//! Service created through the API becomes reachable by real packets, its deletion takes it
//! away, and the metrics and health servers of the running daemon answer over HTTP (metrics
//! parsed with a Prometheus text parser). Needs root; namespaces are removed on failure too.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::kernel_tests_possible;
use common::mock_api::{self, MockApi};
use common::topology::{Topology, pod_ip};
use serde_json::json;

/// GET `path` from `port` on the node's loopback: (status, body).
fn node_get(t: &Topology, port: u16, path: &str) -> Option<(u16, String)> {
    t.node.enter(|| {
        let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: n\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        Some((
            head.split_whitespace().nth(1)?.parse().ok()?,
            body.to_string(),
        ))
    })
}

/// The sum of `name`'s samples over all label values.
fn metric(body: &str, name: &str) -> f64 {
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("metrics parse as Prometheus text");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            _ => f64::NAN,
        })
        .reduce(|a, b| a + b)
        .unwrap_or_else(|| panic!("no {name} in\n{body}"))
}

fn api_service_reachable(mode: &str) {
    let mut t = Topology::new();
    // The API server lives in node-a's namespace (its loopback), like a local apiserver.
    let (api, runtime) = t.node.enter(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let api = rt.block_on(MockApi::start());
        (api, rt)
    });
    api.apply(mock_api::node("node-a", "192.168.0.10"));
    let url = api.url();
    t.start_proxy_with_source(
        mode,
        &["--master", &url],
        &[
            "--metrics-bind-address",
            "127.0.0.1:10249",
            "--healthz-bind-address",
            "127.0.0.1:10256",
        ],
    );
    t.wait_until(
        "the first sync (healthz 200)",
        Duration::from_secs(20),
        || {
            node_get(&t, 10256, "/healthz").is_some_and(|(code, body)| {
                code == 200 && !body.contains("\"lastUpdated\": \"0001")
            })
        },
    );

    // Create a Service through the API; its slice says when the change was triggered.
    let created = Instant::now();
    api.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "test", "name": "web"},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
    }));
    let mut slice = mock_api::slice(
        "test",
        "web",
        "web-1",
        &[&pod_ip(1), &pod_ip(2), &pod_ip(3)],
        "node-a",
    );
    slice["metadata"]["annotations"] = json!({
        "endpoints.kubernetes.io/last-change-trigger-time": jiff::Timestamp::now().to_string()
    });
    api.apply(slice);
    let took = t.wait_until(
        "the API-created ClusterIP to answer",
        Duration::from_secs(20),
        || Topology::http(&t.client, "10.96.0.10", 80).is_some(),
    );
    eprintln!(
        "[{mode}] service created through the API reachable after {} ms",
        took.as_millis()
    );
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        if let Some(a) = Topology::http(&t.client, "10.96.0.10", 80) {
            seen.insert(a.split_whitespace().next().unwrap_or("").to_string());
        }
    }
    assert_eq!(
        seen.len(),
        3,
        "requests spread over the three pods: {seen:?}"
    );
    let _ = created;

    // Metrics of the running daemon.
    let (code, body) = node_get(&t, 10249, "/metrics").expect("metrics server answers");
    assert_eq!(code, 200);
    assert!(metric(&body, "kubeproxy_sync_proxy_rules_duration_seconds_count") >= 2.0);
    assert!(metric(&body, "kubeproxy_sync_proxy_rules_endpoint_changes_total") >= 1.0);
    assert!(metric(&body, "kubeproxy_sync_proxy_rules_service_changes_total") >= 1.0);
    match mode {
        "iptables" => assert!(
            metric(&body, "kubeproxy_sync_proxy_rules_iptables_total") >= 5.0,
            "the service's rules are counted"
        ),
        "userspace" => assert!(
            metric(&body, "kubeproxy_userspace_connections_accepted_total") >= 30.0,
            "the proxied connections are counted"
        ),
        _ => assert_eq!(
            metric(
                &body,
                "kubeproxy_sync_proxy_rules_nftables_sync_failures_total"
            ),
            0.0
        ),
    }
    assert!(
        metric(
            &body,
            "kubeproxy_network_programming_duration_seconds_count"
        ) >= 1.0,
        "the slice's trigger time was observed"
    );

    // Deleting the Service through the API takes it away.
    api.delete("Service", "test", "web");
    api.delete("EndpointSlice", "test", "web-1");
    t.wait_until(
        "the deleted ClusterIP to stop answering",
        Duration::from_secs(20),
        || Topology::http(&t.client, "10.96.0.10", 80).is_none(),
    );
    let events = api.posted_events();
    assert!(
        events.iter().any(|e| e["reason"] == "Starting"),
        "start-up event posted: {events:?}"
    );
    t.stop_proxy();
    drop(api);
    runtime.shutdown_background();
}

macro_rules! api_tests {
    ($($mode:ident),*) => {$(
        mod $mode {
            use super::*;

            #[test]
            fn api_service_reachable() {
                if kernel_tests_possible(concat!(stringify!($mode), "::api_service_reachable")) {
                    super::api_service_reachable(stringify!($mode));
                }
            }
        }
    )*};
}

api_tests!(iptables, nftables, userspace);
