//! nftables mode against a real kernel, in throwaway network namespaces: every golden
//! transaction loads with `nft -f`; an endpoint change reaches the kernel as a delta of chains
//! only and leaves the table identical to a full load; the periodic resync reads the real
//! `nft -j` listing back without seeing drift, and counts drift someone else caused.
//! Needs root; namespaces are removed even on failure.

mod common;

use common::builders::{set_endpoints, tracker_with};
use common::{Netns, kernel_tests_possible};
use svcproxy::dataplane::iptables::RenderConfig;
use svcproxy::dataplane::nftables::backend::NftablesBackend;
use svcproxy::dataplane::nftables::diff::{Mirror, TableState};
use svcproxy::dataplane::nftables::edge::{NftEdge, ProcessEdge};
use svcproxy::dataplane::{Backend, BackendError};
use svcproxy::model::{Changes, IpFamily};

fn nft_goldens() -> Vec<(String, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "nft"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    assert!(files.len() >= 6, "nftables golden files missing");
    files
}

#[test]
fn golden_transactions_load_into_the_kernel() {
    if !kernel_tests_possible("golden_transactions_load_into_the_kernel") {
        return;
    }
    for (name, text) in nft_goldens() {
        let ns = Netns::new("nftgold");
        let out = ns.run_with_input(&["nft", "-f", "-"], &text);
        assert!(
            out.status.success(),
            "{name} does not load: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listed = ns.ok(&["nft", "list", "tables"]);
        let family = if name.contains(".v6.") { "ip6" } else { "ip" };
        assert!(
            listed.contains(&format!("table {family} svcproxy")),
            "{name}: {listed}"
        );
        // Every chain the transaction declares is in the kernel.
        let table = ns.ok(&["nft", "list", "table", family, "svcproxy"]);
        for chain in text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("chain "))
            .map(|c| c.trim_end_matches(" {"))
        {
            assert!(
                table.contains(&format!("chain {chain} {{")),
                "{name}: chain {chain} missing"
            );
        }
    }
}

/// Chain name → rules, from `nft list table` text (chains in any order).
fn chain_rules(listing: &str) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut out = std::collections::BTreeMap::new();
    let mut current: Option<(String, Vec<String>)> = None;
    for line in listing.lines() {
        let t = line.trim();
        if let Some((name, rules)) = current.as_mut() {
            if t == "}" {
                out.insert(std::mem::take(name), std::mem::take(rules));
                current = None;
            } else if !t.is_empty() {
                rules.push(t.to_string());
            }
        } else if let Some(name) = t.strip_prefix("chain ") {
            current = Some((name.trim_end_matches(" {").to_string(), Vec::new()));
        }
    }
    out
}

/// The real `nft`, recording every transaction.
#[derive(Default)]
struct Recording {
    inner: ProcessEdge,
    transactions: Vec<String>,
}

impl NftEdge for Recording {
    fn apply(&mut self, t: &str) -> Result<(), BackendError> {
        self.transactions.push(t.to_string());
        self.inner.apply(t)
    }
    fn tables(&mut self) -> Result<Vec<(String, String)>, BackendError> {
        self.inner.tables()
    }
    fn list_table(&mut self, family: IpFamily) -> Result<Option<TableState>, BackendError> {
        self.inner.list_table(family)
    }
    fn canary(&mut self, family: IpFamily) -> Result<bool, BackendError> {
        self.inner.canary(family)
    }
}

fn cfg(family: IpFamily) -> RenderConfig {
    RenderConfig {
        family,
        ..RenderConfig::default()
    }
}

