//! The iptables backend's decisions, against the in-memory fake kernel: full vs partial,
//! fallback after a failed partial restore, adoption of upstream kube-proxy's rules, the
//! canary, and cleanup.

mod common;

use std::collections::BTreeSet;

use common::builders::{set_endpoints, tracker_with};
use svcproxy::dataplane::Backend;
use svcproxy::dataplane::iptables::backend::IptablesBackend;
use svcproxy::dataplane::iptables::edge::IptablesEdge;
use svcproxy::dataplane::iptables::fake::FakeEdge;
use svcproxy::dataplane::iptables::{JUMP_RULES, RenderConfig};
use svcproxy::dataplane::naming::is_service_chain;
use svcproxy::model::{Changes, IpFamily, ServiceName};

fn backend(edge: FakeEdge) -> IptablesBackend<FakeEdge> {
    IptablesBackend::new(
        edge,
        &[IpFamily::V4],
        Box::new(|family, _| RenderConfig {
            family,
            ..RenderConfig::default()
        }),
    )
}

fn kube_chains(edge: &FakeEdge) -> BTreeSet<String> {
    edge.chains(IpFamily::V4, "nat")
        .into_iter()
        .filter(|c| is_service_chain(c))
        .collect()
}

fn jump_count(edge: &FakeEdge, table: &str, chain: &str, target: &str) -> usize {
    edge.chain(IpFamily::V4, table, chain)
        .map(|rules| {
            rules
                .iter()
                .filter(|r| r.ends_with(&format!("-j {target}")))
                .count()
        })
        .unwrap_or(0)
}

/// A tracker with `names` and a backend that has synced them once.
fn synced(names: &[&str]) -> (svcproxy::model::ChangeTracker, IptablesBackend<FakeEdge>) {
    let mut tracker = tracker_with(names);
    let mut b = backend(FakeEdge::default());
    let (snap, changes) = tracker.drain();
    b.sync(&snap, &changes, false).unwrap();
    drop(snap);
    (tracker, b)
}

#[test]
fn first_sync_full_then_partial_with_only_changed_chains() {
    let mut tracker = tracker_with(&["a", "b", "c"]);
    let mut b = backend(FakeEdge::default());
    let (snap, changes) = tracker.drain();
    let s = b.sync(&snap, &changes, false).unwrap();
    assert!(s.full, "the first sync is full even when not asked");
    assert_eq!(kube_chains(b.edge()).len(), 9, "3 SVC + 6 SEP");
    assert_eq!(
        b.edge().saves,
        2,
        "nat and filter read once to adopt what is there"
    );
    drop(snap);

    set_endpoints(&mut tracker, "b", &["10.244.1.1"]);
    let (snap, changes) = tracker.drain();
    let s = b.sync(&snap, &changes, false).unwrap();
    assert!(!s.full);
    assert_eq!(s.objects_deleted, 1);
    let (_, text) = b.edge().restores.last().unwrap();
    assert!(text.contains("ns/b:p"), "changed service rendered");
    assert!(
        !text.contains(":KUBE-SVC-") || text.matches(":KUBE-SVC-").count() == 1,
        "only b's SVC chain declared"
    );
    assert_eq!(kube_chains(b.edge()).len(), 8);
    assert_eq!(b.edge().saves, 2, "partial syncs never read the kernel");
    assert!(
        !text.contains("KUBE-SERVICES") && !text.contains("*filter"),
        "an endpoint change leaves the shared chains alone:\n{text}"
    );
    for j in JUMP_RULES.iter().filter(|j| j.table == "nat") {
        assert_eq!(
            jump_count(b.edge(), "nat", j.from, j.to),
            1,
            "{j:?} inserted exactly once"
        );
    }
}

