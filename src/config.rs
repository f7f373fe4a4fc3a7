//! Proxy settings with upstream kube-proxy's flag names, shared by the daemon and `render`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use crate::config_file::FileSettings;

use crate::dataplane::iptables::{LocalDetector, NodePortAddresses, RenderConfig};
use crate::model::{IpFamily, NodeInfo};

/// `--detect-local-mode` values (upstream's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DetectLocalMode {
    /// Pods are sources inside `--cluster-cidr`.
    #[value(name = "ClusterCIDR")]
    ClusterCidr,
    /// Pods are sources inside this Node's `spec.podCIDRs`.
    #[value(name = "NodeCIDR")]
    NodeCidr,
    /// Pods arrive through `--pod-bridge-interface`.
    #[value(name = "BridgeInterface")]
    BridgeInterface,
    /// Pods arrive through interfaces named `--pod-interface-name-prefix`*.
    #[value(name = "InterfaceNamePrefix")]
    InterfaceNamePrefix,
}

/// An invalid combination of settings.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A detect-local mode without the setting it needs.
    #[error("--detect-local-mode {mode} needs {needs}")]
    DetectLocalIncomplete {
        /// The mode.
        mode: &'static str,
        /// The missing flag.
        needs: &'static str,
    },
    /// A masquerade bit outside 0..=31.
    #[error("--iptables-masquerade-bit {0} is out of range (0-31)")]
    MasqueradeBit(u8),
    /// A bind address that is neither `ip:port` nor an IP.
    #[error("{flag} {value:?} is not an address (use ip:port, an IP, or \"\" to disable)")]
    BindAddress {
        /// The flag or config field.
        flag: &'static str,
        /// What was given.
        value: String,
    },
    /// A value in the config file that svcproxy does not support.
    #[error("config file: {field}: {value:?} is not supported ({why})")]
    Unsupported {
        /// The field.
        field: &'static str,
        /// Its value.
        value: String,
        /// Why, or what is supported.
        why: &'static str,
    },
    /// Neither an API server nor a manifests directory can be used.
    #[error("--manifests-dir and --kubeconfig/--master are exclusive: pick one source")]
    TwoSources,
}

/// `--proxy-mode` values (upstream's names; `userspace` is svcproxy's TCP proxy).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyMode {
    /// iptables-restore batches in upstream's chain layout.
    #[default]
    Iptables,
    /// One nftables table per family, deltas as single `nft` transactions.
    Nftables,
    /// Proxy connections in the svcproxy process (no NAT rules).
    Userspace,
}

impl ProxyMode {
    /// The name used in flags, logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            ProxyMode::Iptables => "iptables",
            ProxyMode::Nftables => "nftables",
            ProxyMode::Userspace => "userspace",
        }
    }

    fn from_config(value: &str) -> Result<Self, ConfigError> {
        <Self as clap::ValueEnum>::from_str(value, false).map_err(|_| ConfigError::Unsupported {
            field: "mode",
            value: value.to_string(),
            why: "svcproxy implements iptables, nftables and userspace",
        })
    }
}

