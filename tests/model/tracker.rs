//! `svcproxy::model::ChangeTracker`: pending vs applied state, drains, snapshots.

use std::collections::BTreeSet;
use std::sync::Arc;

use svcproxy::model::convert::SlicePort;
use svcproxy::model::{
    ChangeTracker, Changes, Endpoint, NodeInfo, Protocol, ServiceName, ServicePort, SliceInfo,
    Snapshot,
};

use crate::common::{EndpointExt, ep, node, service_port, spn, svc_name};

/// Service `ns/<name>` with TCP ports `(name, port)`.
fn ports(name: &str, list: &[(&str, u16)]) -> Option<Vec<ServicePort>> {
    Some(
        list.iter()
            .map(|(p, n)| service_port("ns", name, p, Protocol::Tcp, *n))
            .collect(),
    )
}

/// Slice `slice` of service `ns/<service>` with TCP ports `(name, port)`.
fn slice(service: &str, slice: &str, ports: &[(&str, u16)], endpoints: Vec<Endpoint>) -> SliceInfo {
    SliceInfo {
        service: svc_name("ns", service),
        slice_name: slice.into(),
        ports: ports
            .iter()
            .map(|(name, port)| SlicePort {
                name: name.to_string(),
                protocol: Protocol::Tcp,
                port: *port,
            })
            .collect(),
        endpoints: endpoints.into_iter().map(|e| e.port(0)).collect(),
    }
}

fn add_slice(t: &mut ChangeTracker, info: SliceInfo) -> bool {
    t.update_slice(info.service.clone(), info.slice_name.clone(), Some(info))
}

fn del_slice(t: &mut ChangeTracker, service: &str, slice: &str) -> bool {
    t.update_slice(svc_name("ns", service), slice.into(), None)
}

/// `ip:port` of the endpoints of `ns/<service>:<port>` (TCP).
fn endpoints(snap: &Snapshot, service: &str, port: &str) -> Vec<String> {
    snap.ports
        .get(&spn("ns", service, port, Protocol::Tcp))
        .unwrap_or_else(|| panic!("no port ns/{service}:{port} in {:?}", snap.ports.keys()))
        .endpoints
        .iter()
        .map(|e| e.addr_string())
        .collect()
}

fn changed(names: &[&str]) -> Changes {
    Changes {
        services: names.iter().map(|n| svc_name("ns", n)).collect(),
        ..Changes::default()
    }
}

fn assert_idle(t: &ChangeTracker) {
    assert!(!t.has_pending(), "nothing should be pending");
    assert_eq!(t.pending_service_changes(), 0);
    assert_eq!(t.pending_endpoint_changes(), 0);
}

#[test]
fn service_and_slice_drain_to_sorted_snapshot() {
    let mut t = ChangeTracker::new(node());
    assert_idle(&t);
    assert!(t.update_service(svc_name("ns", "web"), ports("web", &[("http", 80)])));
    assert!(add_slice(
        &mut t,
        slice(
            "web",
            "web-1",
            &[("http", 8080)],
            vec![
                ep("10.0.0.2", "node-b"),
                ep("10.0.0.10", "node-a"),
                ep("10.0.0.1", "node-c")
            ],
        ),
    ));
    assert!(t.has_pending());
    assert_eq!(t.pending_service_changes(), 1);
    assert_eq!(t.pending_endpoint_changes(), 1);

    let (snap, changes) = t.drain();
    assert_eq!(changes, changed(&["web"]));
    assert_idle(&t);
    assert_eq!(snap.node, node());
    assert_eq!(snap.ports.len(), 1);
    let state = &snap.ports[&spn("ns", "web", "http", Protocol::Tcp)];
    assert_eq!(state.port.port, 80);
    // Sorted by "ip:port" text, bytewise as upstream: "10.0.0.10:8080" < "10.0.0.1:8080"
    // ('0' < ':') < "10.0.0.2:8080".
    assert_eq!(
        endpoints(&snap, "web", "http"),
        ["10.0.0.10:8080", "10.0.0.1:8080", "10.0.0.2:8080"]
    );
    assert_eq!(state.endpoints[0].node_name.as_deref(), Some("node-a"));
    assert_eq!(snap.endpoint_count(), 3);

    // A second drain with nothing pending changes nothing.
    let (snap2, changes) = t.drain();
    assert!(changes.is_empty());
    assert_eq!(
        endpoints(&snap2, "web", "http"),
        endpoints(&snap, "web", "http")
    );
}

