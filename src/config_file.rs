//! Placeholder for upstream's KubeProxyConfiguration file (replaced by the config-file work).

use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use crate::config::DetectLocalMode;

/// Settings read from a KubeProxyConfiguration file; `None` = not set in the file.
#[derive(Clone, Debug, Default)]
pub struct FileSettings {
    /// `mode`.
    pub proxy_mode: Option<String>,
    /// `clientConnection.kubeconfig`.
    pub kubeconfig: Option<PathBuf>,
    /// `hostnameOverride`.
    pub hostname_override: Option<String>,
    /// `clusterCIDR`.
    pub cluster_cidr: Vec<IpNet>,
    /// `nodePortAddresses`.
    pub nodeport_addresses: Option<Vec<String>>,
    /// `iptables.masqueradeAll`.
    pub masquerade_all: Option<bool>,
    /// `iptables.masqueradeBit`.
    pub masquerade_bit: Option<u8>,
    /// `iptables.localhostNodePorts`.
    pub localhost_nodeports: Option<bool>,
    /// `iptables.minSyncPeriod`.
    pub min_sync_period: Option<Duration>,
    /// `iptables.syncPeriod`.
    pub sync_period: Option<Duration>,
    /// `metricsBindAddress`.
    pub metrics_bind_address: Option<String>,
    /// `healthzBindAddress`.
    pub healthz_bind_address: Option<String>,
    /// `detectLocalMode`.
    pub detect_local_mode: Option<DetectLocalMode>,
    /// `detectLocal.bridgeInterface`.
    pub pod_bridge_interface: Option<String>,
    /// `detectLocal.interfaceNamePrefix`.
    pub pod_interface_name_prefix: Option<String>,
    /// `logging.verbosity`.
    pub verbosity: Option<u32>,
    /// `logging.format`.
    pub logging_format: Option<String>,
}

/// The file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("--config {0}: not supported yet")]
pub struct ConfigFileError(pub String);

/// Reads a KubeProxyConfiguration file.
pub fn load(path: &Path) -> Result<(FileSettings, Vec<String>), ConfigFileError> {
    Err(ConfigFileError(path.display().to_string()))
}