/// Log output format (`--logging-format`, upstream's flag).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Flags of the proxy daemon (upstream kube-proxy's names). Fields without a clap default
/// are `Option`s so that a value from `--config` applies unless the flag was given.
#[derive(Clone, Debug, clap::Args)]
pub struct DaemonFlags {
    /// Which proxy mode to use [default: iptables].
    #[arg(long, value_enum)]
    pub proxy_mode: Option<ProxyMode>,
    /// A KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1) file; flags given on the
    /// command line override its values.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Kubeconfig file with the API server and credentials (default: in-cluster config).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The API server URL, overriding the kubeconfig's (http:// works).
    #[arg(long)]
    pub master: Option<String>,
    /// Read Services, EndpointSlices and Nodes from YAML/JSON files in this directory and
    /// watch it for changes, instead of the API server (standalone nodes, demos, tests).
    #[arg(long)]
    pub manifests_dir: Option<PathBuf>,
    /// Minimum interval between rule syncs (Go duration) [default: 1s].
    #[arg(long, alias = "iptables-min-sync-period", value_parser = parse_duration)]
    pub min_sync_period: Option<Duration>,
    /// Maximum interval between full rule syncs (Go duration) [default: 30s].
    #[arg(long, alias = "iptables-sync-period", value_parser = parse_duration)]
    pub sync_period: Option<Duration>,
    /// Address of the metrics server (`ip:port`; "" disables) [default: 127.0.0.1:10249].
    #[arg(long)]
    pub metrics_bind_address: Option<String>,
    /// Address of the /healthz and /livez server (`ip:port`; "" disables)
    /// [default: 0.0.0.0:10256].
    #[arg(long)]
    pub healthz_bind_address: Option<String>,
    /// Log verbosity as klog's: 0-2 info, 3-4 debug, 5+ trace (RUST_LOG overrides).
    #[arg(short = 'v', long = "v")]
    pub verbosity: Option<u32>,
    /// Log format.
    #[arg(long, value_enum)]
    pub logging_format: Option<LogFormat>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub proxy: ProxyFlags,
}

/// Where Services, EndpointSlices and Nodes come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceSettings {
    /// The API server.
    Api {
        /// `--kubeconfig` (or `clientConnection.kubeconfig`).
        kubeconfig: Option<PathBuf>,
        /// `--master`.
        master: Option<String>,
    },
    /// `--manifests-dir`.
    Manifests(PathBuf),
}

/// The daemon's effective settings: flags over the config file over upstream's defaults.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Proxy mode.
    pub mode: ProxyMode,
    /// The source of objects.
    pub source: SourceSettings,
    /// Rule-shaping settings.
    pub proxy: ProxyFlags,
    /// `--min-sync-period`.
    pub min_sync_period: Duration,
    /// `--sync-period`.
    pub sync_period: Duration,
    /// Metrics server address; `None` = disabled.
    pub metrics_bind_address: Option<SocketAddr>,
    /// Health server address; `None` = disabled.
    pub healthz_bind_address: Option<SocketAddr>,
    /// klog-style verbosity.
    pub verbosity: u32,
    /// Log format.
    pub logging_format: LogFormat,
}

/// Upstream's default metrics address.
pub const DEFAULT_METRICS_ADDRESS: &str = "127.0.0.1:10249";
/// Upstream's default healthz address.
pub const DEFAULT_HEALTHZ_ADDRESS: &str = "0.0.0.0:10256";

/// `ip:port`, or a bare IP with `default_port`; empty means disabled.
pub fn parse_bind_address(
    flag: &'static str,
    value: &str,
    default_port: u16,
) -> Result<Option<SocketAddr>, ConfigError> {
    let v = value.trim();
    if v.is_empty() {
        return Ok(None);
    }
    if let Ok(a) = v.parse::<SocketAddr>() {
        return Ok(Some(a));
    }
    v.trim_matches(['[', ']'])
        .parse::<IpAddr>()
        .map(|ip| Some(SocketAddr::new(ip, default_port)))
        .map_err(|_| ConfigError::BindAddress {
            flag,
            value: value.to_string(),
        })
}

