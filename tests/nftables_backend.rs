//! The nftables backend against the in-memory nftables: the first sync replaces the table,
//! later syncs send only chain/element deltas, the kernel is listed only on the periodic
//! resync (which counts drift and repairs it), failures change nothing and force a rewrite,
//! the canary, cleanup, and takeover from upstream kube-proxy's table.
//!
//! After every delta, the fake kernel is compared with a fresh load of the full render of the
//! same snapshot: deltas must converge to exactly what a full sync would install.

mod common;

use common::builders::{service, set_endpoints, tracker_with};
use svcproxy::dataplane::Backend;
use svcproxy::dataplane::iptables::RenderConfig;
use svcproxy::dataplane::nftables::backend::NftablesBackend;
use svcproxy::dataplane::nftables::diff::Mirror;
use svcproxy::dataplane::nftables::edge::NftEdge;
use svcproxy::dataplane::nftables::fake::FakeNft;
use svcproxy::model::{ChangeTracker, Changes, IpFamily, ServiceName, Snapshot};

fn cfg(family: IpFamily) -> RenderConfig {
    RenderConfig {
        family,
        ..RenderConfig::default()
    }
}

fn backend(edge: FakeNft) -> NftablesBackend<FakeNft> {
    NftablesBackend::new(edge, &[IpFamily::V4], Box::new(|family, _| cfg(family)))
}

/// A tracker with `names` and a backend that has synced them once.
fn synced(names: &[&str]) -> (ChangeTracker, NftablesBackend<FakeNft>) {
    let mut tracker = tracker_with(names);
    let mut b = backend(FakeNft::default());
    let (snap, changes) = tracker.drain();
    b.sync(&snap, &changes, true).unwrap();
    drop(snap);
    (tracker, b)
}

/// Syncs what changed in `tracker` (not full); returns the stats and the transaction.
fn sync_changes(
    tracker: &mut ChangeTracker,
    b: &mut NftablesBackend<FakeNft>,
) -> (
    svcproxy::dataplane::SyncStats,
    String,
    std::sync::Arc<Snapshot>,
) {
    let (snap, changes) = tracker.drain();
    let before = b.edge().transactions.len();
    let stats = b.sync(&snap, &changes, false).unwrap();
    let text = if b.edge().transactions.len() > before {
        b.edge().transactions.last().unwrap().clone()
    } else {
        String::new()
    };
    (stats, text, snap)
}

/// Asserts the fake kernel holds exactly what a full render of `snap` installs.
fn assert_converged(b: &NftablesBackend<FakeNft>, snap: &Snapshot) {
    let mut fresh = FakeNft::default();
    let mut text = String::new();
    Mirror::render(&cfg(IpFamily::V4), snap).write_full(&mut text);
    fresh.apply(&text).unwrap();
    assert_eq!(
        b.edge().table(IpFamily::V4),
        fresh.table(IpFamily::V4),
        "delta-synced table differs from a full render"
    );
}

fn chains_named<'a>(b: &'a NftablesBackend<FakeNft>, prefix: &str) -> Vec<&'a String> {
    b.edge()
        .table(IpFamily::V4)
        .unwrap()
        .chains
        .keys()
        .filter(|c| c.starts_with(prefix) && c.contains("-ns/"))
        .collect()
}

#[test]
fn first_sync_replaces_the_table_without_listing_it() {
    let (_, b) = synced(&["a", "b", "c"]);
    assert_eq!(b.edge().transactions.len(), 1, "one transaction");
    let text = &b.edge().transactions[0];
    assert!(
        text.starts_with(
            "add table ip kube-proxy\ndelete table ip kube-proxy\n\
             add table ip svcproxy\ndelete table ip svcproxy\ntable ip svcproxy {"
        ),
        "{}",
        &text[..200]
    );
    assert_eq!(b.edge().listings, 0, "no listing at start-up");
    assert_eq!(chains_named(&b, "service-").len(), 3);
    assert_eq!(chains_named(&b, "endpoint-").len(), 6);
    let t = b.edge().table(IpFamily::V4).unwrap();
    assert_eq!(t.sets["service-ips"].len(), 3);
    assert_eq!(t.sets["cluster-ips"].len(), 3);
}

