//! Field names of upstream's v1alpha1 types (k8s.io/kube-proxy/config/v1alpha1, plus the
//! component-base types it embeds), one list per Go struct: the reader rejects any other.

pub(super) const ROOT: &[&str] = &[
    "apiVersion",
    "kind",
    "featureGates",
    "clientConnection",
    "logging",
    "hostnameOverride",
    "bindAddress",
    "healthzBindAddress",
    "metricsBindAddress",
    "bindAddressHardFail",
    "enableProfiling",
    "showHiddenMetricsForVersion",
    "mode",
    "iptables",
    "ipvs",
    "nftables",
    "winkernel",
    "detectLocalMode",
    "detectLocal",
    "clusterCIDR",
    "nodePortAddresses",
    "oomScoreAdj",
    "conntrack",
    "configSyncPeriod",
    "portRange",
    "windowsRunAsService",
];
pub(super) const CLIENT_CONNECTION: &[&str] = &[
    "kubeconfig",
    "acceptContentTypes",
    "contentType",
    "qps",
    "burst",
];
pub(super) const LOGGING: &[&str] = &[
    "format",
    "flushFrequency",
    "verbosity",
    "vmodule",
    "options",
];
pub(super) const VMODULE_ITEM: &[&str] = &["filePattern", "verbosity"];
pub(super) const LOGGING_OPTIONS: &[&str] = &["text", "json"];
pub(super) const OUTPUT_ROUTING: &[&str] = &["splitStream", "infoBufferSize"];
pub(super) const IPTABLES: &[&str] = &[
    "masqueradeBit",
    "masqueradeAll",
    "localhostNodePorts",
    "snatNodeInternalIP",
    "syncPeriod",
    "minSyncPeriod",
];
pub(super) const NFTABLES: &[&str] = &[
    "masqueradeBit",
    "masqueradeAll",
    "syncPeriod",
    "minSyncPeriod",
];
pub(super) const IPVS: &[&str] = &[
    "syncPeriod",
    "minSyncPeriod",
    "scheduler",
    "excludeCIDRs",
    "strictARP",
    "tcpTimeout",
    "tcpFinTimeout",
    "udpTimeout",
];
pub(super) const WINKERNEL: &[&str] = &[
    "networkName",
    "sourceVip",
    "enableDSR",
    "rootHnsEndpointName",
    "forwardHealthCheckVip",
];
pub(super) const DETECT_LOCAL: &[&str] = &["bridgeInterface", "interfaceNamePrefix"];
pub(super) const CONNTRACK: &[&str] = &[
    "maxPerCore",
    "min",
    "tcpEstablishedTimeout",
    "tcpCloseWaitTimeout",
    "tcpBeLiberal",
    "udpTimeout",
    "udpStreamTimeout",
];
