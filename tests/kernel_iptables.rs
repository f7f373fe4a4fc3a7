//! Rendered rule sets load into a real kernel: each golden file is restored into a fresh
//! network namespace with iptables-nft and iptables-legacy, and `iptables-save` shows every
//! declared chain and the jump rules. Needs root; namespaces are removed even on failure.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::builders::{service, slice};
use common::{Netns, kernel_tests_possible};
use svcproxy::dataplane::iptables::{RenderConfig, Renderer, Scope};
use svcproxy::model::{ChangeTracker, IpFamily, NodeInfo, ServiceName};

fn golden_files() -> Vec<(String, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        // `.nft` files are nftables transactions (tests/kernel_nftables.rs).
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    assert!(files.len() >= 4, "golden files missing");
    files
}

/// Chains declared per table in a restore input.
fn declared_chains(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut table = String::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.to_string();
        } else if let Some(decl) = line.strip_prefix(':') {
            out.entry(table.clone())
                .or_default()
                .insert(decl.split(' ').next().unwrap().to_string());
        }
    }
    out
}

fn saved_chains(save: &str) -> BTreeSet<String> {
    save.lines()
        .filter_map(|l| l.strip_prefix(':'))
        .map(|d| d.split(' ').next().unwrap().to_string())
        .collect()
}

#[test]
fn golden_rule_sets_load_into_the_kernel() {
    if !kernel_tests_possible("golden_rule_sets_load_into_the_kernel") {
        return;
    }
    for (name, text) in golden_files() {
        let v6 = name.contains(".v6.");
        for backend in ["nft", "legacy"] {
            let ns = Netns::new("golden");
            let (restore, save) = match (v6, backend) {
                (false, "nft") => ("iptables-nft-restore", "iptables-nft-save"),
                (true, "nft") => ("ip6tables-nft-restore", "ip6tables-nft-save"),
                (false, _) => ("iptables-legacy-restore", "iptables-legacy-save"),
                (true, _) => ("ip6tables-legacy-restore", "ip6tables-legacy-save"),
            };
            let out = ns.run_with_input(&[restore, "--noflush", "--wait"], &text);
            assert!(
                out.status.success(),
                "{restore} rejected {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            for (table, chains) in declared_chains(&text) {
                let saved = ns.ok(&[save, "-t", &table]);
                let present = saved_chains(&saved);
                for c in &chains {
                    assert!(
                        present.contains(c),
                        "{name} ({backend}): chain {c} missing in {table}:\n{saved}"
                    );
                }
                let jump = if table == "nat" {
                    "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
                } else {
                    "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD"
                };
                assert!(
                    saved.contains(jump),
                    "{name} ({backend}): jump rule missing in {table}:\n{saved}"
                );
            }
        }
    }
}