#[test]
fn ipv6_endpoints_sort_by_bracketed_text() {
    let mut t = ChangeTracker::new(node());
    t.update_service(svc_name("ns", "web"), ports("web", &[("http", 80)]));
    add_slice(
        &mut t,
        slice(
            "web",
            "web-v6",
            &[("http", 8080)],
            vec![ep("fd00::b", ""), ep("fd00::10", ""), ep("fd00::2", "")],
        ),
    );
    add_slice(
        &mut t,
        slice("web", "web-v4", &[("http", 8080)], vec![ep("10.0.0.1", "")]),
    );
    let (snap, _) = t.drain();
    assert_eq!(
        endpoints(&snap, "web", "http"),
        [
            "10.0.0.1:8080",
            "[fd00::10]:8080",
            "[fd00::2]:8080",
            "[fd00::b]:8080"
        ]
    );
}

#[test]
fn slices_of_a_service_are_merged() {
    let mut t = ChangeTracker::new(node());
    t.update_service(
        svc_name("ns", "web"),
        ports("web", &[("http", 80), ("metrics", 9090), ("unused", 1)]),
    );
    add_slice(
        &mut t,
        slice(
            "web",
            "web-b",
            &[("http", 8080), ("metrics", 9100)],
            vec![ep("10.0.0.3", "node-b"), ep("10.0.0.1", "node-a")],
        ),
    );
    add_slice(
        &mut t,
        slice(
            "web",
            "web-a",
            &[("http", 8080), ("metrics", 9100), ("not-in-service", 7)],
            vec![ep("10.0.0.2", "node-c")],
        ),
    );
    // A UDP slice port of the same name is another service port.
    let mut udp = slice("web", "web-c", &[("http", 8080)], vec![ep("10.0.0.9", "")]);
    udp.ports[0].protocol = Protocol::Udp;
    add_slice(&mut t, udp);
    // Another service's slice does not leak in.
    add_slice(
        &mut t,
        slice(
            "other",
            "other-1",
            &[("http", 8080)],
            vec![ep("10.0.0.4", "")],
        ),
    );

    let (snap, changes) = t.drain();
    assert_eq!(changes, changed(&["other", "web"]));
    let all = ["10.0.0.1", "10.0.0.2", "10.0.0.3"];
    assert_eq!(
        endpoints(&snap, "web", "http"),
        all.map(|ip| format!("{ip}:8080"))
    );
    assert_eq!(
        endpoints(&snap, "web", "metrics"),
        all.map(|ip| format!("{ip}:9100"))
    );
    assert!(endpoints(&snap, "web", "unused").is_empty());
    assert_eq!(snap.ports.len(), 3, "{:?}", snap.ports.keys());
    assert_eq!(snap.endpoint_count(), 6);
}

#[test]
fn duplicate_endpoint_in_two_slices_appears_once_ready_copy_wins() {
    // Whichever slice (in name order) carries the ready copy, it wins; a not-ready duplicate
    // never replaces a ready one.
    for (first_ready, second_ready) in [(false, true), (true, false), (true, true)] {
        let mut t = ChangeTracker::new(node());
        t.update_service(svc_name("ns", "web"), ports("web", &[("http", 80)]));
        let copy = |ready: bool, node: &str| {
            let e = ep("10.0.0.5", node);
            if ready { e } else { e.terminating(true) }
        };
        add_slice(
            &mut t,
            slice(
                "web",
                "web-a",
                &[("http", 8080)],
                vec![copy(first_ready, "node-a"), ep("10.0.0.1", "")],
            ),
        );
        add_slice(
            &mut t,
            slice(
                "web",
                "web-b",
                &[("http", 8080)],
                vec![copy(second_ready, "node-b"), ep("10.0.0.9", "")],
            ),
        );
        let (snap, _) = t.drain();
        let case = format!("ready in a: {first_ready}, ready in b: {second_ready}");
        assert_eq!(
            endpoints(&snap, "web", "http"),
            ["10.0.0.1:8080", "10.0.0.5:8080", "10.0.0.9:8080"],
            "{case}"
        );
        let dup = &snap.ports[&spn("ns", "web", "http", Protocol::Tcp)].endpoints[1];
        assert!(dup.ready, "{case}: the ready copy must win");
        if !(first_ready && second_ready) {
            let want = if first_ready { "node-a" } else { "node-b" };
            assert_eq!(dup.node_name.as_deref(), Some(want), "{case}");
        }
    }
}

