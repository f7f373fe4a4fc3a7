//! Golden renders: `svcproxy render` of the fixtures in `examples/` compared with the
//! checked-in output in `tests/golden/`.
//!
//! Every case is rendered in both modes: `NAME.txt` is the iptables-restore input,
//! `NAME.nft` the nftables transaction (`--proxy-mode nftables`) for the same fixtures.
//!
//! After an intended change, regenerate with `UPDATE_GOLDEN=1 cargo test --test golden` and
//! review the diff like any other code change.

use std::path::{Path, PathBuf};
use std::process::Command;

/// (golden file, render arguments)
pub const CASES: &[(&str, &[&str])] = &[
    (
        "cluster.v4.txt",
        &[
            "-f",
            "examples/cluster",
            "--hostname-override",
            "node-a",
            "--cluster-cidr",
            "10.244.0.0/16,fd00:10:244::/56",
        ],
    ),
    (
        "cluster.v6.txt",
        &[
            "-f",
            "examples/cluster",
            "--hostname-override",
            "node-a",
            "--cluster-cidr",
            "10.244.0.0/16,fd00:10:244::/56",
            "--ip-family",
            "6",
        ],
    ),
    (
        "cluster.node-b.masquerade-all.v4.txt",
        &[
            "-f",
            "examples/cluster",
            "--hostname-override",
            "node-b",
            "--masquerade-all",
            "--nodeport-addresses",
            "192.168.0.0/24,127.0.0.0/8",
        ],
    ),
    (
        "cluster.nodecidr.nodeport-primary.v6.txt",
        &[
            "-f",
            "examples/cluster/node.yaml",
            "-f",
            "examples/cluster/dual-stack.yaml",
            "--hostname-override",
            "node-a",
            "--detect-local-mode",
            "NodeCIDR",
            "--nodeport-addresses",
            "primary",
            "--ip-family",
            "6",
        ],
    ),
    (
        "cluster.no-localhost-nodeports.bridge.v4.txt",
        &[
            "-f",
            "examples/cluster",
            "--hostname-override",
            "node-a",
            "--iptables-localhost-nodeports=false",
            "--detect-local-mode",
            "BridgeInterface",
            "--pod-bridge-interface",
            "cbr0",
        ],
    ),
    (
        "invalid.v4.txt",
        &["-f", "examples/invalid", "--hostname-override", "node-a"],
    ),
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn render(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_svcproxy"))
        .current_dir(root())
        .arg("render")
        .args(args)
        .output()
        .expect("run svcproxy render");
    assert!(
        out.status.success(),
        "render {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn check(file: &str, actual: &str) {
    let path = root().join("tests/golden").join(file);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).expect("write golden file");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run UPDATE_GOLDEN=1 cargo test --test golden)",
            path.display()
        )
    });
    if expected != actual {
        let first = expected
            .lines()
            .zip(actual.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(expected.lines().count().min(actual.lines().count()));
        panic!(
            "{} differs from the render at line {}:\n  expected: {:?}\n  actual:   {:?}\n\
             If the change is intended: UPDATE_GOLDEN=1 cargo test --test golden",
            Path::new(file).display(),
            first + 1,
            expected.lines().nth(first),
            actual.lines().nth(first)
        );
    }
}

/// The nftables golden file of an iptables case (`cluster.v4.txt` → `cluster.v4.nft`).
pub fn nft_file(file: &str) -> String {
    format!("{}.nft", file.trim_end_matches(".txt"))
}

fn with_nftables<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut v = args.to_vec();
    v.extend(["--proxy-mode", "nftables"]);
    v
}

#[test]
fn golden_renders_match() {
    for (file, args) in CASES {
        check(file, &render(args));
    }
}

#[test]
fn nftables_golden_renders_match() {
    for (file, args) in CASES {
        check(&nft_file(file), &render(&with_nftables(args)));
    }
}

#[test]
fn every_golden_file_has_a_case() {
    for entry in std::fs::read_dir(root().join("tests/golden")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(
            CASES.iter().any(|(f, _)| *f == name || nft_file(f) == name),
            "tests/golden/{name} has no case: delete it"
        );
    }
}

#[test]
fn render_is_deterministic() {
    let (_, args) = CASES[0];
    assert_eq!(render(args), render(args));
    let nft = with_nftables(args);
    assert_eq!(render(&nft), render(&nft));
}
