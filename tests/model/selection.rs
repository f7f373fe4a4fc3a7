//! `svcproxy::model::select`: one table per rule of upstream's `CategorizeEndpoints`.
//!
//! Conventions: this node is `node-a` in `zone-a`; `10.0.0.1x` endpoints live on `node-a`
//! (local), `10.0.0.2x` on `node-b` and `10.0.0.3x` on `node-c` (remote). Expected endpoint
//! lists are IP texts in the order `select` must return them (the input order).

use std::collections::BTreeSet;

use serde_json::json;
use svcproxy::model::convert::service_ports;
use svcproxy::model::{
    Endpoint, IpFamily, NodeInfo, PathPlan, Protocol, Selection, ServicePort, select,
};

use crate::common::{EndpointExt, NODE, ep, ip, node, object, service_port};

use PathPlan::{Cluster, Drop, Local, Reject};

const NONE: &[&str] = &[];

/// What one row expects from `select`.
struct Want {
    cluster: &'static [&'static str],
    local: &'static [&'static str],
    internal: PathPlan,
    /// `None`: the port has no external destination in this family, the plan is meaningless.
    external: Option<PathPlan>,
    has_endpoints: bool,
    short_circuit: bool,
}

struct Case {
    name: &'static str,
    port: ServicePort,
    family: IpFamily,
    node: NodeInfo,
    endpoints: Vec<Endpoint>,
    want: Want,
}

/// A row for IPv4 on [`node`].
fn row(name: &'static str, port: ServicePort, endpoints: Vec<Endpoint>, want: Want) -> Case {
    Case {
        name,
        port,
        family: IpFamily::V4,
        node: node(),
        endpoints,
        want,
    }
}