#[test]
fn endpoint_change_sends_only_chain_deltas() {
    let (mut tracker, mut b) = synced(&["a", "b", "c"]);
    set_endpoints(&mut tracker, "b", &["10.244.1.1", "10.244.1.9"]);
    let (stats, text, snap) = sync_changes(&mut tracker, &mut b);
    assert!(!stats.full);
    assert_eq!((stats.objects_written, stats.objects_deleted), (2, 1));
    // Exactly: the new endpoint chain, the refilled service chain, the old endpoint chain gone.
    let lines: Vec<&str> = text.lines().collect();
    let verbs: Vec<String> = lines
        .iter()
        .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        verbs,
        [
            "add chain",
            "flush chain",
            "add rule",
            "add rule",
            "add rule",
            "add rule",
            "flush chain",
            "delete chain"
        ],
        "{text}"
    );
    assert!(lines[0].ends_with("ns/b/tcp/p__10.244.1.9/8080"), "{text}");
    assert!(lines[1].contains("service-") && lines[1].ends_with("-ns/b/tcp/p"));
    assert!(lines[7].ends_with("ns/b/tcp/p__10.244.1.2/8080"), "{text}");
    assert!(!text.contains("ns/a/") && !text.contains("ns/c/"), "{text}");
    assert!(
        !text.contains("element") && !text.contains("table"),
        "{text}"
    );
    assert_eq!(b.edge().listings, 0);
    assert_converged(&b, &snap);
}

#[test]
fn new_and_removed_services_are_element_and_chain_deltas() {
    let (mut tracker, mut b) = synced(&["a", "b"]);
    tracker.update_service(
        ServiceName::new("ns", "new"),
        Some(vec![service("new", "10.96.9.9", 80)]),
    );
    set_endpoints(&mut tracker, "new", &["10.250.0.1"]);
    let (stats, text, snap) = sync_changes(&mut tracker, &mut b);
    assert!(!stats.full);
    assert_eq!(stats.objects_written, 2, "service + endpoint chain");
    assert!(
        text.contains("add element ip svcproxy service-ips { 10.96.9.9 . tcp . 80 : goto service-")
    );
    assert!(text.contains("add element ip svcproxy cluster-ips { 10.96.9.9 }"));
    assert!(!text.contains("ns/a/") && !text.contains("ns/b/"), "{text}");
    assert_converged(&b, &snap);
    drop(snap);

    tracker.update_service(ServiceName::new("ns", "a"), None);
    let (stats, text, snap) = sync_changes(&mut tracker, &mut b);
    assert_eq!(stats.objects_deleted, 3, "service + 2 endpoint chains");
    assert!(text.contains("delete element ip svcproxy service-ips { 10.96.0.1 . tcp . 80 }"));
    assert!(text.contains("delete element ip svcproxy cluster-ips { 10.96.0.1 }"));
    assert_converged(&b, &snap);
    drop(snap);

    // No endpoints left: the ClusterIP moves to the reject map.
    set_endpoints(&mut tracker, "b", &[]);
    let (_, text, snap) = sync_changes(&mut tracker, &mut b);
    assert!(text.contains(
        "add element ip svcproxy no-endpoint-services { 10.96.0.2 . tcp . 80 : goto reject-chain }"
    ));
    assert_converged(&b, &snap);
}

