//! Real packets through the real proxy binary in network namespaces (see
//! `tests/common/topology.rs` for the cluster): what a user of each service type and policy
//! would see. The suite is parametrized by proxy mode; every mode that claims a behaviour
//! runs the same assertions. Needs root; namespaces are removed even when a test fails.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::kernel_tests_possible;
use common::topology::{CLIENT_IP, EXTERNAL_IP, REMOTE_POD, Topology, pod_ip, pod_ip6};

const NODE: &str = "apiVersion: v1
kind: Node
metadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-a}}
status: {addresses: [{type: InternalIP, address: 192.168.0.10}]}
";

fn endpoint(ip: &str, node: &str) -> String {
    format!("  - addresses: [\"{ip}\"]\n    nodeName: {node}\n")
}

fn slice(
    service: &str,
    name: &str,
    family: &str,
    port_name: &str,
    proto: &str,
    port: u16,
    eps: &[(&str, &str)],
) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  namespace: test\n  name: {name}\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: {family}\nports: [{{name: {port_name}, port: {port}, protocol: {proto}}}]\nendpoints:\n"
    );
    if eps.is_empty() {
        s.push_str("  []\n");
    }
    for (ip, node) in eps {
        s.push_str(&endpoint(ip, node));
    }
    s
}

/// `web`: NodePort 30080 + externalIP + load-balancer IP, over pods 1-3 (ETP Cluster).
fn web(pods: &[usize]) -> String {
    let eps: Vec<(String, &str)> = pods.iter().map(|i| (pod_ip(*i), "node-a")).collect();
    let eps: Vec<(&str, &str)> = eps.iter().map(|(i, n)| (i.as_str(), *n)).collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{namespace: test, name: web}}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.10\n  externalIPs: [198.51.100.50]\n  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30080}}]\nstatus: {{loadBalancer: {{ingress: [{{ip: 203.0.113.10}}]}}}}\n---\n{}",
        slice("web", "web-1", "IPv4", "http", "TCP", 8080, &eps)
    )
}

/// `dns`: a UDP ClusterIP service over the given pods' echo servers.
fn dns(pods: &[usize]) -> String {
    let eps: Vec<(String, &str)> = pods.iter().map(|i| (pod_ip(*i), "node-a")).collect();
    let eps: Vec<(&str, &str)> = eps.iter().map(|(i, n)| (i.as_str(), *n)).collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{namespace: test, name: dns}}\nspec:\n  clusterIP: 10.96.0.53\n  ports: [{{name: dns, port: 53, protocol: UDP}}]\n---\n{}",
        slice("dns", "dns-1", "IPv4", "dns", "UDP", 5353, &eps)
    )
}

fn cluster_manifests(t: &Topology) {
    t.write_manifest("node.yaml", NODE);
    t.write_manifest("dns.yaml", &dns(&[1, 2]));
    t.write_manifest("web.yaml", &web(&[1, 2, 3]));
    let p = |i| pod_ip(i);
    t.write_manifest(
        "others.yaml",
        &[
            "apiVersion: v1\nkind: Service\nmetadata: {namespace: test, name: sticky}\nspec:\n  clusterIP: 10.96.0.11\n  sessionAffinity: ClientIP\n  ports: [{name: http, port: 80}]\n".to_string(),
            slice("sticky", "sticky-1", "IPv4", "http", "TCP", 8080, &[(&p(1), "node-a"), (&p(2), "node-a"), (&p(3), "node-a")]),
            "apiVersion: v1\nkind: Service\nmetadata: {namespace: test, name: local}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.12\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32012\n  ports: [{name: http, port: 80, nodePort: 30081}]\nstatus: {loadBalancer: {ingress: [{ip: 203.0.113.12}]}}\n".to_string(),
            slice("local", "local-1", "IPv4", "http", "TCP", 8080, &[(&p(1), "node-a"), (REMOTE_POD, "node-b")]),
            "apiVersion: v1\nkind: Service\nmetadata: {namespace: test, name: itp}\nspec:\n  clusterIP: 10.96.0.13\n  internalTrafficPolicy: Local\n  ports: [{name: http, port: 80}]\n".to_string(),
            slice("itp", "itp-1", "IPv4", "http", "TCP", 8080, &[(&p(2), "node-a"), (REMOTE_POD, "node-b")]),
            "apiVersion: v1\nkind: Service\nmetadata: {namespace: test, name: empty}\nspec:\n  clusterIP: 10.96.0.14\n  ports: [{name: http, port: 80}]\n".to_string(),
            "apiVersion: v1\nkind: Service\nmetadata: {namespace: test, name: web6}\nspec:\n  clusterIP: \"fd00:96::10\"\n  clusterIPs: [\"fd00:96::10\"]\n  ipFamilies: [IPv6]\n  ports: [{name: http, port: 80}]\n".to_string(),
            slice("web6", "web6-1", "IPv6", "http", "TCP", 8081, &[(&pod_ip6(1), "node-a"), (&pod_ip6(2), "node-a")]),
            "apiVersion: v1\nkind: Service\nmetadata: {namespace: test, name: remote}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.15\n  ports: [{name: http, port: 80, nodePort: 30082}]\n".to_string(),
            slice("remote", "remote-1", "IPv4", "http", "TCP", 8080, &[(REMOTE_POD, "node-b")]),
        ]
        .join("---\n"),
    );
}