#[test]
fn update_back_to_applied_state_cancels_pending_change() {
    let mut t = ChangeTracker::new(node());
    let web = svc_name("ns", "web");
    let v1 = slice("web", "web-1", &[("http", 8080)], vec![ep("10.0.0.1", "")]);
    t.update_service(web.clone(), ports("web", &[("http", 80)]));
    add_slice(&mut t, v1.clone());
    t.drain();
    assert_idle(&t);

    // Identical updates are no-ops.
    assert!(!t.update_service(web.clone(), ports("web", &[("http", 80)])));
    assert!(!add_slice(&mut t, v1.clone()));
    assert!(!t.update_node(node()));
    assert_idle(&t);

    // Service: change, repeat the change (no-op), change back (cancels).
    assert!(t.update_service(web.clone(), ports("web", &[("http", 81)])));
    assert!(!t.update_service(web.clone(), ports("web", &[("http", 81)])));
    assert_eq!(t.pending_service_changes(), 1);
    assert!(t.update_service(web.clone(), ports("web", &[("http", 80)])));
    assert_idle(&t);

    // Slice: change, then back.
    let v2 = slice("web", "web-1", &[("http", 8080)], vec![ep("10.0.0.2", "")]);
    assert!(add_slice(&mut t, v2.clone()));
    assert!(!add_slice(&mut t, v2));
    assert_eq!(t.pending_endpoint_changes(), 1);
    assert!(add_slice(&mut t, v1.clone()));
    assert_idle(&t);

    // Slice: deleted, then re-created unchanged.
    assert!(del_slice(&mut t, "web", "web-1"));
    assert!(add_slice(&mut t, v1));
    assert_idle(&t);

    // A new slice created and deleted before a drain.
    assert!(add_slice(
        &mut t,
        slice("web", "web-2", &[("http", 8080)], vec![])
    ));
    assert!(del_slice(&mut t, "web", "web-2"));
    assert_idle(&t);
    // Deleting a slice that was never seen changes nothing.
    assert!(!del_slice(&mut t, "web", "web-3"));
    assert_idle(&t);

    // A new service created and deleted before a drain.
    assert!(t.update_service(svc_name("ns", "tmp"), ports("tmp", &[("", 80)])));
    assert!(t.update_service(svc_name("ns", "tmp"), None));
    assert_idle(&t);

    // The node: change, then back.
    let moved = NodeInfo {
        zone: Some("zone-b".into()),
        ..node()
    };
    assert!(t.update_node(moved.clone()));
    assert!(!t.update_node(moved));
    assert!(t.update_node(node()));
    assert_idle(&t);

    let (snap, changes) = t.drain();
    assert!(changes.is_empty(), "{changes:?}");
    assert_eq!(endpoints(&snap, "web", "http"), ["10.0.0.1:8080"]);
}

#[test]
fn pending_endpoint_changes_count_services_not_slices() {
    let mut t = ChangeTracker::new(node());
    add_slice(
        &mut t,
        slice("a", "a-1", &[("", 80)], vec![ep("10.0.0.1", "")]),
    );
    add_slice(
        &mut t,
        slice("a", "a-2", &[("", 80)], vec![ep("10.0.0.2", "")]),
    );
    add_slice(
        &mut t,
        slice("b", "b-1", &[("", 80)], vec![ep("10.0.0.3", "")]),
    );
    assert_eq!(t.pending_endpoint_changes(), 2);
    assert_eq!(t.pending_service_changes(), 0);
    del_slice(&mut t, "a", "a-1");
    assert_eq!(t.pending_endpoint_changes(), 2, "a-2 still pending");
    del_slice(&mut t, "a", "a-2");
    assert_eq!(t.pending_endpoint_changes(), 1);
}

#[test]
fn deleting_a_service_removes_its_ports() {
    let mut t = ChangeTracker::new(node());
    for name in ["web", "web2", "api"] {
        t.update_service(
            svc_name("ns", name),
            ports(name, &[("http", 80), ("https", 443)]),
        );
        add_slice(
            &mut t,
            slice(
                name,
                &format!("{name}-1"),
                &[("http", 8080)],
                vec![ep("10.0.0.1", "")],
            ),
        );
    }
    let (snap, _) = t.drain();
    assert_eq!(snap.ports.len(), 6);
    drop(snap);

    assert!(t.update_service(svc_name("ns", "web"), None));
    assert_eq!(t.pending_service_changes(), 1);
    let (snap, changes) = t.drain();
    assert_eq!(changes, changed(&["web"]));
    let web = svc_name("ns", "web");
    assert_eq!(snap.ports_of(&web).count(), 0);
    let left: BTreeSet<String> = snap.ports.keys().map(|k| k.to_string()).collect();
    assert_eq!(
        left,
        [
            "ns/api:http",
            "ns/api:https",
            "ns/web2:http",
            "ns/web2:https"
        ]
        .map(String::from)
        .into()
    );
    // The slices stay: the service comes back with its endpoints.
    t.update_service(web.clone(), ports("web", &[("http", 80)]));
    let (snap, changes) = t.drain();
    assert_eq!(changes, changed(&["web"]));
    assert_eq!(endpoints(&snap, "web", "http"), ["10.0.0.1:8080"]);
}