/// A full render followed by partial renders (endpoint removed, service removed) converges
/// in the kernel: the stale chains are deleted and untouched services keep their chains.
#[test]
fn partial_renders_converge_in_the_kernel() {
    if !kernel_tests_possible("partial_renders_converge_in_the_kernel") {
        return;
    }
    let ns = Netns::new("partial");
    let node = NodeInfo {
        name: "node".into(),
        ..NodeInfo::default()
    };
    let mut tracker = ChangeTracker::new(node);
    for (i, svc) in ["a", "b", "c"].iter().enumerate() {
        tracker.update_service(
            ServiceName::new("ns", *svc),
            Some(vec![service(svc, &format!("10.96.0.{}", i + 1), 80)]),
        );
        tracker.update_slice(
            ServiceName::new("ns", *svc),
            format!("{svc}-1"),
            Some(slice(svc, &["10.244.0.1", "10.244.0.2"])),
        );
    }
    let mut renderer = Renderer::new(RenderConfig {
        family: IpFamily::V4,
        ..RenderConfig::default()
    });
    let (snap, _) = tracker.drain();
    let full = renderer.render(
        &snap,
        Scope::Full {
            existing: &BTreeSet::new(),
        },
    );
    assert!(full.full);
    let out = ns.run_with_input(&["iptables-restore", "--noflush", "--wait"], &full.text);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    renderer.set_insert_jumps(false);
    let before = saved_chains(&ns.ok(&["iptables-save", "-t", "nat"]));
    assert_eq!(
        before.iter().filter(|c| c.starts_with("KUBE-SEP-")).count(),
        6
    );
    drop(snap);

    // Service a loses an endpoint, service c goes away, service d arrives.
    tracker.update_service(
        ServiceName::new("ns", "d"),
        Some(vec![service("d", "10.96.0.4", 80)]),
    );
    tracker.update_slice(
        ServiceName::new("ns", "d"),
        "d-1".into(),
        Some(slice("d", &["10.244.0.9"])),
    );
    tracker.update_slice(
        ServiceName::new("ns", "a"),
        "a-1".into(),
        Some(slice("a", &["10.244.0.1"])),
    );
    tracker.update_service(ServiceName::new("ns", "c"), None);
    let (snap, changes) = tracker.drain();
    let partial = renderer.render(
        &snap,
        Scope::Partial {
            changed: &changes.services,
        },
    );
    assert!(!partial.full);
    assert_eq!(
        partial.chains_deleted.len(),
        4,
        "a's second SEP + c's SVC and two SEPs: {:?}",
        partial.chains_deleted
    );
    assert_eq!(
        partial.text.matches(":KUBE-SVC-").count(),
        3,
        "a rewritten, d created, c declared to be deleted:
{}",
        partial.text
    );
    let out = ns.run_with_input(&["iptables-restore", "--noflush", "--wait"], &partial.text);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        partial.text
    );

    let after = saved_chains(&ns.ok(&["iptables-save", "-t", "nat"]));
    for c in &partial.chains_deleted {
        assert!(!after.contains(c), "stale chain {c} still in the kernel");
    }
    let desired: BTreeSet<String> = renderer.desired_chains().map(String::from).collect();
    let kube_after: BTreeSet<String> = after
        .into_iter()
        .filter(|c| svcproxy::dataplane::naming::is_service_chain(c))
        .collect();
    assert_eq!(
        kube_after, desired,
        "kernel chains equal the renderer's desired chains"
    );
    let save = ns.ok(&["iptables-save", "-t", "nat"]);
    assert!(
        save.contains("ns/b:p cluster IP"),
        "untouched service b is still served"
    );
    assert!(!save.contains("ns/c:p"), "deleted service c is gone");
    let services: Vec<&str> = save
        .lines()
        .filter(|l| l.starts_with("-A KUBE-SERVICES "))
        .collect();
    assert!(
        services.iter().any(|l| l.contains("ns/d:p cluster IP")),
        "new service d: {services:?}"
    );
    assert!(
        services
            .last()
            .unwrap()
            .contains("kubernetes service nodeports"),
        "node-ports rule last: {services:?}"
    );
    // The jump rules were inserted once, not again by the partial render.
    assert_eq!(
        save.matches("-A PREROUTING -m comment --comment \"kubernetes service portals\"")
            .count(),
        1
    );
}

/// Full syncs on iptables-nft carry a `-S` prelude that makes iptables-restore print the
/// whole table. Over a table larger than a pipe buffer that output must not block the
/// restore (it once could: stdout was a pipe nobody read while the batch was written).
#[test]
fn bulk_restores_over_a_large_table_finish() {
    use std::sync::mpsc;
    use svcproxy::dataplane::iptables::edge::{IptablesEdge, ProcessEdge, Variant};
    if !kernel_tests_possible("bulk_restores_over_a_large_table_finish") {
        return;
    }
    let names: Vec<String> = (0..400).map(|i| format!("s{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut tracker = common::builders::tracker_with(&refs);
    let (snap, _) = tracker.drain();
    let mut renderer = Renderer::new(RenderConfig::default());
    let text = renderer
        .render(
            &snap,
            Scope::Full {
                existing: &BTreeSet::new(),
            },
        )
        .text;
    renderer.set_insert_jumps(false);
    let again = renderer
        .render(
            &snap,
            Scope::Full {
                existing: &BTreeSet::new(),
            },
        )
        .text;

    let ns = Netns::new("bulk");
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| {
            let result = ns.enter(|| {
                let mut edge = ProcessEdge::new(Variant::Nft);
                edge.restore(IpFamily::V4, &text, true)?;
                edge.restore(IpFamily::V4, &again, true)
            });
            let _ = tx.send(result.map_err(|e| e.to_string()));
        });
        let result = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("bulk restore hung (stdout pipe deadlock?)");
        result.expect("bulk restore failed");
    });
    let save = ns.ok(&["iptables-save", "-t", "nat"]);
    assert!(
        save.len() > 64 * 1024,
        "the table must exceed a pipe buffer: {} bytes",
        save.len()
    );
    assert_eq!(save.matches(":KUBE-SVC-").count(), 400);
}