/// Backend names seen over `n` requests (first word of each answer).
fn spread(n: usize, mut get: impl FnMut() -> Option<String>) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let answer = get().unwrap_or_else(|| "<failed>".into());
        *seen
            .entry(answer.split_whitespace().next().unwrap_or("").to_string())
            .or_insert(0) += 1;
    }
    seen
}

/// A NAT mode rewrites packets, so endpoints see the client's address; a proxy that
/// terminates connections (userspace) connects from the node instead.
fn preserves_source_ip(mode: &str) -> bool {
    mode != "userspace"
}

fn skipped(mode: &str, check: &str, why: &str) {
    eprintln!("[{mode}] SKIPPED check {check}: {why}");
}

fn started(mode: &str) -> Topology {
    let mut t = Topology::new();
    cluster_manifests(&t);
    t.start_proxy(mode, &[]);
    t.wait_until(
        "the web ClusterIP to answer",
        Duration::from_secs(20),
        || Topology::http(&t.client, "10.96.0.10", 80).is_some(),
    );
    t
}

fn every_path_works(mode: &str) {
    let t = started(mode);
    let pods: Vec<String> = (1..=3).map(|i| format!("pod-{i}")).collect();

    // ClusterIP from a pod and from the node itself, spread over every endpoint.
    let from_pod = spread(30, || Topology::http(&t.client, "10.96.0.10", 80));
    assert_eq!(
        from_pod.keys().cloned().collect::<Vec<_>>(),
        pods,
        "ClusterIP from a pod: {from_pod:?}"
    );
    let from_node = spread(30, || Topology::http(&t.node, "10.96.0.10", 80));
    assert_eq!(
        from_node.keys().cloned().collect::<Vec<_>>(),
        pods,
        "ClusterIP from the node: {from_node:?}"
    );
    // A pod client keeps its source IP.
    let answer = Topology::http(&t.client, "10.96.0.10", 80).unwrap();
    if preserves_source_ip(mode) {
        assert!(
            answer.ends_with(CLIENT_IP),
            "pod source preserved: {answer}"
        );
    } else {
        skipped(
            mode,
            "pod source IP",
            "a TCP proxy connects to the endpoint from the node",
        );
    }

    // NodePort, load-balancer IP and external IP from the external host: spread, and
    // masqueraded (ETP Cluster) so the pod sees the node, not the client.
    for (host, port) in [
        ("192.168.0.10", 30080),
        ("203.0.113.10", 80),
        ("198.51.100.50", 80),
    ] {
        let seen = spread(24, || Topology::http(&t.external, host, port));
        assert_eq!(
            seen.keys().cloned().collect::<Vec<_>>(),
            pods,
            "{host}:{port} from outside: {seen:?}"
        );
        let answer = Topology::http(&t.external, host, port).unwrap();
        assert!(
            !answer.ends_with(EXTERNAL_IP),
            "{host}:{port}: external traffic is masqueraded: {answer}"
        );
    }

    // A NodePort whose only endpoint is on another node: forwarded there.
    let answer =
        Topology::http(&t.external, "192.168.0.10", 30082).expect("NodePort to a remote endpoint");
    assert!(answer.starts_with("remote-pod"), "{answer}");

    // Hairpin: a pod reaching itself through its service.
    let hairpin = spread(30, || Topology::http(&t.pods[0], "10.96.0.10", 80));
    assert!(
        hairpin.contains_key("pod-1") && !hairpin.contains_key("<failed>"),
        "hairpin: {hairpin:?}"
    );

    // Session affinity ClientIP: one client always reaches the same pod.
    let sticky = spread(15, || Topology::http(&t.client, "10.96.0.11", 80));
    assert_eq!(sticky.len(), 1, "sessionAffinity ClientIP: {sticky:?}");

    // ETP Local: from outside only the local endpoint, with the client IP preserved.
    for (host, port) in [("203.0.113.12", 80), ("192.168.0.10", 30081)] {
        let seen = spread(12, || Topology::http(&t.external, host, port));
        assert_eq!(
            seen.keys().collect::<Vec<_>>(),
            vec!["pod-1"],
            "ETP Local {host}:{port}: {seen:?}"
        );
        let answer = Topology::http(&t.external, host, port).unwrap();
        if preserves_source_ip(mode) {
            assert!(
                answer.ends_with(EXTERNAL_IP),
                "ETP Local preserves the client IP: {answer}"
            );
        } else {
            skipped(
                mode,
                "ETP Local client IP",
                "a TCP proxy connects to the endpoint from the node",
            );
        }
    }
    // ...while pods still reach every endpoint through the ClusterIP.
    let internal = spread(30, || Topology::http(&t.client, "10.96.0.12", 80));
    assert!(
        internal.contains_key("remote-pod") && internal.contains_key("pod-1"),
        "{internal:?}"
    );

    // ITP Local: ClusterIP traffic only to this node's endpoint.
    let itp = spread(15, || Topology::http(&t.client, "10.96.0.13", 80));
    assert_eq!(
        itp.keys().collect::<Vec<_>>(),
        vec!["pod-2"],
        "ITP Local: {itp:?}"
    );

    // No endpoints: refused at once, not a timeout.
    let (code, took) = Topology::http_attempt(&t.client, "10.96.0.14", 80);
    assert_eq!(code, 7, "curl exit 7 = connection refused");
    assert!(
        took < Duration::from_millis(500),
        "refused at once, took {took:?}"
    );

    // UDP service.
    let udp = spread(20, || Topology::udp(&t.client, "10.96.0.53", 53, 0));
    assert!(
        udp.keys().all(|k| k == "pod-1" || k == "pod-2") && udp.len() == 2,
        "UDP: {udp:?}"
    );

    // IPv6 ClusterIP.
    let v6 = spread(20, || Topology::http(&t.client, "fd00:96::10", 80));
    assert_eq!(
        v6.keys().collect::<Vec<_>>(),
        vec!["pod-1", "pod-2"],
        "IPv6 ClusterIP: {v6:?}"
    );
}