#[test]
fn failed_partial_restore_falls_back_to_full() {
    let (mut tracker, mut b) = synced(&["a", "b"]);

    tracker.update_service(ServiceName::new("ns", "a"), None);
    let (snap, changes) = tracker.drain();
    // Fail only the partial batch (it is the only one without b's declaration).
    b.edge_mut().fail_when_contains = Some("-X KUBE-SVC-".into());
    let err = b.sync(&snap, &changes, false).unwrap_err();
    assert!(err.to_string().contains("injected failure"), "{err}");
    b.edge_mut().fail_when_contains = None;
    // The failure forgot the mirror: the next sync is full and reads the kernel again.
    let saves = b.edge().saves;
    let s = b.sync(&snap, &Changes::default(), false).unwrap();
    assert!(s.full);
    assert_eq!(b.edge().saves, saves + 2);
    assert_eq!(
        kube_chains(b.edge()).len(),
        3,
        "a's chains deleted, b's kept"
    );
}

#[test]
fn one_failed_partial_restore_is_replaced_by_a_full_one_in_the_same_sync() {
    let (mut tracker, mut b) = synced(&["a", "b"]);
    set_endpoints(&mut tracker, "a", &["10.244.0.1"]);
    let (snap, changes) = tracker.drain();
    b.edge_mut().fail_next = 1;
    let restores = b.edge().restores.len();
    let s = b.sync(&snap, &changes, false).unwrap();
    assert!(s.partial_fell_back && s.full, "{s:?}");
    assert_eq!(b.edge().restores.len(), restores + 2);
    assert_eq!(
        kube_chains(b.edge()).len(),
        5,
        "a: SVC + 1 SEP, b: SVC + 2 SEP"
    );
}

#[test]
fn partial_failure_is_retried_as_full_in_the_same_sync() {
    let (mut tracker, mut b) = synced(&["a", "b"]);
    // Someone deleted b's SEP chains behind our back: a partial restore that jumps to them fails.
    set_endpoints(&mut tracker, "a", &["10.244.0.1"]);
    let (snap, changes) = tracker.drain();
    let text_before = b.edge().restores.len();
    b.edge_mut().fail_when_contains = Some("-A KUBE-SVC-".into());
    let err = b.sync(&snap, &changes, false);
    assert!(err.is_err(), "both attempts hit the injected failure");
    assert_eq!(
        b.edge().restores.len(),
        text_before + 2,
        "partial, then full in the same sync"
    );
    b.edge_mut().fail_when_contains = None;
    let s = b.sync(&snap, &Changes::default(), false).unwrap();
    assert!(s.full);
}

#[test]
fn upstream_rules_are_adopted_without_duplicates_and_stale_chains_removed() {
    // A node taken over from kube-proxy: its jump rules, its chains, a service that is gone.
    let mut edge = FakeEdge::default();
    let upstream = "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-SVC-OLDOLDOLDOLDOLDO - [0:0]\n\
:KUBE-SEP-OLDOLDOLDOLDOLDO - [0:0]\n\
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
-A KUBE-SERVICES -d 10.96.9.9/32 -p tcp -j KUBE-SVC-OLDOLDOLDOLDOLDO\n\
-A KUBE-SVC-OLDOLDOLDOLDOLDO -j KUBE-SEP-OLDOLDOLDOLDOLDO\n\
-A KUBE-SEP-OLDOLDOLDOLDOLDO -p tcp -j DNAT --to-destination 10.244.9.9:80\nCOMMIT\n";
    edge.restore(IpFamily::V4, upstream, false).unwrap();
    let mut tracker = tracker_with(&["a"]);
    let mut b = backend(edge);
    let (snap, changes) = tracker.drain();
    b.sync(&snap, &changes, false).unwrap();
    let chains = kube_chains(b.edge());
    assert!(
        !chains.iter().any(|c| c.contains("OLD")),
        "stale upstream chains deleted: {chains:?}"
    );
    assert_eq!(chains.len(), 3);
    for j in JUMP_RULES.iter().filter(|j| j.table == "nat") {
        assert_eq!(
            jump_count(b.edge(), "nat", j.from, j.to),
            1,
            "{j:?} not duplicated"
        );
    }
}

