//! Proxy settings with upstream kube-proxy's flag names, shared by the daemon and `render`.

use std::net::IpAddr;

use ipnet::IpNet;

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
    /// the node's primary addresses. Default: all local addresses.
    #[arg(long, value_delimiter = ',')]
    pub nodeport_addresses: Vec<String>,
    /// SNAT all traffic sent to cluster IPs.
    #[arg(long)]
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
        self.hostname_override.clone().unwrap_or_else(|| {
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
        if self.nodeport_addresses.is_empty() {
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
            let selected: Vec<IpAddr> = if spec == "primary" {
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
pub fn parse_duration(text: &str) -> Result<std::time::Duration, DurationError> {
    let err = || DurationError(text.to_string());
    let mut rest = text.trim();
    if rest == "0" {
        return Ok(std::time::Duration::ZERO);
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
    Ok(std::time::Duration::from_secs_f64(total))
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
}