#[test]
fn unrelated_change_sends_nothing() {
    let (mut tracker, mut b) = synced(&["a"]);
    // Same endpoints again: the tracker drops it; a no-op sync sends no transaction.
    let (snap, _) = tracker.drain();
    let n = b.edge().transactions.len();
    let changes = Changes {
        services: [ServiceName::new("ns", "a")].into(),
        ..Changes::default()
    };
    b.sync(&snap, &changes, false).unwrap();
    assert_eq!(
        b.edge().transactions.len(),
        n,
        "no transaction for no change"
    );
}

#[test]
fn failed_delta_changes_nothing_and_falls_back_to_a_rewrite() {
    let (mut tracker, mut b) = synced(&["a", "b"]);
    b.edge_mut().fail_next = 1;
    set_endpoints(&mut tracker, "a", &["10.244.0.7"]);
    let (snap, changes) = tracker.drain();
    let s = b.sync(&snap, &changes, false).unwrap();
    assert!(s.partial_fell_back && s.full);
    let last = b.edge().transactions.last().unwrap();
    assert!(last.contains("delete table ip svcproxy"), "rewritten");
    assert_converged(&b, &snap);
}

#[test]
fn failed_rewrite_keeps_the_old_table_and_the_next_sync_rewrites() {
    let (mut tracker, mut b) = synced(&["a", "b"]);
    let before = b.edge().table(IpFamily::V4).cloned();
    b.edge_mut().fail_next = 2;
    set_endpoints(&mut tracker, "a", &["10.244.0.7"]);
    let (snap, changes) = tracker.drain();
    assert!(b.sync(&snap, &changes, false).is_err());
    assert_eq!(
        b.edge().table(IpFamily::V4).cloned(),
        before,
        "atomic: nothing changed"
    );
    let s = b.sync(&snap, &Changes::default(), false).unwrap();
    assert!(s.full, "after a failure the tables are rewritten");
    assert!(
        b.edge()
            .transactions
            .last()
            .unwrap()
            .contains("delete table ip svcproxy")
    );
    assert_converged(&b, &snap);
}

#[test]
fn periodic_resync_lists_once_and_counts_and_repairs_drift() {
    let (mut tracker, mut b) = synced(&["a", "b"]);
    let (snap, _) = tracker.drain();
    let n = b.edge().transactions.len();
    let s = b.sync(&snap, &Changes::default(), true).unwrap();
    assert_eq!(b.edge().listings, 1, "the resync lists the table once");
    assert_eq!(s.drift, 0);
    assert_eq!(
        b.edge().transactions.len(),
        n,
        "nothing drifted, nothing sent"
    );

    // Someone deletes an element and adds a chain behind svcproxy's back.
    let t = b.edge_mut().table_mut(IpFamily::V4).unwrap();
    let key = t.sets["service-ips"].keys().next().unwrap().clone();
    t.sets.get_mut("service-ips").unwrap().remove(&key);
    t.chains.insert("intruder".into(), vec!["accept".into()]);
    assert!(b.rules_intact(), "the canary does not see element drift");
    let s = b.sync(&snap, &Changes::default(), true).unwrap();
    assert_eq!(s.drift, 2, "one missing element, one extra chain");
    assert_eq!(b.drift_total(), 2);
    assert!(
        b.edge()
            .transactions
            .last()
            .unwrap()
            .contains("delete table ip svcproxy")
    );
    assert_converged(&b, &snap);

    // `nft flush table`: chains, sets and elements stay, rules go. The canary does not see
    // it; the resync does, through the rule count of the dispatch chain.
    for rules in b
        .edge_mut()
        .table_mut(IpFamily::V4)
        .unwrap()
        .chains
        .values_mut()
    {
        rules.clear();
    }
    assert!(b.rules_intact());
    let s = b.sync(&snap, &Changes::default(), true).unwrap();
    assert_eq!(s.drift, 1, "services chain lost its rules");
    assert_converged(&b, &snap);
}