impl Settings {
    /// Merges `flags` over `file` over the defaults. `explicit(id)` says whether the flag
    /// with clap id `id` (the field name) was given on the command line: flags with a clap
    /// default only override the file when they were.
    pub fn resolve(
        flags: &DaemonFlags,
        explicit: &dyn Fn(&str) -> bool,
        file: Option<&FileSettings>,
    ) -> Result<Settings, ConfigError> {
        let empty = FileSettings::default();
        let file = file.unwrap_or(&empty);
        let mode = match (flags.proxy_mode, &file.proxy_mode) {
            (Some(m), _) => m,
            (None, Some(m)) if !m.is_empty() => ProxyMode::from_config(m)?,
            _ => ProxyMode::Iptables,
        };
        let kubeconfig = flags.kubeconfig.clone().or_else(|| file.kubeconfig.clone());
        let source = match (&flags.manifests_dir, &flags.master, &flags.kubeconfig) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => return Err(ConfigError::TwoSources),
            (Some(dir), None, None) => SourceSettings::Manifests(dir.clone()),
            (None, master, _) => SourceSettings::Api {
                kubeconfig,
                master: master.clone(),
            },
        };
        let mut proxy = flags.proxy.clone();
        if proxy.hostname_override.is_none() {
            proxy.hostname_override = file.hostname_override.clone().filter(|h| !h.is_empty());
        }
        if proxy.cluster_cidr.is_empty() {
            proxy.cluster_cidr = file.cluster_cidr.clone();
        }
        if proxy.nodeport_addresses.is_empty() {
            proxy.nodeport_addresses = file.nodeport_addresses.clone().unwrap_or_default();
        }
        if !explicit("masquerade_all") {
            proxy.masquerade_all = file.masquerade_all.unwrap_or(proxy.masquerade_all);
        }
        if !explicit("iptables_masquerade_bit") {
            proxy.iptables_masquerade_bit =
                file.masquerade_bit.unwrap_or(proxy.iptables_masquerade_bit);
        }
        if !explicit("iptables_localhost_nodeports") {
            proxy.iptables_localhost_nodeports = file
                .localhost_nodeports
                .unwrap_or(proxy.iptables_localhost_nodeports);
        }
        if proxy.detect_local_mode.is_none() {
            proxy.detect_local_mode = file.detect_local_mode;
        }
        if proxy.pod_bridge_interface.is_none() {
            proxy.pod_bridge_interface = file.pod_bridge_interface.clone();
        }
        if proxy.pod_interface_name_prefix.is_none() {
            proxy.pod_interface_name_prefix = file.pod_interface_name_prefix.clone();
        }
        let metrics = flags
            .metrics_bind_address
            .clone()
            .or_else(|| file.metrics_bind_address.clone())
            .unwrap_or_else(|| DEFAULT_METRICS_ADDRESS.into());
        let healthz = flags
            .healthz_bind_address
            .clone()
            .or_else(|| file.healthz_bind_address.clone())
            .unwrap_or_else(|| DEFAULT_HEALTHZ_ADDRESS.into());
        let logging_format = match (flags.logging_format, file.logging_format.as_deref()) {
            (Some(f), _) => f,
            (None, Some("json")) => LogFormat::Json,
            (None, Some("text" | "")) | (None, None) => LogFormat::Text,
            (None, Some(other)) => {
                return Err(ConfigError::Unsupported {
                    field: "logging.format",
                    value: other.to_string(),
                    why: "use text or json",
                });
            }
        };
        let settings = Settings {
            mode,
            source,
            min_sync_period: flags
                .min_sync_period
                .or(file.min_sync_period)
                .unwrap_or(Duration::from_secs(1)),
            sync_period: flags
                .sync_period
                .or(file.sync_period)
                .unwrap_or(Duration::from_secs(30)),
            metrics_bind_address: parse_bind_address("--metrics-bind-address", &metrics, 10249)?,
            healthz_bind_address: parse_bind_address("--healthz-bind-address", &healthz, 10256)?,
            verbosity: flags.verbosity.or(file.verbosity).unwrap_or(0),
            logging_format,
            proxy,
        };
        // Validate the rule-shaping combination now rather than at the first sync.
        settings
            .proxy
            .render_config(IpFamily::V4, &NodeInfo::default(), &[])?;
        Ok(settings)
    }

    /// The tracing filter for the verbosity: klog's 0-2 are info, 3-4 debug, 5+ trace.
    pub fn log_filter(&self) -> &'static str {
        match self.verbosity {
            0..=2 => "info",
            3..=4 => "debug",
            _ => "trace",
        }
    }
}