fn ips(eps: &[&Endpoint]) -> Vec<String> {
    eps.iter().map(|e| e.ip.to_string()).collect()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Invariants every selection must satisfy, whatever the rule: `reachable` is exactly the
/// deduplicated union of `cluster` and `local`, cluster endpoints first in their order.
fn check_reachable(sel: &Selection<'_>) -> Result<(), String> {
    let addrs: Vec<String> = sel.reachable.iter().map(|e| e.addr_string()).collect();
    let unique: BTreeSet<&String> = addrs.iter().collect();
    if unique.len() != addrs.len() {
        return Err(format!("reachable has duplicates: {addrs:?}"));
    }
    let union: BTreeSet<String> = sel
        .cluster
        .iter()
        .chain(&sel.local)
        .map(|e| e.addr_string())
        .collect();
    if unique.into_iter().cloned().collect::<BTreeSet<_>>() != union {
        return Err(format!(
            "reachable {addrs:?} is not cluster ∪ local {union:?}"
        ));
    }
    if sel.reachable[..sel.cluster.len()] != sel.cluster[..] {
        return Err("reachable does not start with the cluster endpoints".into());
    }
    Ok(())
}

fn run(table: &str, cases: Vec<Case>) {
    let mut failures = Vec::new();
    for c in &cases {
        let sel = select(&c.port, &c.endpoints, c.family, &c.node);
        let mut errs = Vec::new();
        if ips(&sel.cluster) != strings(c.want.cluster) {
            errs.push(format!(
                "cluster = {:?}, want {:?}",
                ips(&sel.cluster),
                c.want.cluster
            ));
        }
        if ips(&sel.local) != strings(c.want.local) {
            errs.push(format!(
                "local = {:?}, want {:?}",
                ips(&sel.local),
                c.want.local
            ));
        }
        if sel.internal != c.want.internal {
            errs.push(format!(
                "internal = {:?}, want {:?}",
                sel.internal, c.want.internal
            ));
        }
        if let Some(external) = c.want.external
            && sel.external != external
        {
            errs.push(format!("external = {:?}, want {external:?}", sel.external));
        }
        if sel.has_endpoints != c.want.has_endpoints {
            errs.push(format!(
                "has_endpoints = {}, want {}",
                sel.has_endpoints, c.want.has_endpoints
            ));
        }
        let sc = sel.short_circuit_local_traffic(&c.port);
        if sc != c.want.short_circuit {
            errs.push(format!(
                "short_circuit_local_traffic = {sc}, want {}",
                c.want.short_circuit
            ));
        }
        if sel.uses_cluster_chain() == sel.cluster.is_empty()
            || sel.uses_local_chain() == sel.local.is_empty()
        {
            errs.push("uses_*_chain disagree with the endpoint sets".into());
        }
        if let Err(e) = check_reachable(&sel) {
            errs.push(e);
        }
        if !errs.is_empty() {
            failures.push(format!("  {}: {}", c.name, errs.join("; ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{table}: {} of {} rows failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

// ---- service ports -------------------------------------------------------------------------

fn cluster_ip() -> ServicePort {
    service_port("ns", "svc", "http", Protocol::Tcp, 80)
}

fn itp_local() -> ServicePort {
    ServicePort {
        internal_policy_local: true,
        ..cluster_ip()
    }
}

fn node_port() -> ServicePort {
    ServicePort {
        node_port: Some(30080),
        ..cluster_ip()
    }
}

/// NodePort, externalTrafficPolicy Local.
fn etp_local_node_port() -> ServicePort {
    ServicePort {
        external_policy_local: true,
        ..node_port()
    }
}

/// LoadBalancer without a node port (allocateLoadBalancerNodePorts false), ETP Local.
fn etp_local_lb() -> ServicePort {
    ServicePort {
        load_balancer_ips: vec![ip("192.0.2.10")],
        external_policy_local: true,
        ..cluster_ip()
    }
}

/// ClusterIP with an external IP, ETP Local.
fn etp_local_external_ip() -> ServicePort {
    ServicePort {
        external_ips: vec![ip("203.0.113.5")],
        external_policy_local: true,
        ..cluster_ip()
    }
}

fn want(
    cluster: &'static [&'static str],
    local: &'static [&'static str],
    internal: PathPlan,
    external: Option<PathPlan>,
) -> Want {
    Want {
        cluster,
        local,
        internal,
        external,
        has_endpoints: internal != Reject,
        short_circuit: false,
    }
}

// ---- tables --------------------------------------------------------------------------------

#[test]
fn cluster_policy() {
    let port = cluster_ip;
    run(
        "cluster policy",
        vec![
            row(
                "every ready endpoint, on any node or none, is used",
                port(),
                vec![
                    ep("10.0.0.11", NODE),
                    ep("10.0.0.21", "node-b"),
                    ep("10.0.0.41", ""),
                ],
                want(
                    &["10.0.0.11", "10.0.0.21", "10.0.0.41"],
                    NONE,
                    Cluster,
                    Some(Cluster),
                ),
            ),
            row(
                "not-ready endpoints are excluded",
                port(),
                vec![ep("10.0.0.11", NODE).not_ready(), ep("10.0.0.21", "node-b")],
                want(&["10.0.0.21"], NONE, Cluster, Some(Cluster)),
            ),
            row(
                "ready=false serving=true (not terminating) is not used",
                port(),
                vec![ep("10.0.0.11", NODE).conditions(false, true, false)],
                want(NONE, NONE, Reject, Some(Reject)),
            ),
            row(
                "serving+terminating endpoints are not used while any endpoint is ready",
                port(),
                vec![
                    ep("10.0.0.11", NODE).terminating(true),
                    ep("10.0.0.21", "node-b"),
                ],
                want(&["10.0.0.21"], NONE, Cluster, Some(Cluster)),
            ),
            row(
                "no ready endpoint: fall back to serving+terminating ones on any node (KEP-1669)",
                port(),
                vec![
                    ep("10.0.0.11", NODE).terminating(true),
                    ep("10.0.0.21", "node-b").terminating(true),
                    ep("10.0.0.22", "node-b").terminating(false),
                    ep("10.0.0.31", "node-c").not_ready(),
                ],
                want(&["10.0.0.11", "10.0.0.21"], NONE, Cluster, Some(Cluster)),
            ),
            row(
                "serving=false terminating=true is never used: reject",
                port(),
                vec![
                    ep("10.0.0.11", NODE).terminating(false),
                    ep("10.0.0.21", "node-b").terminating(false),
                ],
                want(NONE, NONE, Reject, Some(Reject)),
            ),
            row(
                "only not-ready endpoints: reject",
                port(),
                vec![
                    ep("10.0.0.11", NODE).not_ready(),
                    ep("10.0.0.21", "node-b").not_ready(),
                ],
                want(NONE, NONE, Reject, Some(Reject)),
            ),
            row(
                "no endpoints: reject",
                port(),
                vec![],
                want(NONE, NONE, Reject, Some(Reject)),
            ),
            row(
                "NodePort with ETP Cluster: external traffic uses the cluster set too",
                node_port(),
                vec![ep("10.0.0.11", NODE), ep("10.0.0.21", "node-b")],
                want(&["10.0.0.11", "10.0.0.21"], NONE, Cluster, Some(Cluster)),
            ),
            row(
                "NodePort with ETP Cluster and no endpoints: both paths reject",
                node_port(),
                vec![ep("10.0.0.21", "node-b").terminating(false)],
                want(NONE, NONE, Reject, Some(Reject)),
            ),
        ],
    );
}

#[test]
fn internal_traffic_policy_local() {
    let port = itp_local;
    run(
        "internalTrafficPolicy Local",
        vec![
            row(
                "only this node's ready endpoints; no cluster set is built",
                port(),
                vec![
                    ep("10.0.0.11", NODE),
                    ep("10.0.0.12", NODE),
                    ep("10.0.0.21", "node-b"),
                ],
                want(NONE, &["10.0.0.11", "10.0.0.12"], Local, None),
            ),
            row(
                "no local endpoint: drop, although the service has endpoints",
                port(),
                vec![ep("10.0.0.21", "node-b"), ep("10.0.0.31", "node-c")],
                want(NONE, NONE, Drop, None),
            ),
            row(
                "local endpoint not ready: drop",
                port(),
                vec![ep("10.0.0.11", NODE).not_ready(), ep("10.0.0.21", "node-b")],
                want(NONE, NONE, Drop, None),
            ),
            row(
                "endpoint without nodeName is never local",
                port(),
                vec![ep("10.0.0.41", "")],
                want(NONE, NONE, Drop, None),
            ),
            row(
                "only a remote serving+terminating endpoint: has endpoints, so drop not reject",
                port(),
                vec![ep("10.0.0.21", "node-b").terminating(true)],
                want(NONE, NONE, Drop, None),
            ),
            row(
                "no usable endpoint anywhere: reject",
                port(),
                vec![
                    ep("10.0.0.11", NODE).not_ready(),
                    ep("10.0.0.21", "node-b").terminating(false),
                ],
                want(NONE, NONE, Reject, None),
            ),
            row(
                "no endpoints: reject",
                port(),
                vec![],
                want(NONE, NONE, Reject, None),
            ),
            row(
                "no local ready endpoint: fall back to local serving+terminating ones",
                port(),
                vec![
                    ep("10.0.0.11", NODE).terminating(true),
                    ep("10.0.0.12", NODE).terminating(false),
                    ep("10.0.0.21", "node-b"),
                ],
                want(NONE, &["10.0.0.11"], Local, None),
            ),
            row(
                "local terminating fallback even when nothing is ready anywhere",
                port(),
                vec![
                    ep("10.0.0.11", NODE).terminating(true),
                    ep("10.0.0.21", "node-b").terminating(true),
                ],
                want(NONE, &["10.0.0.11"], Local, None),
            ),
            row(
                "a local ready endpoint wins over local serving+terminating ones",
                port(),
                vec![
                    ep("10.0.0.11", NODE).terminating(true),
                    ep("10.0.0.12", NODE),
                ],
                want(NONE, &["10.0.0.12"], Local, None),
            ),
            row(
                "local serving=false terminating=true is never used: drop",
                port(),
                vec![
                    ep("10.0.0.11", NODE).terminating(false),
                    ep("10.0.0.21", "node-b"),
                ],
                want(NONE, NONE, Drop, None),
            ),
            row(
                "with a NodePort (ETP Cluster) the cluster set is still built for external traffic",
                ServicePort {
                    node_port: Some(30080),
                    ..port()
                },
                vec![ep("10.0.0.11", NODE), ep("10.0.0.21", "node-b")],
                want(
                    &["10.0.0.11", "10.0.0.21"],
                    &["10.0.0.11"],
                    Local,
                    Some(Cluster),
                ),
            ),
            row(
                "with a NodePort and no local endpoint: internal drop, external cluster",
                ServicePort {
                    node_port: Some(30080),
                    ..port()
                },
                vec![ep("10.0.0.21", "node-b")],
                want(&["10.0.0.21"], NONE, Drop, Some(Cluster)),
            ),
        ],
    );
}

#[test]
fn external_traffic_policy_local() {
    let local = |w: Want| Want {
        short_circuit: w.has_endpoints,
        ..w
    };
    let mut cases = Vec::new();
    for (kind, port) in [
        ("NodePort", etp_local_node_port as fn() -> ServicePort),
        ("LoadBalancer", etp_local_lb),
        ("externalIP", etp_local_external_ip),
    ] {
        let name = |s: &str| -> &'static str { format!("{kind}: {s}").leak() };
        cases.extend([
            row(
                name("local endpoint: external Local, cluster set still complete (short-circuit)"),
                port(),
                vec![ep("10.0.0.11", NODE), ep("10.0.0.21", "node-b")],
                local(want(
                    &["10.0.0.11", "10.0.0.21"],
                    &["10.0.0.11"],
                    Cluster,
                    Some(Local),
                )),
            ),
            row(
                name("no local endpoint: external Drop, internal still Cluster"),
                port(),
                vec![ep("10.0.0.11", NODE).not_ready(), ep("10.0.0.21", "node-b")],
                local(want(&["10.0.0.21"], NONE, Cluster, Some(Drop))),
            ),
            row(
                name("no endpoints at all: both paths reject, no short-circuit"),
                port(),
                vec![ep("10.0.0.11", NODE).terminating(false)],
                local(want(NONE, NONE, Reject, Some(Reject))),
            ),
            row(
                name("local serving+terminating fallback while remote endpoints are ready"),
                port(),
                vec![
                    ep("10.0.0.11", NODE).terminating(true),
                    ep("10.0.0.21", "node-b"),
                ],
                local(want(&["10.0.0.21"], &["10.0.0.11"], Cluster, Some(Local))),
            ),
            row(
                name("only terminating endpoints: both sets fall back"),
                port(),
                vec![
                    ep("10.0.0.11", NODE).terminating(true),
                    ep("10.0.0.21", "node-b").terminating(true),
                ],
                local(want(
                    &["10.0.0.11", "10.0.0.21"],
                    &["10.0.0.11"],
                    Cluster,
                    Some(Local),
                )),
            ),
            row(
                name("ITP Local too: both paths Local, cluster set kept for short-circuit"),
                ServicePort {
                    internal_policy_local: true,
                    ..port()
                },
                vec![ep("10.0.0.11", NODE), ep("10.0.0.21", "node-b")],
                local(want(
                    &["10.0.0.11", "10.0.0.21"],
                    &["10.0.0.11"],
                    Local,
                    Some(Local),
                )),
            ),
            row(
                name("ITP Local too, no local endpoint: both paths Drop"),
                ServicePort {
                    internal_policy_local: true,
                    ..port()
                },
                vec![ep("10.0.0.21", "node-b")],
                local(want(&["10.0.0.21"], NONE, Drop, Some(Drop))),
            ),
        ]);
    }
    run("externalTrafficPolicy Local", cases);
}

/// ETP Local only matters for externally reachable services: conversion clears the flag for a
/// ClusterIP service without externalIPs, and selection then behaves like ETP Cluster.
#[test]
fn etp_local_on_cluster_ip_only_service_has_no_effect() {
    let svc = |patch: serde_json::Value| {
        let svc = object(
            json!({
                "metadata": {"namespace": "ns", "name": "svc"},
                "spec": {
                    "type": "ClusterIP",
                    "clusterIP": "10.96.0.10",
                    "externalTrafficPolicy": "Local",
                    "ports": [{"name": "http", "port": 80}],
                },
            }),
            &patch,
        );
        let mut ports = service_ports(&svc).expect("valid service");
        assert_eq!(ports.len(), 1);
        ports.remove(0)
    };
    let endpoints = vec![ep("10.0.0.11", NODE), ep("10.0.0.21", "node-b")];

    let plain = svc(json!({}));
    assert!(!plain.external_policy_local, "ClusterIP-only: flag cleared");
    let sel = select(&plain, &endpoints, IpFamily::V4, &node());
    assert_eq!(ips(&sel.cluster), ["10.0.0.11", "10.0.0.21"]);
    assert!(sel.local.is_empty(), "no local set: {:?}", ips(&sel.local));
    assert_eq!((sel.internal, sel.external), (Cluster, Cluster));
    assert!(!sel.short_circuit_local_traffic(&plain));
    assert_eq!(
        sel,
        select(&cluster_ip(), &endpoints, IpFamily::V4, &node())
    );

    // The same service with an external IP is externally accessible: ETP Local applies.
    let external = svc(json!({"spec": {"externalIPs": ["203.0.113.5"]}}));
    assert!(external.external_policy_local);
    let sel = select(&external, &endpoints, IpFamily::V4, &node());
    assert_eq!(ips(&sel.local), ["10.0.0.11"]);
    assert_eq!((sel.internal, sel.external), (Cluster, Local));
    assert!(sel.short_circuit_local_traffic(&external));
    let sel = select(&external, &endpoints[1..], IpFamily::V4, &node());
    assert_eq!((sel.internal, sel.external), (Cluster, Drop));
}

#[test]
fn topology_hints() {
    let no_zone = NodeInfo {
        zone: None,
        ..node()
    };
    let cases = vec![
        row(
            "zone hints: every ready endpoint hinted, one for this zone: only this zone's",
            cluster_ip(),
            vec![
                ep("10.0.0.21", "node-b").zones(&["zone-a"]),
                ep("10.0.0.31", "node-c").zones(&["zone-c"]),
                ep("10.0.0.32", "node-c").zones(&["zone-c", "zone-a"]),
            ],
            want(&["10.0.0.21", "10.0.0.32"], NONE, Cluster, Some(Cluster)),
        ),
        row(
            "zone hints ignored when one ready endpoint has none",
            cluster_ip(),
            vec![
                ep("10.0.0.21", "node-b").zones(&["zone-a"]),
                ep("10.0.0.31", "node-c"),
            ],
            want(&["10.0.0.21", "10.0.0.31"], NONE, Cluster, Some(Cluster)),
        ),
        row(
            "a not-ready endpoint without hints does not disable zone hints",
            cluster_ip(),
            vec![
                ep("10.0.0.21", "node-b").zones(&["zone-a"]),
                ep("10.0.0.31", "node-c").zones(&["zone-c"]),
                ep("10.0.0.32", "node-c").not_ready(),
            ],
            want(&["10.0.0.21"], NONE, Cluster, Some(Cluster)),
        ),
        row(
            "zone hints ignored when none is for this zone",
            cluster_ip(),
            vec![
                ep("10.0.0.21", "node-b").zones(&["zone-b"]),
                ep("10.0.0.31", "node-c").zones(&["zone-c"]),
            ],
            want(&["10.0.0.21", "10.0.0.31"], NONE, Cluster, Some(Cluster)),
        ),
        Case {
            node: no_zone.clone(),
            ..row(
                "node without zone label ignores zone hints",
                cluster_ip(),
                vec![
                    ep("10.0.0.21", "node-b").zones(&["zone-a"]),
                    ep("10.0.0.31", "node-c").zones(&["zone-c"]),
                ],
                want(&["10.0.0.21", "10.0.0.31"], NONE, Cluster, Some(Cluster)),
            )
        },
        Case {
            node: no_zone,
            ..row(
                "node without zone label still follows node hints",
                cluster_ip(),
                vec![
                    ep("10.0.0.11", NODE).nodes(&[NODE]),
                    ep("10.0.0.31", "node-c").nodes(&["node-c"]),
                ],
                want(&["10.0.0.11"], NONE, Cluster, Some(Cluster)),
            )
        },
        row(
            "node hints on every ready endpoint, one for this node: preferred over zone hints",
            cluster_ip(),
            vec![
                ep("10.0.0.11", NODE).nodes(&[NODE]).zones(&["zone-c"]),
                ep("10.0.0.21", "node-b")
                    .nodes(&["node-b"])
                    .zones(&["zone-a"]),
            ],
            want(&["10.0.0.11"], NONE, Cluster, Some(Cluster)),
        ),
        row(
            "node hints for other nodes only: zone hints apply",
            cluster_ip(),
            vec![
                ep("10.0.0.21", "node-b")
                    .nodes(&["node-b"])
                    .zones(&["zone-a"]),
                ep("10.0.0.31", "node-c")
                    .nodes(&["node-c"])
                    .zones(&["zone-c"]),
            ],
            want(&["10.0.0.21"], NONE, Cluster, Some(Cluster)),
        ),
        row(
            "node hints missing on one ready endpoint: zone hints apply",
            cluster_ip(),
            vec![
                ep("10.0.0.11", NODE).nodes(&[NODE]).zones(&["zone-c"]),
                ep("10.0.0.21", "node-b").zones(&["zone-a"]),
            ],
            want(&["10.0.0.21"], NONE, Cluster, Some(Cluster)),
        ),
        row(
            "neither node nor zone hints complete: every ready endpoint",
            cluster_ip(),
            vec![
                ep("10.0.0.11", NODE).nodes(&[NODE]),
                ep("10.0.0.21", "node-b").zones(&["zone-a"]),
            ],
            want(&["10.0.0.11", "10.0.0.21"], NONE, Cluster, Some(Cluster)),
        ),
        row(
            "terminating fallback ignores hints",
            cluster_ip(),
            vec![
                ep("10.0.0.21", "node-b")
                    .terminating(true)
                    .zones(&["zone-a"]),
                ep("10.0.0.31", "node-c")
                    .terminating(true)
                    .zones(&["zone-c"]),
            ],
            want(&["10.0.0.21", "10.0.0.31"], NONE, Cluster, Some(Cluster)),
        ),
        row(
            "ITP Local ignores hints",
            itp_local(),
            vec![
                ep("10.0.0.11", NODE).zones(&["zone-c"]).nodes(&["node-c"]),
                ep("10.0.0.21", "node-b").zones(&["zone-a"]).nodes(&[NODE]),
            ],
            want(NONE, &["10.0.0.11"], Local, None),
        ),
        row(
            "ETP Local: hints narrow the cluster set but not the local set",
            etp_local_node_port(),
            vec![
                ep("10.0.0.11", NODE).zones(&["zone-c"]),
                ep("10.0.0.21", "node-b").zones(&["zone-a"]),
            ],
            Want {
                short_circuit: true,
                ..want(&["10.0.0.21"], &["10.0.0.11"], Cluster, Some(Local))
            },
        ),
    ];
    run("topology hints", cases);
}

#[test]
fn family_filtering() {
    let dual = || ServicePort {
        cluster_ips: vec![ip("10.96.0.10"), ip("fd00::10")],
        ..cluster_ip()
    };
    let mixed = || {
        vec![
            ep("10.0.0.11", NODE),
            ep("10.0.0.21", "node-b"),
            ep("fd00::11", NODE),
            ep("fd00::21", "node-b"),
        ]
    };
    let v6 = |c: Case| Case {
        family: IpFamily::V6,
        ..c
    };
    let cases = vec![
        row(
            "IPv4: IPv6 endpoints are not selected",
            dual(),
            mixed(),
            want(&["10.0.0.11", "10.0.0.21"], NONE, Cluster, Some(Cluster)),
        ),
        v6(row(
            "IPv6: IPv4 endpoints are not selected",
            dual(),
            mixed(),
            want(&["fd00::11", "fd00::21"], NONE, Cluster, Some(Cluster)),
        )),
        row(
            "IPv4 with only IPv6 endpoints: reject",
            dual(),
            vec![ep("fd00::11", NODE)],
            want(NONE, NONE, Reject, Some(Reject)),
        ),
        v6(row(
            "IPv6 with only IPv4 endpoints: reject",
            dual(),
            vec![ep("10.0.0.11", NODE)],
            want(NONE, NONE, Reject, Some(Reject)),
        )),
        v6(row(
            "IPv4 serving+terminating endpoints are no fallback for IPv6",
            dual(),
            vec![
                ep("10.0.0.11", NODE).terminating(true),
                ep("fd00::21", "node-b").not_ready(),
            ],
            want(NONE, NONE, Reject, Some(Reject)),
        )),
        v6(row(
            "ITP Local, IPv6: a local IPv4 endpoint does not count",
            ServicePort {
                internal_policy_local: true,
                ..dual()
            },
            vec![ep("10.0.0.11", NODE), ep("fd00::21", "node-b")],
            want(NONE, NONE, Drop, None),
        )),
        v6(row(
            "ETP Local, IPv6: only IPv4 endpoints anywhere: reject, no short-circuit",
            ServicePort {
                node_port: Some(30080),
                external_policy_local: true,
                ..dual()
            },
            vec![ep("10.0.0.11", NODE)],
            want(NONE, NONE, Reject, Some(Reject)),
        )),
        row(
            "ETP Local whose only external address is IPv6: no local set for IPv4",
            ServicePort {
                load_balancer_ips: vec![ip("2001:db8::10")],
                external_policy_local: true,
                ..dual()
            },
            mixed(),
            // The short-circuit flag is per service port, as upstream's ExternalPolicyLocal;
            // IPv4 has no external destination to apply it to.
            Want {
                short_circuit: true,
                ..want(&["10.0.0.11", "10.0.0.21"], NONE, Cluster, None)
            },
        ),
        v6(row(
            "ETP Local whose only external address is IPv6: local set for IPv6",
            ServicePort {
                load_balancer_ips: vec![ip("2001:db8::10")],
                external_policy_local: true,
                ..dual()
            },
            mixed(),
            Want {
                short_circuit: true,
                ..want(
                    &["fd00::11", "fd00::21"],
                    &["fd00::11"],
                    Cluster,
                    Some(Local),
                )
            },
        )),
    ];
    run("family filtering", cases);
}

/// `reachable` is the deduplicated union of `cluster` and `local`, cluster endpoints first.
#[test]
fn reachable_is_union_of_cluster_and_local() {
    struct Row {
        name: &'static str,
        port: ServicePort,
        endpoints: Vec<Endpoint>,
        reachable: &'static [&'static str],
    }
    let rows = vec![
        Row {
            name: "cluster policy: the cluster set",
            port: cluster_ip(),
            endpoints: vec![ep("10.0.0.11", NODE), ep("10.0.0.21", "node-b").not_ready()],
            reachable: &["10.0.0.11"],
        },
        Row {
            name: "ITP Local: the local set",
            port: itp_local(),
            endpoints: vec![ep("10.0.0.11", NODE), ep("10.0.0.21", "node-b")],
            reachable: &["10.0.0.11"],
        },
        Row {
            name: "ETP Local: a local endpoint in both sets appears once",
            port: etp_local_node_port(),
            endpoints: vec![
                ep("10.0.0.11", NODE),
                ep("10.0.0.12", NODE),
                ep("10.0.0.21", "node-b"),
            ],
            reachable: &["10.0.0.11", "10.0.0.12", "10.0.0.21"],
        },
        Row {
            name: "ETP Local: a terminating local endpoint only in the local set is added",
            port: etp_local_node_port(),
            endpoints: vec![
                ep("10.0.0.11", NODE).terminating(true),
                ep("10.0.0.21", "node-b"),
            ],
            reachable: &["10.0.0.21", "10.0.0.11"],
        },
        Row {
            name: "ETP Local: a local endpoint outside the hinted zone is added",
            port: etp_local_node_port(),
            endpoints: vec![
                ep("10.0.0.11", NODE).zones(&["zone-c"]),
                ep("10.0.0.21", "node-b").zones(&["zone-a"]),
            ],
            reachable: &["10.0.0.21", "10.0.0.11"],
        },
        Row {
            name: "ITP Local with NodePort: union of both",
            port: ServicePort {
                node_port: Some(30080),
                ..itp_local()
            },
            endpoints: vec![ep("10.0.0.11", NODE), ep("10.0.0.21", "node-b")],
            reachable: &["10.0.0.11", "10.0.0.21"],
        },
        Row {
            name: "no endpoints: empty",
            port: etp_local_node_port(),
            endpoints: vec![],
            reachable: NONE,
        },
    ];
    let mut failures = Vec::new();
    for r in &rows {
        let sel = select(&r.port, &r.endpoints, IpFamily::V4, &node());
        if ips(&sel.reachable) != strings(r.reachable) {
            failures.push(format!(
                "  {}: reachable = {:?}, want {:?}",
                r.name,
                ips(&sel.reachable),
                r.reachable
            ));
        }
    }
    assert!(failures.is_empty(), "reachable:\n{}", failures.join("\n"));
}

/// Selection works on borrowed endpoints and keeps their identity and target ports.
#[test]
fn selection_borrows_endpoints_in_input_order() {
    let endpoints = vec![
        ep("10.0.0.21", "node-b").port(8080),
        ep("10.0.0.11", NODE).port(8443),
    ];
    let sel = select(&etp_local_node_port(), &endpoints, IpFamily::V4, &node());
    assert!(std::ptr::eq(sel.cluster[0], &endpoints[0]));
    assert!(std::ptr::eq(sel.local[0], &endpoints[1]));
    let addrs: Vec<String> = sel.reachable.iter().map(|e| e.addr_string()).collect();
    assert_eq!(addrs, ["10.0.0.21:8080", "10.0.0.11:8443"]);
    assert!(sel.uses_cluster_chain() && sel.uses_local_chain());
}
