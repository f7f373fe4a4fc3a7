//! `svcproxy::model::convert`: Services, EndpointSlices and Nodes into model types.
//!
//! Objects are written as JSON merge patches over a small valid base object, so each row
//! shows only what it is about.

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};
use svcproxy::model::convert::{
    DEFAULT_AFFINITY_TIMEOUT_SECONDS, SlicePort, endpoint_slice, node_info, service_ports,
};
use svcproxy::model::{
    ConvertError, Endpoint, InvalidField, NodeInfo, Protocol, ServicePort, SessionAffinity,
    SliceInfo,
};

use crate::common::{ip, object, service_port, spn, svc_name};

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

// ---- Services ------------------------------------------------------------------------------

/// `ns/svc`: ClusterIP 10.96.0.10, one unnamed TCP port 80.
fn service(patch: Value) -> Service {
    object(
        json!({
            "metadata": {"namespace": "ns", "name": "svc"},
            "spec": {
                "type": "ClusterIP",
                "clusterIP": "10.96.0.10",
                "clusterIPs": ["10.96.0.10"],
                "ports": [{"port": 80}],
            },
        }),
        &patch,
    )
}

/// What [`service`] converts to, before the row's changes.
fn base_port() -> ServicePort {
    service_port("ns", "svc", "", Protocol::Tcp, 80)
}

