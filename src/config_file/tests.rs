use std::time::Duration;

use super::*;

fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn doc(body: &str) -> String {
    format!("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n{body}")
}

fn error(body: &str) -> String {
    match parse(&doc(body)) {
        Ok(parsed) => panic!("expected an error for\n{body}\ngot {parsed:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn kubeadm_config_parses_without_warnings() {
    let (settings, warnings) = parse(&fixture("kubeadm-config.conf")).unwrap();
    assert_eq!(warnings, Vec::<String>::new());
    assert_eq!(
        settings,
        FileSettings {
            kubeconfig: Some(PathBuf::from("/var/lib/kube-proxy/kubeconfig.conf")),
            cluster_cidr: vec!["10.244.0.0/16".parse().unwrap()],
            ..FileSettings::default()
        }
    );
}

#[test]
fn upstream_defaults_parse_without_warnings() {
    let (settings, warnings) = parse(&fixture("kube-proxy-defaults.yaml")).unwrap();
    assert_eq!(warnings, Vec::<String>::new());
    assert_eq!(
        settings,
        FileSettings {
            proxy_mode: Some("iptables".into()),
            masquerade_bit: Some(14),
            localhost_nodeports: Some(true),
            min_sync_period: Some(Duration::from_secs(1)),
            sync_period: Some(Duration::from_secs(30)),
            metrics_bind_address: Some("127.0.0.1:10249".into()),
            healthz_bind_address: Some("0.0.0.0:10256".into()),
            detect_local_mode: Some(DetectLocalMode::ClusterCidr),
            logging_format: Some("text".into()),
            ..FileSettings::default()
        }
    );
}

#[test]
fn nftables_mode_reads_the_nftables_section_from_json() {
    let (settings, warnings) = parse(&fixture("nftables-dual-stack.json")).unwrap();
    assert_eq!(
        settings,
        FileSettings {
            proxy_mode: Some("nftables".into()),
            kubeconfig: Some("/etc/kubernetes/proxy.kubeconfig".into()),
            hostname_override: Some("node-a".into()),
            cluster_cidr: vec![
                "10.244.0.0/16".parse().unwrap(),
                "fd00:10:244::/56".parse().unwrap()
            ],
            nodeport_addresses: Some(vec!["primary".into(), "192.168.0.0/16".into()]),
            masquerade_all: Some(true),
            masquerade_bit: Some(9),
            min_sync_period: Some(Duration::from_millis(250)),
            sync_period: Some(Duration::from_secs(60)),
            metrics_bind_address: Some("0.0.0.0:10249".into()),
            detect_local_mode: Some(DetectLocalMode::InterfaceNamePrefix),
            pod_interface_name_prefix: Some("veth".into()),
            verbosity: Some(4),
            logging_format: Some("json".into()),
            ..FileSettings::default()
        }
    );
    // The iptables section is not read in nftables mode; its non-default value says so.
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].starts_with("iptables.syncPeriod: set to 45s"),
        "{warnings:?}"
    );
}

#[test]
fn iptables_and_userspace_modes_read_the_iptables_section() {
    for mode in ["\"\"", "iptables", "userspace"] {
        let (settings, warnings) = parse(&doc(&format!(
            "mode: {mode}\niptables:\n  masqueradeAll: true\n  masqueradeBit: 0\n  minSyncPeriod: 2s\n  syncPeriod: 1m30s\n  localhostNodePorts: false\nnftables:\n  masqueradeBit: 3\n"
        )))
        .unwrap();
        assert_eq!(settings.masquerade_all, Some(true), "{mode}");
        assert_eq!(settings.masquerade_bit, Some(0), "{mode}");
        assert_eq!(settings.min_sync_period, Some(Duration::from_secs(2)));
        assert_eq!(settings.sync_period, Some(Duration::from_secs(90)));
        assert_eq!(settings.localhost_nodeports, Some(false));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].starts_with("nftables.masqueradeBit: set to 3"));
    }
}

#[test]
fn unknown_fields_are_named_with_their_path() {
    assert_eq!(
        error("iptables:\n  masqueradeBits: 3\n"),
        "iptables.masqueradeBits: unknown field"
    );
    assert_eq!(
        error("logging:\n  options:\n    json:\n      bufferSize: 1\n"),
        "logging.options.json.bufferSize: unknown field"
    );
    assert_eq!(
        error("logging:\n  vmodule:\n  - filePattern: x\n    level: 2\n"),
        "logging.vmodule[0].level: unknown field"
    );
    // Top-level sync periods exist only in upstream's internal type, not in v1alpha1.
    assert_eq!(error("syncPeriod: 30s\n"), "syncPeriod: unknown field");
    assert_eq!(
        error("clusterCidr: 10.0.0.0/8\n"),
        "clusterCidr: unknown field"
    );
}

#[test]
fn wrong_api_version_or_kind_names_found_and_expected() {
    let e = parse("apiVersion: kubeproxy.config.k8s.io/v1alpha2\nkind: KubeProxyConfiguration\n")
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "apiVersion: found \"kubeproxy.config.k8s.io/v1alpha2\", expected \"kubeproxy.config.k8s.io/v1alpha1\""
    );
    let e = parse("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeletConfiguration\n")
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "kind: found \"KubeletConfiguration\", expected \"KubeProxyConfiguration\""
    );
    let e = parse("kind: KubeProxyConfiguration\n")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("apiVersion: found \"\""), "{e}");
    assert!(matches!(
        parse("- a\n"),
        Err(ConfigFileError::NotAMapping(_))
    ));
    assert!(matches!(
        parse("mode: [\n"),
        Err(ConfigFileError::Syntax(_))
    ));
}

