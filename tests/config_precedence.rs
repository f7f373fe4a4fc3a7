//! Flags over the KubeProxyConfiguration file over upstream's defaults, decided the way the
//! binary decides it (clap's value sources), plus the binary's `--check-config` on real files.

use std::process::Command;

use clap::{CommandFactory, FromArgMatches, Parser};
use svcproxy::config::{DaemonFlags, LogFormat, ProxyMode, Settings, SourceSettings};
use svcproxy::config_file;

#[derive(Parser, Debug)]
struct Cli {
    #[command(flatten)]
    flags: DaemonFlags,
}

const FILE: &str = "apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
hostnameOverride: from-file
clusterCIDR: 10.244.0.0/16
metricsBindAddress: 0.0.0.0:10249
nodePortAddresses: [192.168.0.0/16]
iptables:
  masqueradeAll: true
  masqueradeBit: 15
  localhostNodePorts: false
  minSyncPeriod: 2s
  syncPeriod: 1m
logging:
  format: json
  verbosity: 4
";

/// Resolves `args` (after the program name) over the config text `file`.
fn resolve(args: &[&str], file: Option<&str>) -> Result<Settings, String> {
    let matches = Cli::command()
        .try_get_matches_from(std::iter::once("svcproxy").chain(args.iter().copied()))
        .map_err(|e| e.to_string())?;
    let cli = Cli::from_arg_matches(&matches).map_err(|e| e.to_string())?;
    let explicit = |id: &str| {
        matches!(
            matches.value_source(id),
            Some(clap::parser::ValueSource::CommandLine)
        )
    };
    let file = file
        .map(|t| config_file::parse(t).map(|(f, _)| f))
        .transpose()
        .map_err(|e| e.to_string())?;
    Settings::resolve(&cli.flags, &explicit, file.as_ref()).map_err(|e| e.to_string())
}

#[test]
fn defaults_are_upstreams() {
    let s = resolve(&[], None).unwrap();
    assert_eq!(s.mode, ProxyMode::Iptables);
    assert_eq!(s.min_sync_period.as_secs(), 1);
    assert_eq!(s.sync_period.as_secs(), 30);
    assert_eq!(
        s.metrics_bind_address.unwrap().to_string(),
        "127.0.0.1:10249"
    );
    assert_eq!(s.healthz_bind_address.unwrap().to_string(), "0.0.0.0:10256");
    assert_eq!(s.proxy.iptables_masquerade_bit, 14);
    assert!(s.proxy.iptables_localhost_nodeports);
    assert!(!s.proxy.masquerade_all);
    assert_eq!(s.logging_format, LogFormat::Text);
    assert_eq!(
        s.source,
        SourceSettings::Api {
            kubeconfig: None,
            master: None
        }
    );
}

#[test]
fn the_file_applies_where_no_flag_is_given() {
    let s = resolve(&[], Some(FILE)).unwrap();
    assert_eq!(s.proxy.hostname_override.as_deref(), Some("from-file"));
    assert_eq!(s.proxy.cluster_cidr[0].to_string(), "10.244.0.0/16");
    assert_eq!(s.proxy.nodeport_addresses, ["192.168.0.0/16"]);
    assert!(s.proxy.masquerade_all);
    assert_eq!(s.proxy.iptables_masquerade_bit, 15);
    assert!(!s.proxy.iptables_localhost_nodeports);
    assert_eq!(s.min_sync_period.as_secs(), 2);
    assert_eq!(s.sync_period.as_secs(), 60);
    assert_eq!(s.metrics_bind_address.unwrap().to_string(), "0.0.0.0:10249");
    assert_eq!(s.verbosity, 4);
    assert_eq!(s.logging_format, LogFormat::Json);
    assert_eq!(
        s.source,
        SourceSettings::Api {
            kubeconfig: Some("/var/lib/kube-proxy/kubeconfig.conf".into()),
            master: None
        }
    );
}

#[test]
fn flags_given_on_the_command_line_override_the_file() {
    let s = resolve(
        &[
            "--hostname-override",
            "from-flag",
            "--cluster-cidr",
            "10.0.0.0/8",
            "--nodeport-addresses",
            "primary",
            "--masquerade-all=false",
            "--iptables-masquerade-bit",
            "14",
            "--iptables-localhost-nodeports",
            "true",
            "--iptables-min-sync-period",
            "500ms",
            "--sync-period",
            "10s",
            "--metrics-bind-address",
            "127.0.0.2:9999",
            "-v",
            "1",
            "--logging-format",
            "text",
            "--kubeconfig",
            "/etc/kubeconfig",
            "--master",
            "http://127.0.0.1:8080",
        ],
        Some(FILE),
    );
    // `--masquerade-all=false` parses as Go's bool flags do, and beats the file's true.
    let s = s.unwrap();
    assert!(!s.proxy.masquerade_all);
    assert_eq!(s.proxy.hostname_override.as_deref(), Some("from-flag"));
    assert_eq!(s.proxy.cluster_cidr[0].to_string(), "10.0.0.0/8");
    assert_eq!(s.proxy.nodeport_addresses, ["primary"]);
    assert_eq!(
        s.proxy.iptables_masquerade_bit, 14,
        "an explicit flag equal to the default still wins"
    );
    assert!(s.proxy.iptables_localhost_nodeports);
    assert_eq!(s.min_sync_period.as_millis(), 500);
    assert_eq!(s.sync_period.as_secs(), 10);
    assert_eq!(
        s.metrics_bind_address.unwrap().to_string(),
        "127.0.0.2:9999"
    );
    assert_eq!(s.verbosity, 1);
    assert_eq!(s.logging_format, LogFormat::Text);
    assert_eq!(
        s.source,
        SourceSettings::Api {
            kubeconfig: Some("/etc/kubeconfig".into()),
            master: Some("http://127.0.0.1:8080".into())
        }
    );
}

#[test]
fn bad_combinations_are_named() {
    let e = resolve(&["--metrics-bind-address", "nowhere"], None).unwrap_err();
    assert!(
        e.contains("--metrics-bind-address") && e.contains("nowhere"),
        "{e}"
    );
    let e = resolve(
        &["--manifests-dir", "/tmp", "--master", "http://127.0.0.1:1"],
        None,
    )
    .unwrap_err();
    assert!(e.contains("--manifests-dir"), "{e}");
    let e = resolve(&["--detect-local-mode", "BridgeInterface"], None).unwrap_err();
    assert!(e.contains("--pod-bridge-interface"), "{e}");
    let file = FILE.replace("masqueradeBit: 15", "masqueradeBits: 15");
    let e = resolve(&[], Some(&file)).unwrap_err();
    assert!(e.contains("iptables.masqueradeBits"), "{e}");
    // An empty bind address disables the server, as upstream.
    let s = resolve(&["--healthz-bind-address", ""], None).unwrap();
    assert_eq!(s.healthz_bind_address, None);
}

#[test]
fn check_config_runs_the_binary_over_a_real_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.conf");
    std::fs::write(&path, FILE).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_svcproxy"))
        .arg("--config")
        .arg(&path)
        .args(["--hostname-override", "node-x", "--check-config"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("node-x"), "flag wins: {stdout}");
    assert!(
        stdout.contains("masquerade_all: true"),
        "file applies: {stdout}"
    );

    let bad = FILE.replace("logging:", "proxyMode: iptables\nlogging:");
    std::fs::write(&path, bad).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_svcproxy"))
        .arg("--config")
        .arg(&path)
        .arg("--check-config")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("proxyMode"),
        "unknown field named: {stderr}"
    );
}