/// Flags that shape the rule set (upstream names and defaults).
#[derive(Clone, Debug, clap::Args)]
pub struct ProxyFlags {
    /// Name of this node (default: the host name).
    #[arg(long)]
    pub hostname_override: Option<String>,
    /// The cluster's pod CIDRs, comma-separated (one per family).
    #[arg(long, value_delimiter = ',')]
    pub cluster_cidr: Vec<IpNet>,
    /// CIDRs of node addresses that accept NodePort traffic, comma-separated; `primary` means
    /// the node's primary addresses, `localhost` the loopback ones, `all` every address
    /// (upstream's keywords). Default: all local addresses.
    #[arg(long, value_delimiter = ',')]
    pub nodeport_addresses: Vec<String>,
    /// SNAT all traffic sent to cluster IPs (`--masquerade-all` or `--masquerade-all=false`,
    /// as Go flags accept).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub masquerade_all: bool,
    /// How traffic from local pods is recognised (default ClusterCIDR when --cluster-cidr is
    /// set, else none).
    #[arg(long, value_enum)]
    pub detect_local_mode: Option<DetectLocalMode>,
    /// Bridge interface for `--detect-local-mode BridgeInterface`.
    #[arg(long)]
    pub pod_bridge_interface: Option<String>,
    /// Interface prefix for `--detect-local-mode InterfaceNamePrefix`.
    #[arg(long)]
    pub pod_interface_name_prefix: Option<String>,
    /// Bit of the packet mark used for SNAT (0x4000 by default).
    #[arg(long, default_value_t = 14)]
    pub iptables_masquerade_bit: u8,
    /// Accept NodePort connections to 127.0.0.1 (IPv4 only; sets route_localnet).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub iptables_localhost_nodeports: bool,
}

impl ProxyFlags {
    /// The node name: `--hostname-override`, else the host name (lower-cased, as upstream).
    pub fn node_name(&self) -> String {
        let given = self
            .hostname_override
            .as_deref()
            .map(|h| h.trim().to_lowercase())
            .filter(|h| !h.is_empty());
        given.unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_lowercase())
                .unwrap_or_default()
        })
    }

    /// The local-traffic detector for this node.
    pub fn local_detector(&self, node: &NodeInfo) -> Result<LocalDetector, ConfigError> {
        let mode = self.detect_local_mode.or(if self.cluster_cidr.is_empty() {
            None
        } else {
            Some(DetectLocalMode::ClusterCidr)
        });
        Ok(match mode {
            None => LocalDetector::None,
            Some(DetectLocalMode::ClusterCidr) if self.cluster_cidr.is_empty() => {
                return Err(ConfigError::DetectLocalIncomplete {
                    mode: "ClusterCIDR",
                    needs: "--cluster-cidr",
                });
            }
            Some(DetectLocalMode::ClusterCidr) => LocalDetector::Cidrs(self.cluster_cidr.clone()),
            // The node's podCIDRs may not be known yet; detection starts once they are.
            Some(DetectLocalMode::NodeCidr) => LocalDetector::Cidrs(node.pod_cidrs.clone()),
            Some(DetectLocalMode::BridgeInterface) => {
                LocalDetector::BridgeInterface(self.pod_bridge_interface.clone().ok_or(
                    ConfigError::DetectLocalIncomplete {
                        mode: "BridgeInterface",
                        needs: "--pod-bridge-interface",
                    },
                )?)
            }
            Some(DetectLocalMode::InterfaceNamePrefix) => {
                LocalDetector::InterfaceNamePrefix(self.pod_interface_name_prefix.clone().ok_or(
                    ConfigError::DetectLocalIncomplete {
                        mode: "InterfaceNamePrefix",
                        needs: "--pod-interface-name-prefix",
                    },
                )?)
            }
        })
    }

    /// Resolves `--nodeport-addresses` against the node's addresses (`local` are the
    /// addresses on this host's interfaces; loopback ones are considered too).
    pub fn node_port_addresses(&self, node: &NodeInfo, local: &[IpAddr]) -> NodePortAddresses {
        if self.nodeport_addresses.is_empty() || self.nodeport_addresses.iter().any(|a| a == "all")
        {
            return NodePortAddresses::All;
        }
        let mut candidates: Vec<IpAddr> = local.to_vec();
        candidates.extend(node.addresses.iter().copied());
        candidates.extend(
            ["127.0.0.1".parse::<IpAddr>().ok(), "::1".parse().ok()]
                .into_iter()
                .flatten(),
        );
        let mut ips = Vec::new();
        for spec in &self.nodeport_addresses {
            let selected: Vec<IpAddr> = if spec == "localhost" {
                candidates
                    .iter()
                    .copied()
                    .filter(IpAddr::is_loopback)
                    .collect()
            } else if spec == "primary" {
                [IpFamily::V4, IpFamily::V6]
                    .iter()
                    .filter_map(|f| node.addresses.iter().copied().find(|ip| f.contains(ip)))
                    .collect()
            } else if let Ok(net) = spec.parse::<IpNet>() {
                candidates
                    .iter()
                    .copied()
                    .filter(|ip| net.contains(ip))
                    .collect()
            } else {
                tracing::warn!(value = %spec, "ignoring --nodeport-addresses entry that is neither a CIDR nor 'primary'");
                Vec::new()
            };
            for ip in selected {
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
        }
        NodePortAddresses::Ips(ips)
    }

    /// The iptables render settings for `family` on `node`.
    pub fn render_config(
        &self,
        family: IpFamily,
        node: &NodeInfo,
        local: &[IpAddr],
    ) -> Result<RenderConfig, ConfigError> {
        if self.iptables_masquerade_bit > 31 {
            return Err(ConfigError::MasqueradeBit(self.iptables_masquerade_bit));
        }
        Ok(RenderConfig {
            family,
            masquerade_all: self.masquerade_all,
            masquerade_bit: self.iptables_masquerade_bit,
            local_detector: self.local_detector(node)?,
            node_port_addresses: self.node_port_addresses(node, local),
            localhost_node_ports: self.iptables_localhost_nodeports,
            ..RenderConfig::default()
        })
    }
}