#[test]
fn unsupported_modes_are_rejected() {
    for mode in ["ipvs", "kernelspace"] {
        let e = error(&format!("mode: {mode}\n"));
        assert!(
            e.starts_with(&format!("mode: \"{mode}\" is not supported by svcproxy")),
            "{e}"
        );
    }
    let e = error("mode: IPTables\n");
    assert!(e.starts_with("mode: invalid value \"IPTables\""), "{e}");
}

#[test]
fn unsupported_fields_warn_only_when_set() {
    let (settings, warnings) = parse(&fixture("unsupported-set.yaml")).unwrap();
    assert_eq!(settings.proxy_mode.as_deref(), Some("iptables"));
    let fields: Vec<&str> = warnings
        .iter()
        .map(|w| w.split(':').next().unwrap())
        .collect();
    assert_eq!(
        fields,
        [
            "featureGates",
            "enableProfiling",
            "portRange",
            "oomScoreAdj",
            "logging.vmodule",
            "ipvs.scheduler",
            "ipvs.strictARP",
            "winkernel.enableDSR",
            "conntrack.maxPerCore",
            "conntrack.tcpBeLiberal",
            "conntrack.udpTimeout",
        ]
    );
    assert!(
        warnings
            .iter()
            .all(|w| w.ends_with("which svcproxy does not act on; ignored"))
    );
    assert!(warnings[5].contains("\"lc\""), "{}", warnings[5]);
}

#[test]
fn values_of_the_wrong_type_or_range_name_the_field() {
    assert_eq!(
        error("iptables:\n  masqueradeBit: x\n"),
        "iptables.masqueradeBit: expected an integer, found \"x\""
    );
    assert_eq!(
        error("iptables:\n  masqueradeBit: 32\n"),
        "iptables.masqueradeBit: invalid value \"32\": must be within [0, 31]"
    );
    assert_eq!(
        error("iptables:\n  syncPeriod: 30\n"),
        "iptables.syncPeriod: expected a duration string such as \"30s\", found 30"
    );
    assert!(
        error("nftables:\n  minSyncPeriod: 1x\n")
            .starts_with("nftables.minSyncPeriod: invalid duration")
    );
    assert_eq!(
        error("hostnameOverride: [a]\n"),
        "hostnameOverride: expected a string, found [\"a\"]"
    );
    assert_eq!(
        error("iptables: 1\n"),
        "iptables: expected a mapping, found 1"
    );
    assert_eq!(
        error("featureGates:\n  A: maybe\n"),
        "featureGates.A: expected true or false, found \"maybe\""
    );
    assert_eq!(
        error("oomScoreAdj: 2000\n"),
        "oomScoreAdj: invalid value \"2000\": must be within [-1000, 1000]"
    );
    assert!(
        error("logging:\n  format: xml\n").starts_with("logging.format: invalid value \"xml\"")
    );
    assert!(
        error("detectLocalMode: PodCIDR\n")
            .starts_with("detectLocalMode: invalid value \"PodCIDR\"")
    );
}

#[test]
fn cidrs_are_checked() {
    let e = error("clusterCIDR: 10.244.0.0/16,bogus\n");
    assert!(e.starts_with("clusterCIDR: invalid CIDR \"bogus\""), "{e}");
    let e = error("clusterCIDR: 10.244.0.0/16,10.245.0.0/16\n");
    assert!(e.ends_with("at most one CIDR per IP family"), "{e}");
    let e = error("nodePortAddresses: [primary, 10.0.0.0/8, eth0]\n");
    assert!(
        e.starts_with("nodePortAddresses[2]: invalid CIDR \"eth0\""),
        "{e}"
    );
    let (s, _) = parse(&doc(
        "nodePortAddresses: [localhost, all]\nclusterCIDR: \"\"\n",
    ))
    .unwrap();
    assert_eq!(
        s.nodeport_addresses,
        Some(vec!["localhost".into(), "all".into()])
    );
    assert!(s.cluster_cidr.is_empty());
}

#[test]
fn zero_values_are_unset() {
    let (s, w) = parse(&doc(
        "mode: \"\"\nhostnameOverride: \"\"\niptables:\n  syncPeriod: 0s\n  minSyncPeriod: \"0\"\n  masqueradeAll: false\nlogging:\n  verbosity: 0\n  format: \"\"\nnodePortAddresses: []\n",
    ))
    .unwrap();
    assert_eq!((s, w), (FileSettings::default(), Vec::new()));
}

#[test]
fn flush_frequency_accepts_nanoseconds_and_durations() {
    for value in ["5000000000", "5s", "0"] {
        let (_, w) = parse(&doc(&format!("logging:\n  flushFrequency: {value}\n"))).unwrap();
        assert!(w.is_empty(), "{value}: {w:?}");
    }
    let (_, w) = parse(&doc("logging:\n  flushFrequency: 1000000000\n")).unwrap();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].starts_with("logging.flushFrequency: set to 1s"));
}

#[test]
fn duplicate_keys_are_rejected() {
    assert!(matches!(
        parse(&doc("mode: iptables\nmode: nftables\n")),
        Err(ConfigFileError::Syntax(_))
    ));
}

#[test]
fn load_names_a_missing_file() {
    let e = load(Path::new("/nonexistent/svcproxy.conf"))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("cannot read /nonexistent/svcproxy.conf"),
        "{e}"
    );
}

#[test]
fn an_empty_file_is_not_a_configuration() {
    let e = parse("").unwrap_err().to_string();
    assert_eq!(e, "expected a KubeProxyConfiguration mapping, found null");
    // The same document twice is not one configuration either.
    let twice = format!(
        "{}---\n{}",
        doc("mode: iptables\n"),
        doc("mode: nftables\n")
    );
    assert!(
        matches!(parse(&twice), Err(ConfigFileError::Syntax(_))),
        "{:?}",
        parse(&twice)
    );
}