fn endpoint_changes_converge(mode: &str) {
    let t = started(mode);
    // Remove pod-3.
    t.write_manifest("web.yaml", &web(&[1, 2]));
    let took = t.wait_until("pod-3 to leave web", Duration::from_secs(10), || {
        !spread(12, || Topology::http(&t.client, "10.96.0.10", 80)).contains_key("pod-3")
    });
    eprintln!(
        "[{mode}] endpoint removal converged in {} ms (incl. 12 probes)",
        took.as_millis()
    );
    let seen = spread(20, || Topology::http(&t.client, "10.96.0.10", 80));
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        vec!["pod-1", "pod-2"],
        "{seen:?}"
    );
    // Add it back.
    t.write_manifest("web.yaml", &web(&[1, 2, 3]));
    let took = t.wait_until("pod-3 to rejoin web", Duration::from_secs(10), || {
        spread(12, || Topology::http(&t.client, "10.96.0.10", 80)).contains_key("pod-3")
    });
    eprintln!(
        "[{mode}] endpoint addition converged in {} ms (incl. probes)",
        took.as_millis()
    );

    // UDP: a client with a fixed source port is stuck to its endpoint by conntrack; when
    // that endpoint is removed the stale entry is deleted and the client moves on.
    let first = Topology::udp(&t.client, "10.96.0.53", 53, 40000).expect("UDP answer");
    let victim = first.split_whitespace().next().unwrap().to_string();
    let keep = if victim == "pod-1" { 2 } else { 1 };
    assert_eq!(
        Topology::udp(&t.client, "10.96.0.53", 53, 40000)
            .unwrap()
            .split_whitespace()
            .next(),
        Some(victim.as_str())
    );
    t.write_manifest("dns.yaml", &dns(&[keep]));
    let took = t.wait_until(
        "the UDP client to move off the removed endpoint",
        Duration::from_secs(10),
        || {
            Topology::udp(&t.client, "10.96.0.53", 53, 40000)
                .is_some_and(|a| a.starts_with(&format!("pod-{keep}")))
        },
    );
    eprintln!(
        "[{mode}] UDP client moved off {victim} in {} ms",
        took.as_millis()
    );

    // A deleted service stops answering (and in userspace mode its address leaves the node).
    t.remove_manifest("dns.yaml");
    t.wait_until(
        "the deleted UDP service to go quiet",
        Duration::from_secs(10),
        || Topology::udp(&t.client, "10.96.0.53", 53, 0).is_none(),
    );
    if mode == "userspace" {
        t.wait_until(
            "the deleted service's address to leave lo",
            Duration::from_secs(10),
            || {
                !t.node
                    .ok(&["ip", "addr", "show", "dev", "lo"])
                    .contains("10.96.0.53/32")
            },
        );
    }
}