#[test]
fn service_with_no_ports_counts_as_deleted() {
    let mut t = ChangeTracker::new(node());
    let web = svc_name("ns", "web");
    assert!(
        !t.update_service(web.clone(), Some(vec![])),
        "never seen: no-op"
    );
    t.update_service(web.clone(), ports("web", &[("http", 80)]));
    t.drain();
    assert!(t.update_service(web.clone(), Some(vec![])));
    assert!(
        !t.update_service(web.clone(), None),
        "same as the pending deletion"
    );
    let (snap, changes) = t.drain();
    assert_eq!(changes, changed(&["web"]));
    assert!(snap.ports.is_empty());
}

#[test]
fn service_update_replaces_its_ports() {
    let mut t = ChangeTracker::new(node());
    t.update_service(
        svc_name("ns", "web"),
        ports("web", &[("http", 80), ("old", 81)]),
    );
    add_slice(
        &mut t,
        slice(
            "web",
            "web-1",
            &[("http", 8080), ("new", 8082)],
            vec![ep("10.0.0.1", "")],
        ),
    );
    t.drain();
    t.update_service(
        svc_name("ns", "web"),
        ports("web", &[("http", 8000), ("new", 82)]),
    );
    let (snap, changes) = t.drain();
    assert_eq!(changes, changed(&["web"]));
    let keys: Vec<String> = snap.ports.keys().map(|k| k.to_string()).collect();
    assert_eq!(keys, ["ns/web:http", "ns/web:new"]);
    assert_eq!(
        snap.ports[&spn("ns", "web", "http", Protocol::Tcp)]
            .port
            .port,
        8000
    );
    assert_eq!(endpoints(&snap, "web", "new"), ["10.0.0.1:8082"]);
}

#[test]
fn slice_deletion_removes_endpoints_but_keeps_ports() {
    let mut t = ChangeTracker::new(node());
    t.update_service(svc_name("ns", "web"), ports("web", &[("http", 80)]));
    add_slice(
        &mut t,
        slice("web", "web-1", &[("http", 8080)], vec![ep("10.0.0.1", "")]),
    );
    add_slice(
        &mut t,
        slice("web", "web-2", &[("http", 8080)], vec![ep("10.0.0.2", "")]),
    );
    t.drain();
    assert!(del_slice(&mut t, "web", "web-1"));
    let (snap, changes) = t.drain();
    assert_eq!(changes, changed(&["web"]));
    assert_eq!(endpoints(&snap, "web", "http"), ["10.0.0.2:8080"]);
    assert!(del_slice(&mut t, "web", "web-2"));
    let (snap, _) = t.drain();
    assert!(endpoints(&snap, "web", "http").is_empty());
}

#[test]
fn changes_report_exactly_the_changed_services() {
    let mut t = ChangeTracker::new(node());
    for name in ["a", "b", "c", "d"] {
        t.update_service(svc_name("ns", name), ports(name, &[("", 80)]));
        add_slice(
            &mut t,
            slice(name, "s", &[("", 8080)], vec![ep("10.0.0.1", "")]),
        );
    }
    let (_, changes) = t.drain();
    assert_eq!(changes, changed(&["a", "b", "c", "d"]));

    // b: endpoints; c: service; d: changed and changed back (not reported).
    add_slice(
        &mut t,
        slice("b", "s", &[("", 8080)], vec![ep("10.0.0.2", "")]),
    );
    t.update_service(svc_name("ns", "c"), ports("c", &[("", 81)]));
    t.update_service(svc_name("ns", "d"), ports("d", &[("", 81)]));
    t.update_service(svc_name("ns", "d"), ports("d", &[("", 80)]));
    let (snap, changes) = t.drain();
    assert_eq!(changes, changed(&["b", "c"]));
    assert_eq!(endpoints(&snap, "a", ""), ["10.0.0.1:8080"]);
    assert_eq!(endpoints(&snap, "b", ""), ["10.0.0.2:8080"]);
    assert_eq!(snap.ports[&spn("ns", "c", "", Protocol::Tcp)].port.port, 81);
}