#[test]
fn endpoint_change_is_a_chain_delta_and_converges_in_the_kernel() {
    if !kernel_tests_possible("endpoint_change_is_a_chain_delta_and_converges_in_the_kernel") {
        return;
    }
    let ns = Netns::new("nftdelta");
    let fresh = Netns::new("nftfresh");
    let names: Vec<String> = (0..50).map(|i| format!("svc{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut tracker = tracker_with(&names);
    let mut b = NftablesBackend::new(
        Recording::default(),
        &[IpFamily::V4],
        Box::new(|family, _| cfg(family)),
    );
    ns.enter(|| {
        let (snap, changes) = tracker.drain();
        let s = b.sync(&snap, &changes, true).unwrap();
        assert!(s.full);
        drop(snap);

        set_endpoints(&mut tracker, "svc7", &["10.244.7.1", "10.250.0.99"]);
        let (snap, changes) = tracker.drain();
        let s = b.sync(&snap, &changes, false).unwrap();
        assert!(!s.full);
        assert_eq!((s.objects_written, s.objects_deleted), (2, 1));
        let delta = b.edge().transactions.last().unwrap().clone();
        for line in delta.lines() {
            let verb: Vec<&str> = line.split_whitespace().take(2).collect();
            assert!(
                matches!(
                    verb.as_slice(),
                    ["add", "chain"] | ["flush", "chain"] | ["add", "rule"] | ["delete", "chain"]
                ),
                "unexpected command in an endpoint delta: {line}"
            );
            assert!(line.contains("ns/svc7/"), "other service touched: {line}");
        }
        assert!(delta.contains("__10.250.0.99/8080"));

        // The kernel now holds exactly what a full load of the same snapshot holds.
        let after_delta = ProcessEdge.list_table(IpFamily::V4).unwrap().unwrap();
        let mut full = String::new();
        Mirror::render(&cfg(IpFamily::V4), &snap).write_full(&mut full);
        let out = fresh.run_with_input(&["nft", "-f", "-"], &full);
        assert!(out.status.success());
        let fresh_json = fresh.ok(&["nft", "-j", "list", "table", "ip", "svcproxy"]);
        let from_full =
            svcproxy::dataplane::nftables::edge::parse_listing(fresh_json.as_bytes()).unwrap();
        assert_eq!(after_delta, from_full, "delta and full load differ");
        // ...rule for rule: every chain's rules, as nft prints them back.
        let rules_after_delta = chain_rules(&ns.ok(&["nft", "list", "table", "ip", "svcproxy"]));
        let rules_from_full = chain_rules(&fresh.ok(&["nft", "list", "table", "ip", "svcproxy"]));
        assert_eq!(rules_after_delta.len(), from_full.chains.len());
        assert_eq!(rules_after_delta, rules_from_full, "chain rules differ");
        assert!(
            after_delta
                .chains
                .iter()
                .any(|c| c.ends_with("__10.250.0.99/8080"))
        );
        assert!(
            !after_delta
                .chains
                .iter()
                .any(|c| c.ends_with("ns/svc7/tcp/p__10.244.7.2/8080"))
        );

        // The periodic resync reads the kernel back and finds no drift...
        let s = b.sync(&snap, &Changes::default(), true).unwrap();
        assert_eq!(s.drift, 0, "the mirror matches the real listing");
        // ...until someone deletes an element behind svcproxy's back.
        let out = std::process::Command::new("nft")
            .args([
                "delete",
                "element",
                "ip",
                "svcproxy",
                "service-ips",
                "{ 10.96.0.1 . tcp . 80 }",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let s = b.sync(&snap, &Changes::default(), true).unwrap();
        assert_eq!(s.drift, 1);
        let repaired = ProcessEdge.list_table(IpFamily::V4).unwrap().unwrap();
        assert_eq!(repaired, from_full, "drift repaired");
        assert!(b.rules_intact());
        let out = std::process::Command::new("nft")
            .args(["flush", "ruleset"])
            .output()
            .unwrap();
        assert!(out.status.success());
        assert!(!b.rules_intact(), "the canary sees the flush");
    });
}

/// Runs the proxy in `ns` in `mode` on `examples/cluster` until its first sync, then stops it.
fn run_until_synced(ns: &Netns, mode: &str) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_svcproxy")])
        .args(["--proxy-mode", mode, "--hostname-override", "node-a"])
        .args([
            "--cluster-cidr",
            "10.244.0.0/16",
            "--min-sync-period",
            "100ms",
        ])
        .arg("--manifests-dir")
        .arg(root.join("examples/cluster"))
        .env("RUST_LOG", "info")
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut text = String::new();
    while std::time::Instant::now() < end {
        text = std::fs::read_to_string(log.path()).unwrap();
        if text.contains("synced rules") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        text.contains("synced rules"),
        "{mode} never synced:\n{text}"
    );
}

#[test]
fn switching_modes_removes_the_other_modes_rules() {
    if !kernel_tests_possible("switching_modes_removes_the_other_modes_rules") {
        return;
    }
    let ns = Netns::new("nftswitch");
    run_until_synced(&ns, "iptables");
    assert!(
        ns.ok(&["iptables-save", "-t", "nat"])
            .contains("KUBE-SERVICES")
    );
    // Upstream kube-proxy's nftables table, as a node taken over would have it.
    ns.ok(&["nft", "add", "table", "ip", "kube-proxy"]);

    run_until_synced(&ns, "nftables");
    let saved = ns.ok(&["iptables-save"]);
    assert!(!saved.contains("KUBE-"), "iptables chains left:\n{saved}");
    let tables = ns.ok(&["nft", "list", "tables"]);
    assert!(tables.contains("table ip svcproxy"), "{tables}");
    assert!(
        !tables.contains("kube-proxy"),
        "upstream table left: {tables}"
    );

    run_until_synced(&ns, "iptables");
    let tables = ns.ok(&["nft", "list", "tables"]);
    assert!(
        !tables.contains("svcproxy"),
        "nftables table left: {tables}"
    );
    assert!(
        ns.ok(&["iptables-save", "-t", "nat"])
            .contains("KUBE-SERVICES")
    );
}