#[test]
fn flushed_tables_are_detected_and_restored() {
    let mut tracker = tracker_with(&["a", "b"]);
    let mut b = backend(FakeEdge::default());
    let (snap, changes) = tracker.drain();
    b.sync(&snap, &changes, false).unwrap();
    assert!(b.rules_intact());
    b.edge_mut().flush_all();
    assert!(!b.rules_intact(), "canary gone");
    let s = b.sync(&snap, &Changes::default(), false).unwrap();
    assert!(s.full);
    assert_eq!(kube_chains(b.edge()).len(), 6);
    assert!(b.rules_intact());
    assert_eq!(
        jump_count(b.edge(), "nat", "PREROUTING", "KUBE-SERVICES"),
        1,
        "jumps re-inserted"
    );
}

#[test]
fn cleanup_leaves_nothing() {
    let mut tracker = tracker_with(&["a", "b"]);
    let mut b = backend(FakeEdge::default());
    let (snap, changes) = tracker.drain();
    b.sync(&snap, &changes, false).unwrap();
    b.cleanup().unwrap();
    for table in ["nat", "filter"] {
        let chains = b.edge().chains(IpFamily::V4, table);
        assert!(
            chains.iter().all(|c| !c.starts_with("KUBE-")),
            "{table}: {chains:?}"
        );
        for builtin in ["PREROUTING", "OUTPUT", "INPUT", "FORWARD", "POSTROUTING"] {
            let rules = b
                .edge()
                .chain(IpFamily::V4, table, builtin)
                .cloned()
                .unwrap_or_default();
            assert!(
                rules.iter().all(|r| !r.contains("KUBE-")),
                "{table}/{builtin}: {rules:?}"
            );
        }
    }
    // And the next sync starts from scratch.
    let s = b.sync(&snap, &Changes::default(), false).unwrap();
    assert!(s.full);
    assert_eq!(kube_chains(b.edge()).len(), 6);
}

#[test]
fn a_family_without_changes_is_not_rewritten() {
    let mut tracker = tracker_with(&["a", "b"]);
    let mut b = IptablesBackend::new(
        FakeEdge::default(),
        &[IpFamily::V4, IpFamily::V6],
        Box::new(|family, _| RenderConfig {
            family,
            ..RenderConfig::default()
        }),
    );
    let (snap, changes) = tracker.drain();
    b.sync(&snap, &changes, false).unwrap();
    assert_eq!(
        b.edge().restores.len(),
        2,
        "first sync writes both families"
    );
    drop(snap);
    set_endpoints(&mut tracker, "a", &["10.244.0.1"]);
    let (snap, changes) = tracker.drain();
    b.sync(&snap, &changes, false).unwrap();
    let families: Vec<IpFamily> = b.edge().restores[2..].iter().map(|(f, _)| *f).collect();
    assert_eq!(
        families,
        vec![IpFamily::V4],
        "IPv4-only change: no ip6tables-restore"
    );
}

#[test]
fn partial_syncs_send_line_deltas_for_shared_chains() {
    let (mut tracker, mut b) = synced(&["a", "b"]);
    // A new service and a removed one.
    tracker.update_service(ServiceName::new("ns", "a"), None);
    tracker.update_service(
        ServiceName::new("ns", "c"),
        Some(vec![common::builders::service("c", "10.96.0.3", 80)]),
    );
    set_endpoints(&mut tracker, "c", &["10.244.3.1"]);
    let (snap, changes) = tracker.drain();
    let s = b.sync(&snap, &changes, false).unwrap();
    assert!(!s.full);
    let (_, text) = b.edge().restores.last().unwrap();
    assert_eq!(text.matches("-D KUBE-SERVICES ").count(), 1, "{text}");
    assert_eq!(text.matches("-I KUBE-SERVICES 1 ").count(), 1, "{text}");
    assert!(
        !text.contains(":KUBE-SERVICES"),
        "the shared chain is not flushed:\n{text}"
    );
    let services = b
        .edge()
        .chain(IpFamily::V4, "nat", "KUBE-SERVICES")
        .unwrap();
    assert!(
        services
            .last()
            .unwrap()
            .contains("kubernetes service nodeports"),
        "node-ports rule stays last: {services:?}"
    );
    assert!(services.iter().any(|r| r.contains("ns/c:p cluster IP")));
    assert!(!services.iter().any(|r| r.contains("ns/a:p")));
}