#[test]
fn node_update_sets_node_changed() {
    let mut t = ChangeTracker::new(node());
    t.update_service(svc_name("ns", "web"), ports("web", &[("http", 80)]));
    t.drain();

    let moved = NodeInfo {
        zone: Some("zone-b".into()),
        deleting: true,
        ..node()
    };
    assert!(t.update_node(moved.clone()));
    assert!(t.has_pending());
    assert_eq!(
        t.node(),
        &node(),
        "the tracker's node changes only on drain"
    );
    let (snap, changes) = t.drain();
    assert_eq!(
        changes,
        Changes {
            services: BTreeSet::new(),
            node_changed: true,
            ..Changes::default()
        }
    );
    assert!(!changes.is_empty());
    assert_eq!(snap.node, moved);
    assert_eq!(t.node(), &moved);
    assert_eq!(snap.ports.len(), 1, "services are kept");
    assert_idle(&t);

    let (_, changes) = t.drain();
    assert!(!changes.node_changed);
}

#[test]
fn slices_before_their_service_are_kept() {
    let mut t = ChangeTracker::new(node());
    assert!(add_slice(
        &mut t,
        slice(
            "late",
            "late-1",
            &[("http", 8080)],
            vec![ep("10.0.0.1", "")]
        ),
    ));
    let (snap, _) = t.drain();
    assert_eq!(snap.ports_of(&svc_name("ns", "late")).count(), 0);
    assert!(snap.ports.is_empty());

    add_slice(
        &mut t,
        slice(
            "late",
            "late-2",
            &[("http", 8080)],
            vec![ep("10.0.0.2", "")],
        ),
    );
    let (snap, _) = t.drain();
    assert!(snap.ports.is_empty());

    assert!(t.update_service(svc_name("ns", "late"), ports("late", &[("http", 80)])));
    let (snap, changes) = t.drain();
    assert_eq!(changes, changed(&["late"]));
    assert_eq!(
        endpoints(&snap, "late", "http"),
        ["10.0.0.1:8080", "10.0.0.2:8080"]
    );
}

#[test]
fn ports_of_selects_exactly_one_service() {
    let mut t = ChangeTracker::new(node());
    // Names that sort around "ns/web": a prefix, an extension, another namespace.
    for (ns, name) in [
        ("ns", "we"),
        ("ns", "web"),
        ("ns", "web-2"),
        ("ns", "webb"),
        ("ns2", "web"),
        ("n", "web"),
    ] {
        let list = [("", 1), ("a", 2)]
            .iter()
            .flat_map(|(p, n)| {
                [Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
                    .map(|proto| service_port(ns, name, p, proto, *n))
            })
            .collect();
        t.update_service(ServiceName::new(ns, name), Some(list));
    }
    let (snap, _) = t.drain();
    assert_eq!(snap.ports.len(), 36);
    let got: Vec<String> = snap
        .ports_of(&svc_name("ns", "web"))
        .map(|(k, v)| {
            assert_eq!(k, &v.port.name);
            format!("{k}/{}", k.protocol)
        })
        .collect();
    assert_eq!(
        got,
        [
            "ns/web/tcp",
            "ns/web/udp",
            "ns/web/sctp",
            "ns/web:a/tcp",
            "ns/web:a/udp",
            "ns/web:a/sctp"
        ]
    );
}

#[test]
fn drained_snapshot_is_not_changed_by_later_drains() {
    let mut t = ChangeTracker::new(node());
    t.update_service(svc_name("ns", "web"), ports("web", &[("http", 80)]));
    add_slice(
        &mut t,
        slice("web", "web-1", &[("http", 8080)], vec![ep("10.0.0.1", "")]),
    );
    let (old, _) = t.drain();

    add_slice(
        &mut t,
        slice("web", "web-1", &[("http", 8080)], vec![ep("10.0.0.2", "")]),
    );
    t.update_service(svc_name("ns", "api"), ports("api", &[("", 80)]));
    t.update_node(NodeInfo {
        zone: Some("zone-b".into()),
        ..node()
    });
    let (new, _) = t.drain();
    assert!(!Arc::ptr_eq(&old, &new));
    assert_eq!(endpoints(&old, "web", "http"), ["10.0.0.1:8080"]);
    assert_eq!(old.ports.len(), 1);
    assert_eq!(old.node, node());
    assert_eq!(endpoints(&new, "web", "http"), ["10.0.0.2:8080"]);
    assert_eq!(new.ports.len(), 2);
}