fn run_services(table: &str, rows: Vec<(&str, Value, Vec<ServicePort>)>) {
    let mut failures = Vec::new();
    for (name, patch, want) in &rows {
        match service_ports(&service(patch.clone())) {
            Ok(got) if got == *want => {}
            got => failures.push(format!("  {name}:\n    got  {got:?}\n    want {want:?}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{table}: {} of {} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

#[test]
fn service_types() {
    let lb = |ingress: Value| {
        json!({
            "spec": {"type": "LoadBalancer", "ports": [{"port": 80, "nodePort": 30080}]},
            "status": {"loadBalancer": {"ingress": ingress}},
        })
    };
    run_services(
        "service types",
        vec![
            (
                "ClusterIP: one port, every option at its default",
                json!({}),
                vec![base_port()],
            ),
            (
                "type unset means ClusterIP",
                json!({"spec": {"type": null}}),
                vec![base_port()],
            ),
            (
                "protocol defaults to TCP; UDP and SCTP; named ports",
                json!({"spec": {"ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53},
                    {"name": "sig", "port": 2905, "protocol": "SCTP"},
                ]}}),
                vec![
                    service_port("ns", "svc", "dns", Protocol::Udp, 53),
                    service_port("ns", "svc", "dns-tcp", Protocol::Tcp, 53),
                    service_port("ns", "svc", "sig", Protocol::Sctp, 2905),
                ],
            ),
            (
                "same port name with two protocols is not a duplicate",
                json!({"spec": {"ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                    {"name": "dns", "port": 53, "protocol": "TCP"},
                ]}}),
                vec![
                    service_port("ns", "svc", "dns", Protocol::Udp, 53),
                    service_port("ns", "svc", "dns", Protocol::Tcp, 53),
                ],
            ),
            (
                "NodePort: node port per port",
                json!({"spec": {"type": "NodePort", "ports": [
                    {"name": "http", "port": 80, "nodePort": 30080},
                    {"name": "https", "port": 443, "nodePort": 30443},
                ]}}),
                vec![
                    ServicePort {
                        node_port: Some(30080),
                        ..service_port("ns", "svc", "http", Protocol::Tcp, 80)
                    },
                    ServicePort {
                        node_port: Some(30443),
                        ..service_port("ns", "svc", "https", Protocol::Tcp, 443)
                    },
                ],
            ),
            (
                "nodePort 0 means none",
                json!({"spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 0}]}}),
                vec![base_port()],
            ),
            (
                "LoadBalancer: ingress IPs of both families; ipMode VIP kept, Proxy and \
                 hostname-only skipped",
                lb(json!([
                    {"ip": "192.0.2.1"},
                    {"ip": "192.0.2.2", "ipMode": "VIP"},
                    {"ip": "192.0.2.3", "ipMode": "Proxy"},
                    {"hostname": "lb.example.com"},
                    {"ip": "", "hostname": "lb2.example.com"},
                    {"ip": "2001:db8::1"},
                ])),
                vec![ServicePort {
                    node_port: Some(30080),
                    load_balancer_ips: vec![ip("192.0.2.1"), ip("192.0.2.2"), ip("2001:db8::1")],
                    ..base_port()
                }],
            ),
            (
                "LoadBalancer not yet provisioned: no ingress IPs",
                json!({"spec": {"type": "LoadBalancer", "ports": [{"port": 80, "nodePort": 30080}]}}),
                vec![ServicePort {
                    node_port: Some(30080),
                    ..base_port()
                }],
            ),
            (
                "externalIPs of both families, deduplicated, whitespace tolerated",
                json!({"spec": {"externalIPs": ["203.0.113.1", "2001:db8::5", " 203.0.113.1"]}}),
                vec![ServicePort {
                    external_ips: vec![ip("203.0.113.1"), ip("2001:db8::5")],
                    ..base_port()
                }],
            ),
            (
                "ExternalName: skipped",
                json!({"spec": {"type": "ExternalName", "externalName": "db.example.com",
                                "clusterIP": null, "clusterIPs": null}}),
                vec![],
            ),
            (
                "ExternalName with a stale clusterIP: still skipped",
                json!({"spec": {"type": "ExternalName", "externalName": "db.example.com"}}),
                vec![],
            ),
            (
                "headless (clusterIP None): skipped",
                json!({"spec": {"clusterIP": "None", "clusterIPs": ["None"]}}),
                vec![],
            ),
            (
                "headless label: skipped",
                json!({"metadata": {"labels": {"service.kubernetes.io/headless": ""}}}),
                vec![],
            ),
            (
                "clusterIP not allocated yet: skipped",
                json!({"spec": {"clusterIP": "", "clusterIPs": null}}),
                vec![],
            ),
            (
                "service-proxy-name label (another proxy's service): skipped",
                json!({"metadata": {"labels": {"service.kubernetes.io/service-proxy-name": "other"}}}),
                vec![],
            ),
            (
                "unrelated labels: proxied",
                json!({"metadata": {"labels": {"app": "web"}}}),
                vec![base_port()],
            ),
            ("no ports: nothing", json!({"spec": {"ports": []}}), vec![]),
            (
                "ports unset: nothing",
                json!({"spec": {"ports": null}}),
                vec![],
            ),
            ("no spec: nothing", json!({"spec": null}), vec![]),
        ],
    );
}

#[test]
fn service_options() {
    let client_ip = |timeout_seconds| SessionAffinity::ClientIp { timeout_seconds };
    run_services(
        "service options",
        vec![
            (
                "ClientIP affinity: default timeout 10800 s",
                json!({"spec": {"sessionAffinity": "ClientIP"}}),
                vec![ServicePort {
                    session_affinity: client_ip(10800),
                    ..base_port()
                }],
            ),
            (
                "ClientIP affinity: custom timeout",
                json!({"spec": {"sessionAffinity": "ClientIP",
                                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}}),
                vec![ServicePort {
                    session_affinity: client_ip(60),
                    ..base_port()
                }],
            ),
            (
                "ClientIP affinity: empty clientIP config gets the default",
                json!({"spec": {"sessionAffinity": "ClientIP",
                                "sessionAffinityConfig": {"clientIP": {}}}}),
                vec![ServicePort {
                    session_affinity: client_ip(10800),
                    ..base_port()
                }],
            ),
            (
                "affinity None ignores a leftover config",
                json!({"spec": {"sessionAffinity": "None",
                                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}}),
                vec![base_port()],
            ),
            (
                "dual-stack clusterIPs, IPv4 primary",
                json!({"spec": {"clusterIPs": ["10.96.0.10", "fd00::10"],
                                "ipFamilies": ["IPv4", "IPv6"]}}),
                vec![ServicePort {
                    cluster_ips: vec![ip("10.96.0.10"), ip("fd00::10")],
                    ..base_port()
                }],
            ),
            (
                "dual-stack clusterIPs, IPv6 primary keeps the order",
                json!({"spec": {"clusterIP": "fd00::10", "clusterIPs": ["fd00::10", "10.96.0.10"]}}),
                vec![ServicePort {
                    cluster_ips: vec![ip("fd00::10"), ip("10.96.0.10")],
                    ..base_port()
                }],
            ),
            (
                "single-stack IPv6",
                json!({"spec": {"clusterIP": "fd00::10", "clusterIPs": ["fd00::10"]}}),
                vec![ServicePort {
                    cluster_ips: vec![ip("fd00::10")],
                    ..base_port()
                }],
            ),
            (
                "clusterIPs unset: clusterIP is used",
                json!({"spec": {"clusterIP": "10.96.0.99", "clusterIPs": null}}),
                vec![ServicePort {
                    cluster_ips: vec![ip("10.96.0.99")],
                    ..base_port()
                }],
            ),
            (
                "loadBalancerSourceRanges: both families, trimmed, host bits cleared",
                json!({"spec": {"type": "LoadBalancer",
                                "loadBalancerSourceRanges":
                                    ["10.0.0.0/8", " 192.168.1.7/24 ", "2001:db8::1/32"]}}),
                vec![ServicePort {
                    load_balancer_source_ranges: vec![
                        net("10.0.0.0/8"),
                        net("192.168.1.0/24"),
                        net("2001:db8::/32"),
                    ],
                    ..base_port()
                }],
            ),
            (
                "LoadBalancer ETP Local with healthCheckNodePort",
                json!({"spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                                "healthCheckNodePort": 32000,
                                "ports": [{"port": 80, "nodePort": 30080}]}}),
                vec![ServicePort {
                    node_port: Some(30080),
                    health_check_node_port: Some(32000),
                    external_policy_local: true,
                    ..base_port()
                }],
            ),
            (
                "healthCheckNodePort 0 means none",
                json!({"spec": {"type": "LoadBalancer", "healthCheckNodePort": 0}}),
                vec![base_port()],
            ),
            (
                "NodePort ETP Local",
                json!({"spec": {"type": "NodePort", "externalTrafficPolicy": "Local",
                                "ports": [{"port": 80, "nodePort": 30080}]}}),
                vec![ServicePort {
                    node_port: Some(30080),
                    external_policy_local: true,
                    ..base_port()
                }],
            ),
            (
                "NodePort ETP Cluster",
                json!({"spec": {"type": "NodePort", "externalTrafficPolicy": "Cluster",
                                "ports": [{"port": 80, "nodePort": 30080}]}}),
                vec![ServicePort {
                    node_port: Some(30080),
                    ..base_port()
                }],
            ),
            (
                "ClusterIP ETP Local without externalIPs: not externally accessible, flag off",
                json!({"spec": {"externalTrafficPolicy": "Local"}}),
                vec![base_port()],
            ),
            (
                "ClusterIP ETP Local with externalIPs: flag on",
                json!({"spec": {"externalTrafficPolicy": "Local", "externalIPs": ["203.0.113.1"]}}),
                vec![ServicePort {
                    external_ips: vec![ip("203.0.113.1")],
                    external_policy_local: true,
                    ..base_port()
                }],
            ),
            (
                "ITP Local",
                json!({"spec": {"internalTrafficPolicy": "Local"}}),
                vec![ServicePort {
                    internal_policy_local: true,
                    ..base_port()
                }],
            ),
            (
                "ITP Cluster",
                json!({"spec": {"internalTrafficPolicy": "Cluster"}}),
                vec![base_port()],
            ),
            (
                "trafficDistribution is kept",
                json!({"spec": {"trafficDistribution": "PreferClose"}}),
                vec![ServicePort {
                    traffic_distribution: Some("PreferClose".into()),
                    ..base_port()
                }],
            ),
            (
                "every port carries the service-wide settings",
                json!({"spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                                "internalTrafficPolicy": "Local",
                                "sessionAffinity": "ClientIP",
                                "externalIPs": ["203.0.113.1"],
                                "loadBalancerSourceRanges": ["198.51.100.0/24"],
                                "healthCheckNodePort": 32000,
                                "ports": [
                                    {"name": "a", "port": 80, "nodePort": 30080},
                                    {"name": "b", "port": 53, "protocol": "UDP",
                                     "nodePort": 30053},
                                ]},
                       "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}}}),
                [
                    ("a", Protocol::Tcp, 80, 30080),
                    ("b", Protocol::Udp, 53, 30053),
                ]
                .into_iter()
                .map(|(name, protocol, port, node_port)| ServicePort {
                    node_port: Some(node_port),
                    external_ips: vec![ip("203.0.113.1")],
                    load_balancer_ips: vec![ip("192.0.2.1")],
                    load_balancer_source_ranges: vec![net("198.51.100.0/24")],
                    health_check_node_port: Some(32000),
                    session_affinity: client_ip(DEFAULT_AFFINITY_TIMEOUT_SECONDS),
                    external_policy_local: true,
                    internal_policy_local: true,
                    ..service_port("ns", "svc", name, protocol, port)
                })
                .collect(),
            ),
        ],
    );
}

#[test]
fn service_port_name_display() {
    let ports = service_ports(&service(json!({"spec": {"ports": [{"port": 80}]}}))).unwrap();
    assert_eq!(ports[0].name.to_string(), "ns/svc", "unnamed port");
    let ports = service_ports(&service(
        json!({"spec": {"ports": [{"name": "http", "port": 80}]}}),
    ))
    .unwrap();
    assert_eq!(ports[0].name.to_string(), "ns/svc:http", "named port");
    assert_eq!(ports[0].name, spn("ns", "svc", "http", Protocol::Tcp));
}

#[test]
fn service_errors() {
    let bad_ip = |field: &str, value: &str| InvalidField::BadIp {
        field: field.into(),
        value: value.into(),
    };
    let bad_port = |field: &str, value: i64| InvalidField::BadPort {
        field: field.into(),
        value,
    };
    let rows: Vec<(&str, Value, &str, InvalidField)> = vec![
        (
            "bad clusterIP",
            json!({"spec": {"clusterIP": "10.96.0.300", "clusterIPs": ["10.96.0.300"]}}),
            "ns/svc",
            bad_ip("spec.clusterIPs[0]", "10.96.0.300"),
        ),
        (
            "bad secondary clusterIP",
            json!({"spec": {"clusterIPs": ["10.96.0.10", "fd00::zz"]}}),
            "ns/svc",
            bad_ip("spec.clusterIPs[1]", "fd00::zz"),
        ),
        (
            "bad externalIP",
            json!({"spec": {"externalIPs": ["203.0.113.1", "203.0.113"]}}),
            "ns/svc",
            bad_ip("spec.externalIPs[1]", "203.0.113"),
        ),
        (
            "bad load-balancer ingress IP",
            json!({"status": {"loadBalancer": {"ingress": [{"ip": "lb.example.com"}]}}}),
            "ns/svc",
            bad_ip("status.loadBalancer.ingress[0].ip", "lb.example.com"),
        ),
        (
            "unsupported protocol",
            json!({"spec": {"ports": [{"port": 80}, {"port": 81, "protocol": "ICMP"}]}}),
            "ns/svc",
            InvalidField::BadProtocol {
                field: "spec.ports[1].protocol".into(),
                value: "ICMP".into(),
            },
        ),
        (
            "protocol is case-sensitive",
            json!({"spec": {"ports": [{"port": 80, "protocol": "tcp"}]}}),
            "ns/svc",
            InvalidField::BadProtocol {
                field: "spec.ports[0].protocol".into(),
                value: "tcp".into(),
            },
        ),
        (
            "port 0",
            json!({"spec": {"ports": [{"port": 0}]}}),
            "ns/svc",
            bad_port("spec.ports[0].port", 0),
        ),
        (
            "port 70000",
            json!({"spec": {"ports": [{"port": 70000}]}}),
            "ns/svc",
            bad_port("spec.ports[0].port", 70000),
        ),
        (
            "negative port",
            json!({"spec": {"ports": [{"port": -1}]}}),
            "ns/svc",
            bad_port("spec.ports[0].port", -1),
        ),
        (
            "nodePort 70000",
            json!({"spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 70000}]}}),
            "ns/svc",
            bad_port("spec.ports[0].nodePort", 70000),
        ),
        (
            "healthCheckNodePort 70000",
            json!({"spec": {"type": "LoadBalancer", "healthCheckNodePort": 70000}}),
            "ns/svc",
            bad_port("spec.healthCheckNodePort", 70000),
        ),
        (
            "bad loadBalancerSourceRanges CIDR",
            json!({"spec": {"loadBalancerSourceRanges": ["10.0.0.0/8", "10.0.0.0/33"]}}),
            "ns/svc",
            InvalidField::BadCidr {
                field: "spec.loadBalancerSourceRanges[1]".into(),
                value: "10.0.0.0/33".into(),
            },
        ),
        (
            "duplicate named port",
            json!({"spec": {"ports": [{"name": "http", "port": 80},
                                      {"name": "http", "port": 8080}]}}),
            "ns/svc",
            InvalidField::DuplicatePort("ns/svc:http".into()),
        ),
        (
            "duplicate unnamed port",
            json!({"spec": {"ports": [{"port": 80}, {"port": 8080, "protocol": "TCP"}]}}),
            "ns/svc",
            InvalidField::DuplicatePort("ns/svc".into()),
        ),
        (
            "missing name",
            json!({"metadata": {"name": null}}),
            "ns/<unnamed>",
            InvalidField::MissingName,
        ),
        (
            "missing namespace",
            json!({"metadata": {"namespace": null}}),
            "svc",
            InvalidField::MissingName,
        ),
        (
            "empty name",
            json!({"metadata": {"name": ""}}),
            "ns/",
            InvalidField::MissingName,
        ),
    ];
    let mut failures = Vec::new();
    for (name, patch, object, reason) in &rows {
        let want = ConvertError {
            kind: "Service",
            object: object.to_string(),
            reason: reason.clone(),
        };
        match service_ports(&service(patch.clone())) {
            Err(got) if got == want => {}
            got => failures.push(format!("  {name}:\n    got  {got:?}\n    want {want:?}")),
        }
    }
    assert!(
        failures.is_empty(),
        "service errors: {} of {} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

#[test]
fn convert_error_display_names_object_and_reason() {
    let svc = service(json!({"metadata": {"name": "bad"},
                             "spec": {"clusterIPs": ["not-an-ip"]}}));
    let text = service_ports(&svc).unwrap_err().to_string();
    for part in ["Service ns/bad", "spec.clusterIPs[0]", "\"not-an-ip\""] {
        assert!(text.contains(part), "{text:?} lacks {part:?}");
    }
    assert_eq!(
        text,
        "Service ns/bad: spec.clusterIPs[0]: \"not-an-ip\" is not a valid IP address"
    );

    let slice = slice(json!({"metadata": {"labels": null}}));
    let text = endpoint_slice(&slice).unwrap_err().to_string();
    assert!(text.starts_with("EndpointSlice ns/svc-abc: "), "{text:?}");
    assert!(text.contains("kubernetes.io/service-name"), "{text:?}");

    let node = node(json!({"spec": {"podCIDRs": ["10.244.1.0/33"]}}));
    let text = node_info(&node).unwrap_err().to_string();
    assert!(text.starts_with("Node node-a: "), "{text:?}");
    assert!(text.contains("spec.podCIDRs[0]") && text.contains("10.244.1.0/33"));
}

// ---- EndpointSlices ------------------------------------------------------------------------

/// `ns/svc-abc` of service `svc`: IPv4, port `http` 8080/TCP, one endpoint `10.0.0.1`.
fn slice(patch: Value) -> EndpointSlice {
    object(
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "namespace": "ns",
                "name": "svc-abc",
                "labels": {"kubernetes.io/service-name": "svc"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.0.0.1"]}],
        }),
        &patch,
    )
}

/// A converted endpoint (port 0 until merged) with default conditions.
fn slice_ep(addr: &str) -> Endpoint {
    Endpoint {
        ip: ip(addr),
        port: 0,
        ready: true,
        serving: true,
        terminating: false,
        node_name: None,
        zone: None,
        zone_hints: Vec::new(),
        node_hints: Vec::new(),
    }
}

fn http_port() -> SlicePort {
    SlicePort {
        name: "http".into(),
        protocol: Protocol::Tcp,
        port: 8080,
    }
}

fn slice_info(ports: Vec<SlicePort>, endpoints: Vec<Endpoint>) -> SliceInfo {
    SliceInfo {
        service: svc_name("ns", "svc"),
        slice_name: "svc-abc".into(),
        ports,
        endpoints,
    }
}

#[test]
fn endpoint_conditions_defaults() {
    // (description, conditions, want (ready, serving, terminating))
    let rows: Vec<(&str, Value, (bool, bool, bool))> = vec![
        (
            "no conditions: ready, serving",
            Value::Null,
            (true, true, false),
        ),
        (
            "empty conditions: ready, serving",
            json!({}),
            (true, true, false),
        ),
        (
            "ready nil means true",
            json!({"serving": true}),
            (true, true, false),
        ),
        (
            "serving nil means true (ready=true)",
            json!({"ready": true}),
            (true, true, false),
        ),
        (
            "serving nil means true even when not ready, as upstream's endpointslicecache",
            json!({"ready": false}),
            (false, true, false),
        ),
        (
            "not ready, serving nil, terminating: a serving-terminating fallback endpoint",
            json!({"ready": false, "terminating": true}),
            (false, true, true),
        ),
        (
            "terminating nil means false",
            json!({"ready": false, "serving": false}),
            (false, false, false),
        ),
        (
            "serving and terminating",
            json!({"ready": false, "serving": true, "terminating": true}),
            (false, true, true),
        ),
        (
            "terminating, not serving",
            json!({"ready": false, "serving": false, "terminating": true}),
            (false, false, true),
        ),
        (
            "ready nil, serving false",
            json!({"serving": false}),
            (true, false, false),
        ),
    ];
    let mut failures = Vec::new();
    for (name, conditions, want) in &rows {
        let mut endpoint = json!({"addresses": ["10.0.0.1"]});
        if !conditions.is_null() {
            endpoint["conditions"] = conditions.clone();
        }
        let got = endpoint_slice(&slice(json!({"endpoints": [endpoint]}))).map(|s| {
            s.map(|s| {
                s.endpoints
                    .iter()
                    .map(|e| (e.ready, e.serving, e.terminating))
                    .collect::<Vec<_>>()
            })
        });
        if got != Ok(Some(vec![*want])) {
            failures.push(format!("  {name}: got {got:?}, want {want:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "endpoint conditions:\n{}",
        failures.join("\n")
    );
}

#[test]
fn endpoint_slices() {
    let rows: Vec<(&str, Value, Option<SliceInfo>)> = vec![
        (
            "basic slice",
            json!({}),
            Some(slice_info(vec![http_port()], vec![slice_ep("10.0.0.1")])),
        ),
        (
            "service name comes from the label, namespace from the slice",
            json!({"metadata": {"name": "web-xyz", "namespace": "other",
                                "labels": {"kubernetes.io/service-name": "web"}}}),
            Some(SliceInfo {
                service: svc_name("other", "web"),
                slice_name: "web-xyz".into(),
                ports: vec![http_port()],
                endpoints: vec![slice_ep("10.0.0.1")],
            }),
        ),
        (
            "FQDN slice: ignored",
            json!({"addressType": "FQDN",
                                       "endpoints": [{"addresses": ["db.example.com"]}]}),
            None,
        ),
        (
            "IPv6 slice",
            json!({"addressType": "IPv6", "endpoints": [{"addresses": ["fd00::1"]}]}),
            Some(slice_info(vec![http_port()], vec![slice_ep("fd00::1")])),
        ),
        (
            "port without a number is skipped; name and protocol default to \"\" and TCP",
            json!({"ports": [{"name": "all"}, {"port": 9090}, {"name": "dns", "port": 53,
                                                               "protocol": "UDP"}]}),
            Some(slice_info(
                vec![
                    SlicePort {
                        name: String::new(),
                        protocol: Protocol::Tcp,
                        port: 9090,
                    },
                    SlicePort {
                        name: "dns".into(),
                        protocol: Protocol::Udp,
                        port: 53,
                    },
                ],
                vec![slice_ep("10.0.0.1")],
            )),
        ),
        (
            "no ports and no endpoints",
            json!({"ports": null, "endpoints": null}),
            Some(slice_info(vec![], vec![])),
        ),
        (
            "endpoint without addresses is skipped; only the first address is used",
            json!({"endpoints": [{"addresses": []},
                                 {"addresses": ["10.0.0.2", "10.0.0.3"]}]}),
            Some(slice_info(vec![http_port()], vec![slice_ep("10.0.0.2")])),
        ),
        (
            "nodeName, zone and hints",
            json!({"endpoints": [
                {"addresses": ["10.0.0.1"], "nodeName": "node-a", "zone": "zone-a",
                 "hints": {"forZones": [{"name": "zone-a"}, {"name": "zone-b"}],
                           "forNodes": [{"name": "node-a"}]}},
                {"addresses": ["10.0.0.2"], "hints": {}},
            ]}),
            Some(slice_info(
                vec![http_port()],
                vec![
                    Endpoint {
                        node_name: Some("node-a".into()),
                        zone: Some("zone-a".into()),
                        zone_hints: vec!["zone-a".into(), "zone-b".into()],
                        node_hints: vec!["node-a".into()],
                        ..slice_ep("10.0.0.1")
                    },
                    slice_ep("10.0.0.2"),
                ],
            )),
        ),
    ];
    let mut failures = Vec::new();
    for (name, patch, want) in &rows {
        match endpoint_slice(&slice(patch.clone())) {
            Ok(got) if got == *want => {}
            got => failures.push(format!("  {name}:\n    got  {got:?}\n    want {want:?}")),
        }
    }
    assert!(
        failures.is_empty(),
        "endpoint slices:\n{}",
        failures.join("\n")
    );
}

#[test]
fn endpoint_slice_errors() {
    let rows: Vec<(&str, Value, &str, InvalidField)> = vec![
        (
            "missing service-name label",
            json!({"metadata": {"labels": {"kubernetes.io/service-name": null, "app": "web"}}}),
            "ns/svc-abc",
            InvalidField::MissingServiceLabel,
        ),
        (
            "no labels at all",
            json!({"metadata": {"labels": null}}),
            "ns/svc-abc",
            InvalidField::MissingServiceLabel,
        ),
        (
            "empty service-name label",
            json!({"metadata": {"labels": {"kubernetes.io/service-name": ""}}}),
            "ns/svc-abc",
            InvalidField::MissingServiceLabel,
        ),
        (
            "IPv6 address in an IPv4 slice",
            json!({"endpoints": [{"addresses": ["10.0.0.1"]}, {"addresses": ["fd00::1"]}]}),
            "ns/svc-abc",
            InvalidField::FamilyMismatch {
                field: "endpoints[1].addresses[0]".into(),
                value: "fd00::1".into(),
                address_type: "IPv4".into(),
            },
        ),
        (
            "IPv4 address in an IPv6 slice",
            json!({"addressType": "IPv6"}),
            "ns/svc-abc",
            InvalidField::FamilyMismatch {
                field: "endpoints[0].addresses[0]".into(),
                value: "10.0.0.1".into(),
                address_type: "IPv6".into(),
            },
        ),
        (
            "unknown addressType",
            json!({"addressType": "IPv5"}),
            "ns/svc-abc",
            InvalidField::BadAddressType("IPv5".into()),
        ),
        (
            "bad endpoint address",
            json!({"endpoints": [{"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.256"]}]}),
            "ns/svc-abc",
            InvalidField::BadIp {
                field: "endpoints[1].addresses[0]".into(),
                value: "10.0.0.256".into(),
            },
        ),
        (
            "bad port protocol",
            json!({"ports": [{"port": 80, "protocol": "QUIC"}]}),
            "ns/svc-abc",
            InvalidField::BadProtocol {
                field: "ports[0].protocol".into(),
                value: "QUIC".into(),
            },
        ),
        (
            "port 70000",
            json!({"ports": [{"port": 80}, {"port": 70000}]}),
            "ns/svc-abc",
            InvalidField::BadPort {
                field: "ports[1].port".into(),
                value: 70000,
            },
        ),
        (
            "missing name",
            json!({"metadata": {"name": null}}),
            "ns/<unnamed>",
            InvalidField::MissingName,
        ),
        (
            "missing namespace",
            json!({"metadata": {"namespace": null}}),
            "svc-abc",
            InvalidField::MissingName,
        ),
    ];
    let mut failures = Vec::new();
    for (name, patch, object, reason) in &rows {
        let want = ConvertError {
            kind: "EndpointSlice",
            object: object.to_string(),
            reason: reason.clone(),
        };
        match endpoint_slice(&slice(patch.clone())) {
            Err(got) if got == want => {}
            got => failures.push(format!("  {name}:\n    got  {got:?}\n    want {want:?}")),
        }
    }
    assert!(
        failures.is_empty(),
        "endpoint slice errors: {} of {} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

#[test]
fn slice_port_endpoints_expand_every_port() {
    let info = endpoint_slice(&slice(json!({
        "ports": [{"name": "http", "port": 8080}, {"name": "dns", "port": 53, "protocol": "UDP"}],
        "endpoints": [{"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.2"]}],
    })))
    .unwrap()
    .unwrap();
    let got: Vec<(String, Protocol, String)> = info
        .port_endpoints()
        .map(|(spn, ep)| (spn.to_string(), spn.protocol, ep.addr_string()))
        .collect();
    let want = [
        ("ns/svc:http", Protocol::Tcp, "10.0.0.1:8080"),
        ("ns/svc:http", Protocol::Tcp, "10.0.0.2:8080"),
        ("ns/svc:dns", Protocol::Udp, "10.0.0.1:53"),
        ("ns/svc:dns", Protocol::Udp, "10.0.0.2:53"),
    ]
    .map(|(s, p, a)| (s.to_string(), p, a.to_string()));
    assert_eq!(got, want);
}

// ---- Nodes ---------------------------------------------------------------------------------

/// `node-a`, no labels, no status.
fn node(patch: Value) -> Node {
    object(
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}}),
        &patch,
    )
}

#[test]
fn nodes() {
    let base = || NodeInfo {
        name: "node-a".into(),
        ..NodeInfo::default()
    };
    let rows: Vec<(&str, Value, NodeInfo)> = vec![
        ("bare node", json!({}), base()),
        (
            "zone label",
            json!({"metadata": {"labels": {"topology.kubernetes.io/zone": "zone-a",
                                           "kubernetes.io/hostname": "node-a"}}}),
            NodeInfo {
                zone: Some("zone-a".into()),
                ..base()
            },
        ),
        (
            "other labels: no zone",
            json!({"metadata": {"labels": {"failure-domain.beta.kubernetes.io/zone": "z"}}}),
            base(),
        ),
        (
            "addresses: InternalIP and ExternalIP only, deduplicated, in order",
            json!({"status": {"addresses": [
                {"type": "Hostname", "address": "node-a"},
                {"type": "InternalIP", "address": "192.168.0.10"},
                {"type": "InternalDNS", "address": "node-a.internal"},
                {"type": "ExternalIP", "address": "203.0.113.10"},
                {"type": "InternalIP", "address": "fd00::10"},
                {"type": "ExternalIP", "address": "192.168.0.10"},
            ]}}),
            NodeInfo {
                addresses: vec![ip("192.168.0.10"), ip("203.0.113.10"), ip("fd00::10")],
                ..base()
            },
        ),
        (
            "podCIDRs of both families",
            json!({"spec": {"podCIDR": "10.244.1.0/24",
                            "podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64"]}}),
            NodeInfo {
                pod_cidrs: vec![net("10.244.1.0/24"), net("fd00:10:244:1::/64")],
                ..base()
            },
        ),
        (
            "podCIDR alone",
            json!({"spec": {"podCIDR": "10.244.2.0/24"}}),
            NodeInfo {
                pod_cidrs: vec![net("10.244.2.0/24")],
                ..base()
            },
        ),
        (
            "deletionTimestamp: deleting",
            json!({"metadata": {"deletionTimestamp": "2024-01-01T00:00:00Z"}}),
            NodeInfo {
                deleting: true,
                ..base()
            },
        ),
    ];
    let mut failures = Vec::new();
    for (name, patch, want) in &rows {
        match node_info(&node(patch.clone())) {
            Ok(got) if got == *want => {}
            got => failures.push(format!("  {name}:\n    got  {got:?}\n    want {want:?}")),
        }
    }

    let err_rows: Vec<(&str, Value, &str, InvalidField)> = vec![
        (
            "missing name",
            json!({"metadata": {"name": null}}),
            "",
            InvalidField::MissingName,
        ),
        (
            "bad address",
            json!({"status": {"addresses": [{"type": "Hostname", "address": "node-a"},
                                            {"type": "InternalIP", "address": "node-a"}]}}),
            "node-a",
            InvalidField::BadIp {
                field: "status.addresses[1].address".into(),
                value: "node-a".into(),
            },
        ),
        (
            "bad podCIDR",
            json!({"spec": {"podCIDRs": ["10.244.1.0/24", "10.244.1.0"]}}),
            "node-a",
            InvalidField::BadCidr {
                field: "spec.podCIDRs[1]".into(),
                value: "10.244.1.0".into(),
            },
        ),
    ];
    for (name, patch, object, reason) in &err_rows {
        let want = ConvertError {
            kind: "Node",
            object: object.to_string(),
            reason: reason.clone(),
        };
        match node_info(&node(patch.clone())) {
            Err(got) if got == want => {}
            got => failures.push(format!("  {name}:\n    got  {got:?}\n    want {want:?}")),
        }
    }
    assert!(failures.is_empty(), "nodes:\n{}", failures.join("\n"));
}