#[test]
fn flushed_ruleset_trips_the_canary_and_is_rewritten() {
    let (mut tracker, mut b) = synced(&["a"]);
    assert!(b.rules_intact());
    b.edge_mut().flush_ruleset();
    assert!(!b.rules_intact());
    let (snap, _) = tracker.drain();
    let s = b.sync(&snap, &Changes::default(), true).unwrap();
    assert!(s.full);
    assert_converged(&b, &snap);
    assert!(b.rules_intact());
}

#[test]
fn upstream_table_is_replaced_in_the_same_transaction_and_cleanup_removes_all() {
    let mut edge = FakeNft::default();
    edge.apply("add table ip kube-proxy\nadd chain ip kube-proxy services\nadd table ip filter\n")
        .unwrap();
    let mut tracker = tracker_with(&["a"]);
    let mut b = backend(edge);
    let (snap, changes) = tracker.drain();
    b.sync(&snap, &changes, true).unwrap();
    assert_eq!(b.edge().transactions.len(), 2);
    assert!(
        b.edge().transactions[1].starts_with(
            "add table ip kube-proxy\ndelete table ip kube-proxy\nadd table ip svcproxy"
        )
    );
    let mut tables = b.edge_mut().tables().unwrap();
    tables.sort();
    assert_eq!(
        tables,
        [
            ("ip".to_string(), "filter".to_string()),
            ("ip".to_string(), "svcproxy".to_string())
        ]
    );
    b.cleanup().unwrap();
    assert_eq!(
        b.edge_mut().tables().unwrap(),
        [("ip".to_string(), "filter".to_string())],
        "only the foreign table is left"
    );
}

#[test]
fn shared_external_ip_is_installed_once_and_handed_over() {
    let mut tracker = tracker_with(&[]);
    for (name, cip) in [("x", "10.96.0.1"), ("y", "10.96.0.2")] {
        let mut port = service(name, cip, 80);
        port.external_ips = vec!["198.51.100.1".parse().unwrap()];
        tracker.update_service(ServiceName::new("ns", name), Some(vec![port]));
        set_endpoints(&mut tracker, name, &[&format!("10.244.0.{}", cip.len())]);
    }
    let mut b = backend(FakeNft::default());
    let (snap, changes) = tracker.drain();
    b.sync(&snap, &changes, true).unwrap();
    let t = b.edge().table(IpFamily::V4).unwrap();
    let v = t.sets["service-ips"]["198.51.100.1 . tcp . 80"]
        .clone()
        .unwrap();
    assert!(v.contains("ns/x/"), "first service wins: {v}");
    drop(snap);
    tracker.update_service(ServiceName::new("ns", "x"), None);
    let (_, text, snap) = sync_changes(&mut tracker, &mut b);
    assert!(text.contains("delete element ip svcproxy service-ips { 10.96.0.1 . tcp . 80, 198.51.100.1 . tcp . 80 }"), "{text}");
    let t = b.edge().table(IpFamily::V4).unwrap();
    let v = t.sets["service-ips"]["198.51.100.1 . tcp . 80"]
        .clone()
        .unwrap();
    assert!(v.contains("ns/y/"), "handed over: {v}");
    assert_converged(&b, &snap);
}

#[test]
fn resync_applies_changes_the_partial_syncs_missed_as_a_delta() {
    let (mut tracker, mut b) = synced(&["a", "b", "c"]);
    set_endpoints(&mut tracker, "c", &["10.244.2.1", "10.244.2.7"]);
    let (snap, _) = tracker.drain();
    // The change reaches the backend only through the periodic full sync.
    let s = b.sync(&snap, &Changes::default(), true).unwrap();
    assert!(s.full && s.drift == 0);
    assert_eq!((s.objects_written, s.objects_deleted), (2, 1));
    let text = b.edge().transactions.last().unwrap();
    assert!(
        !text.contains("table ip svcproxy {"),
        "a delta, not a rewrite"
    );
    assert!(!text.contains("ns/a/") && !text.contains("ns/b/"), "{text}");
    assert_converged(&b, &snap);
}