/// A duration flag that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {0:?} (use Go syntax, e.g. 500ms, 1s, 1m30s)")]
pub struct DurationError(pub String);

/// Parses a Go-style duration (`300ms`, `1s`, `1m30s`, `2h`), as upstream's flags take.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let err = || DurationError(text.to_string());
    let mut rest = text.trim();
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut any = false;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(err)?;
        let value: f64 = rest[..num_len].parse().map_err(|_| err())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(err()),
        };
        total += value * scale;
        rest = &rest[unit_len..];
        any = true;
    }
    if !any {
        return Err(err());
    }
    Ok(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn go_durations() {
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h0m0s"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("1x").is_err());
        assert!(parse_duration("").is_err());
    }

    fn flags(nodeport_addresses: &[&str]) -> ProxyFlags {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            f: ProxyFlags,
        }
        let mut f = T::parse_from(["t"]).f;
        f.nodeport_addresses = nodeport_addresses.iter().map(|s| s.to_string()).collect();
        f
    }

    #[test]
    fn nodeport_address_keywords() {
        let node = NodeInfo {
            addresses: vec!["192.168.0.10".parse().unwrap()],
            ..NodeInfo::default()
        };
        let local: Vec<IpAddr> = vec!["192.168.0.10".parse().unwrap(), "10.0.0.1".parse().unwrap()];
        let ips = |spec: &[&str]| match flags(spec).node_port_addresses(&node, &local) {
            NodePortAddresses::All => vec!["all".to_string()],
            NodePortAddresses::Ips(ips) => ips.iter().map(ToString::to_string).collect(),
        };
        assert_eq!(ips(&[]), ["all"]);
        assert_eq!(ips(&["all"]), ["all"]);
        assert_eq!(ips(&["primary"]), ["192.168.0.10"]);
        assert_eq!(ips(&["localhost"]), ["127.0.0.1", "::1"]);
        assert_eq!(ips(&["10.0.0.0/8"]), ["10.0.0.1"]);
    }

    #[test]
    fn hostname_override_is_trimmed_and_lowercased() {
        let mut f = flags(&[]);
        f.hostname_override = Some(" Node-A ".into());
        assert_eq!(f.node_name(), "node-a");
    }
}