fn flushed_rules_are_restored(mode: &str) {
    let t = started(mode);
    if mode == "userspace" {
        // No netfilter rules to flush; the state that can be removed behind the proxy's
        // back is its service addresses.
        t.node
            .ok(&["ip", "addr", "del", "10.96.0.10/32", "dev", "lo"]);
        assert!(
            Topology::http(&t.client, "10.96.0.10", 80).is_none(),
            "the address is gone"
        );
        let took = t.wait_until(
            "the address to be restored",
            Duration::from_secs(15),
            || Topology::http(&t.client, "10.96.0.10", 80).is_some(),
        );
        eprintln!(
            "[{mode}] address restored {} ms after its removal",
            took.as_millis()
        );
        return;
    }
    for cmd in [
        vec!["iptables", "-t", "nat", "-F"],
        vec!["iptables", "-t", "nat", "-X"],
        vec!["iptables", "-t", "filter", "-F"],
        vec!["iptables", "-t", "filter", "-X"],
    ] {
        t.node.ok(&cmd);
    }
    nft_flush_if_used(&t, mode);
    assert!(
        Topology::http(&t.client, "10.96.0.10", 80).is_none_or(|a| !a.starts_with("pod")),
        "rules are gone"
    );
    let took = t.wait_until("the rules to be restored", Duration::from_secs(15), || {
        Topology::http(&t.client, "10.96.0.10", 80).is_some()
    });
    eprintln!("[{mode}] restored {} ms after the flush", took.as_millis());
}

fn nft_flush_if_used(t: &Topology, mode: &str) {
    if mode == "nftables" {
        t.node.ok(&["nft", "flush", "ruleset"]);
    }
}

fn cleanup_leaves_nothing(mode: &str) {
    let mut t = started(mode);
    // An address the admin put on lo is not svcproxy's: no mode may remove it.
    t.node
        .ok(&["ip", "addr", "add", "192.0.2.99/32", "dev", "lo"]);
    t.stop_proxy();
    if mode == "userspace" {
        // The proxy is the dataplane: after a stop its addresses stay, its listeners die.
        let addrs = t.node.ok(&["ip", "-d", "addr", "show", "dev", "lo"]);
        assert!(
            addrs.contains("10.96.0.10/32"),
            "addresses survive a SIGTERM:\n{addrs}"
        );
    } else {
        // Rules stay after a normal stop...
        assert!(
            Topology::http(&t.client, "10.96.0.10", 80).is_some(),
            "rules survive a SIGTERM"
        );
    }
    let out = t.node.run(&[env!("CARGO_BIN_EXE_svcproxy"), "--cleanup"]);
    assert!(
        out.status.success(),
        "--cleanup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for save in ["iptables-save", "ip6tables-save", "iptables-legacy-save"] {
        let text = t.node.ok(&[save]);
        assert!(!text.contains("KUBE-"), "{save} after --cleanup:\n{text}");
    }
    let tables = t.node.ok(&["nft", "list", "tables"]);
    assert!(
        !tables.contains("svcproxy") && !tables.contains("kube-proxy"),
        "{tables}"
    );
    assert!(
        Topology::http(&t.client, "10.96.0.10", 80).is_none(),
        "service gone after cleanup"
    );
    // No service address and no listener left in the node.
    let addrs = t.node.ok(&["ip", "-d", "addr", "show"]);
    for ip in ["10.96.0.", "203.0.113.", "198.51.100.", "fd00:96::"] {
        assert!(!addrs.contains(ip), "{ip}* left after --cleanup:\n{addrs}");
    }
    assert!(!addrs.contains("svcproxy0"), "{addrs}");
    assert!(
        addrs.contains("192.0.2.99/32"),
        "the admin's address stays:\n{addrs}"
    );
    let listening = t.node.ok(&["ss", "-Hltun"]);
    assert!(listening.trim().is_empty(), "listeners left:\n{listening}");
}

/// A node switched from another mode keeps serving, without that mode's state left behind:
/// NAT rules (their DNAT would take the traffic before a userspace proxy sees it) or the
/// userspace mode's service addresses.
fn takes_over_from_another_mode(mode: &str) {
    // The NAT modes take over from the userspace mode, the others from iptables mode.
    let previous = if mode == "iptables" {
        "userspace"
    } else {
        "iptables"
    };
    let mut t = started(previous);
    t.stop_proxy();
    let leftovers = |t: &Topology| match previous {
        "iptables" => t.node.ok(&["iptables-save"]).contains("KUBE-"),
        _ => t
            .node
            .ok(&["ip", "-4", "addr", "show", "dev", "lo"])
            .contains("10.96.0.10/32"),
    };
    assert!(
        leftovers(&t),
        "{previous} mode left its state behind on a normal stop"
    );
    t.start_proxy(mode, &[]);
    t.wait_until(
        "the previous mode's rules or addresses to be removed",
        Duration::from_secs(20),
        || !leftovers(&t),
    );
    t.wait_until(
        "the web ClusterIP to answer",
        Duration::from_secs(20),
        || Topology::http(&t.client, "10.96.0.10", 80).is_some(),
    );
    let seen = spread(12, || Topology::http(&t.client, "10.96.0.10", 80));
    assert_eq!(seen.len(), 3, "{seen:?}");
}

/// A dead endpoint (one that times out, one that refuses) is retried away by a proxy with no
/// client-visible error. NAT modes have no retry: a connection DNATed to a dead endpoint
/// fails, as with upstream kube-proxy.
fn dead_endpoints_are_skipped(mode: &str) {
    if mode != "userspace" {
        skipped(
            mode,
            "dead endpoint retry",
            "NAT modes do not retry connects",
        );
        return;
    }
    let t = started(mode);
    let p = |i| pod_ip(i);
    t.write_manifest(
        "flaky.yaml",
        &[
            "apiVersion: v1\nkind: Service\nmetadata: {namespace: test, name: flaky}\nspec:\n  clusterIP: 10.96.0.16\n  ports: [{name: http, port: 80}]\n".to_string(),
            // 10.244.1.14 has no pod: its SYNs leave through the node's default route and are
            // never answered (timeout). pod-3 has nothing on 9999 (refused at once).
            slice("flaky", "flaky-1", "IPv4", "http", "TCP", 8080, &[(&p(1), "node-a"), (&p(2), "node-a"), ("10.244.1.14", "node-a")]),
            slice("flaky", "flaky-2", "IPv4", "http", "TCP", 9999, &[(&p(3), "node-a")]),
        ]
        .join("---\n"),
    );
    t.wait_until(
        "the flaky ClusterIP to answer",
        Duration::from_secs(10),
        || Topology::http(&t.client, "10.96.0.16", 80).is_some(),
    );
    let start = std::time::Instant::now();
    let seen = spread(30, || Topology::http(&t.client, "10.96.0.16", 80));
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        vec!["pod-1", "pod-2"],
        "every request answered by a live endpoint: {seen:?}"
    );
    eprintln!(
        "[{mode}] 30 requests over 2 live + 2 dead endpoints took {} ms",
        start.elapsed().as_millis()
    );
}

macro_rules! packet_tests {
    ($($mode:ident),*) => {$(
        mod $mode {
            use super::*;

            #[test]
            fn every_path_works() {
                if kernel_tests_possible(concat!(stringify!($mode), "::every_path_works")) {
                    super::every_path_works(stringify!($mode));
                }
            }

            #[test]
            fn endpoint_changes_converge() {
                if kernel_tests_possible(concat!(stringify!($mode), "::endpoint_changes_converge")) {
                    super::endpoint_changes_converge(stringify!($mode));
                }
            }

            #[test]
            fn flushed_rules_are_restored() {
                if kernel_tests_possible(concat!(stringify!($mode), "::flushed_rules_are_restored")) {
                    super::flushed_rules_are_restored(stringify!($mode));
                }
            }

            #[test]
            fn takes_over_from_another_mode() {
                if kernel_tests_possible(concat!(stringify!($mode), "::takes_over_from_another_mode")) {
                    super::takes_over_from_another_mode(stringify!($mode));
                }
            }

            #[test]
            fn dead_endpoints_are_skipped() {
                if kernel_tests_possible(concat!(stringify!($mode), "::dead_endpoints_are_skipped")) {
                    super::dead_endpoints_are_skipped(stringify!($mode));
                }
            }

            #[test]
            fn cleanup_leaves_nothing() {
                if kernel_tests_possible(concat!(stringify!($mode), "::cleanup_leaves_nothing")) {
                    super::cleanup_leaves_nothing(stringify!($mode));
                }
            }
        }
    )*};
}

packet_tests!(iptables, nftables, userspace);
