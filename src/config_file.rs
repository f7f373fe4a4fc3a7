//! Upstream kube-proxy's configuration file (`--config`): a `KubeProxyConfiguration` of
//! `kubeproxy.config.k8s.io/v1alpha1`, in YAML or JSON.
//!
//! Clusters already keep this file in the `kube-proxy` ConfigMap (kubeadm writes one with every
//! field at its zero value), so svcproxy reads it as it is. The schema is upstream's current
//! v1alpha1 type, field for field:
//!
//! - an unknown field, at any depth, is an error naming its path (`iptables.masqueradeBits`);
//!   upstream's strict decoder rejects it too, and a misspelt setting silently ignored is worse;
//! - a field upstream has but svcproxy does not act on (ipvs, winkernel, conntrack sysctls,
//!   oomScoreAdj, ...) is accepted, with a warning only when it holds something other than its
//!   zero value or upstream's default, so an unedited kubeadm file loads without noise;
//! - the mode-specific sections are read as upstream converts them: `nftables.*` in nftables
//!   mode, `iptables.*` otherwise (v1alpha1 has no top-level `syncPeriod`);
//! - zero values (`""`, `0s`, `null`) mean "not set", as upstream's defaulting treats them, so
//!   flags and svcproxy's defaults apply.
//!
//! The result is a [`FileSettings`] that the caller merges with its flags.

mod fields;
mod schema;
mod unused;

use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde_json::Value;

use crate::config::{DetectLocalMode, DurationError};
use fields::Section;
use unused::Unused;

/// The only `apiVersion` upstream's kube-proxy registers for its configuration file.
pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
/// The `kind` of the configuration document.
pub const KIND: &str = "KubeProxyConfiguration";

/// Why a configuration file was rejected; each variant names the field at fault.
///
/// Errors other than [`ConfigFileError::Io`] do not repeat the file's path: the caller knows
/// it and prefixes it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The text is not YAML (or JSON).
    #[error("not valid YAML: {0}")]
    Syntax(String),
    /// The document is not a mapping.
    #[error("expected a {KIND} mapping, found {0}")]
    NotAMapping(String),
    /// `apiVersion` is missing or not upstream's.
    #[error("apiVersion: found {found:?}, expected {API_VERSION:?}")]
    ApiVersion {
        /// What the file says (empty when missing).
        found: String,
    },
    /// `kind` is missing or not `KubeProxyConfiguration`.
    #[error("kind: found {found:?}, expected {KIND:?}")]
    Kind {
        /// What the file says (empty when missing).
        found: String,
    },
    /// A field upstream's schema does not have (often a typo).
    #[error("{field}: unknown field")]
    UnknownField {
        /// Dotted path of the field, e.g. `iptables.masqueradeBits`.
        field: String,
    },
    /// A field holding the wrong kind of value.
    #[error("{field}: expected {expected}, found {found}")]
    WrongType {
        /// Dotted path of the field.
        field: String,
        /// What the schema wants.
        expected: &'static str,
        /// The value found, as JSON.
        found: String,
    },
    /// A value of the right type that upstream's validation would reject as well.
    #[error("{field}: invalid value {value:?}: {reason}")]
    Invalid {
        /// Dotted path of the field.
        field: String,
        /// The value found.
        value: String,
        /// Why it is rejected.
        reason: String,
    },
    /// A duration that is not Go syntax.
    #[error("{field}: {source}")]
    Duration {
        /// Dotted path of the field.
        field: String,
        /// The parse error.
        source: DurationError,
    },
    /// A CIDR that does not parse.
    #[error("{field}: invalid CIDR {value:?}: {source}")]
    Cidr {
        /// Dotted path of the field (with the list index where there is one).
        field: String,
        /// The text found.
        value: String,
        /// The parse error.
        source: ipnet::AddrParseError,
    },
    /// A proxy mode upstream has but svcproxy does not implement.
    #[error(
        "mode: {0:?} is not supported by svcproxy (supported: \"\" (= iptables), iptables, nftables, userspace)"
    )]
    UnsupportedMode(String),
}

/// The settings a configuration file carries that svcproxy acts on, for merging with flags.
///
/// `None` (or an empty list) means the file leaves the setting unset: absent, `null`, `""` or
/// a zero duration, the values upstream's defaulting replaces with its defaults.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FileSettings {
    /// `mode`: `iptables`, `nftables` or `userspace` (`""` is unset, meaning iptables).
    pub proxy_mode: Option<String>,
    /// `clientConnection.kubeconfig`.
    pub kubeconfig: Option<PathBuf>,
    /// `hostnameOverride`, as written (upstream trims and lower-cases it when used).
    pub hostname_override: Option<String>,
    /// `clusterCIDR`, split at commas (at most one CIDR per IP family).
    pub cluster_cidr: Vec<IpNet>,
    /// `nodePortAddresses`: CIDRs and the keywords `primary`, `localhost`, `all`.
    pub nodeport_addresses: Option<Vec<String>>,
    /// `iptables.masqueradeAll` (`nftables.masqueradeAll` in nftables mode); only `true` is set.
    pub masquerade_all: Option<bool>,
    /// `iptables.masqueradeBit` (`nftables.masqueradeBit` in nftables mode), 0-31.
    pub masquerade_bit: Option<u8>,
    /// `iptables.localhostNodePorts`.
    pub localhost_nodeports: Option<bool>,
    /// `iptables.minSyncPeriod` (`nftables.minSyncPeriod` in nftables mode).
    pub min_sync_period: Option<Duration>,
    /// `iptables.syncPeriod` (`nftables.syncPeriod` in nftables mode).
    pub sync_period: Option<Duration>,
    /// `metricsBindAddress`, as written (upstream appends `:10249` when no port is given).
    pub metrics_bind_address: Option<String>,
    /// `healthzBindAddress`, as written (upstream appends `:10256` when no port is given).
    pub healthz_bind_address: Option<String>,
    /// `detectLocalMode`.
    pub detect_local_mode: Option<DetectLocalMode>,
    /// `detectLocal.bridgeInterface`.
    pub pod_bridge_interface: Option<String>,
    /// `detectLocal.interfaceNamePrefix`.
    pub pod_interface_name_prefix: Option<String>,
    /// `logging.verbosity` (0 is unset).
    pub verbosity: Option<u32>,
    /// `logging.format`: `text` or `json`.
    pub logging_format: Option<String>,
}

/// Reads and parses the configuration file at `path`; see [`parse`].
pub fn load(path: &Path) -> Result<(FileSettings, Vec<String>), ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let parsed = parse(&text)?;
    tracing::debug!(path = %path.display(), warnings = parsed.1.len(), "read KubeProxyConfiguration");
    Ok(parsed)
}

/// Parses a `KubeProxyConfiguration` document (YAML or JSON).
///
/// Returns the settings and one warning per field that is set but not acted on by svcproxy;
/// the caller logs the warnings.
pub fn parse(text: &str) -> Result<(FileSettings, Vec<String>), ConfigFileError> {
    let doc: Value =
        serde_saphyr::from_str(text).map_err(|e| ConfigFileError::Syntax(e.to_string()))?;
    let Value::Object(map) = &doc else {
        return Err(ConfigFileError::NotAMapping(doc.to_string()));
    };
    let type_field = |key: &str| map.get(key).and_then(Value::as_str).unwrap_or("");
    let api_version = type_field("apiVersion");
    if api_version != API_VERSION {
        return Err(ConfigFileError::ApiVersion {
            found: api_version.to_string(),
        });
    }
    let kind = type_field("kind");
    if kind != KIND {
        return Err(ConfigFileError::Kind {
            found: kind.to_string(),
        });
    }
    let root = Section::open(String::new(), &doc, schema::ROOT)?;
    let mut unused = Unused::default();
    let settings = read_root(&root, &mut unused)?;
    Ok((settings, unused.warnings))
}

const INT32: std::ops::RangeInclusive<i64> = i32::MIN as i64..=i32::MAX as i64;
const UINT32: std::ops::RangeInclusive<i64> = 0..=u32::MAX as i64;
const MASQUERADE_BIT: std::ops::RangeInclusive<i64> = 0..=31;
const SECOND: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

fn read_root(root: &Section, unused: &mut Unused) -> Result<FileSettings, ConfigFileError> {
    let mode = read_mode(root)?;
    let mut out = FileSettings {
        proxy_mode: mode.map(str::to_string),
        hostname_override: root.string("hostnameOverride")?.map(str::to_string),
        healthz_bind_address: root.string("healthzBindAddress")?.map(str::to_string),
        metrics_bind_address: root.string("metricsBindAddress")?.map(str::to_string),
        cluster_cidr: read_cluster_cidr(root)?,
        nodeport_addresses: read_nodeport_addresses(root)?,
        detect_local_mode: read_detect_local_mode(root)?,
        ..FileSettings::default()
    };

    let gates = root.bool_map("featureGates")?;
    if !gates.is_empty() {
        let names: Vec<String> = gates.iter().map(|(k, v)| format!("{k}={v}")).collect();
        unused.warn(&root.path_of("featureGates"), &names.join(","));
    }
    unused.string(root, "bindAddress", &["0.0.0.0", "::"])?;
    unused.set_true(root, "bindAddressHardFail")?;
    unused.set_true(root, "enableProfiling")?;
    unused.string(root, "showHiddenMetricsForVersion", &[])?;
    unused.set_true(root, "windowsRunAsService")?;
    unused.string(root, "portRange", &[])?;
    unused.duration(root, "configSyncPeriod", &[15 * MINUTE])?;
    // kube-proxy's default is -999 (it sets its own OOM score); svcproxy leaves that to the
    // pod spec.
    unused.int(root, "oomScoreAdj", -1000..=1000, &[-999])?;

    if let Some(client) = root.section("clientConnection", schema::CLIENT_CONNECTION)? {
        out.kubeconfig = client.string("kubeconfig")?.map(PathBuf::from);
        unused.string(&client, "acceptContentTypes", &[])?;
        unused.string(
            &client,
            "contentType",
            &["application/vnd.kubernetes.protobuf"],
        )?;
        unused.float(&client, "qps", &[5.0])?;
        unused.int(&client, "burst", INT32, &[0, 10])?;
    }
    if let Some(logging) = root.section("logging", schema::LOGGING)? {
        read_logging(&logging, &mut out, unused)?;
    }
    if let Some(detect) = root.section("detectLocal", schema::DETECT_LOCAL)? {
        out.pod_bridge_interface = detect.string("bridgeInterface")?.map(str::to_string);
        out.pod_interface_name_prefix = detect.string("interfaceNamePrefix")?.map(str::to_string);
    }
    read_mode_sections(root, mode, &mut out, unused)?;
    if let Some(ipvs) = root.section("ipvs", schema::IPVS)? {
        unused.duration(&ipvs, "syncPeriod", &[30 * SECOND])?;
        unused.duration(&ipvs, "minSyncPeriod", &[SECOND])?;
        unused.string(&ipvs, "scheduler", &["rr"])?;
        unused.strings(&ipvs, "excludeCIDRs")?;
        unused.set_true(&ipvs, "strictARP")?;
        unused.duration(&ipvs, "tcpTimeout", &[])?;
        unused.duration(&ipvs, "tcpFinTimeout", &[])?;
        unused.duration(&ipvs, "udpTimeout", &[])?;
    }
    if let Some(win) = root.section("winkernel", schema::WINKERNEL)? {
        unused.string(&win, "networkName", &[])?;
        unused.string(&win, "sourceVip", &[])?;
        unused.set_true(&win, "enableDSR")?;
        unused.string(&win, "rootHnsEndpointName", &[])?;
        unused.set_true(&win, "forwardHealthCheckVip")?;
    }
    if let Some(ct) = root.section("conntrack", schema::CONNTRACK)? {
        // 0 means "leave the kernel's value as it is", which is what svcproxy does; the other
        // accepted values are upstream's defaults.
        unused.int(&ct, "maxPerCore", INT32, &[0, 32 * 1024])?;
        unused.int(&ct, "min", INT32, &[0, 128 * 1024])?;
        unused.duration(&ct, "tcpEstablishedTimeout", &[24 * HOUR])?;
        unused.duration(&ct, "tcpCloseWaitTimeout", &[HOUR])?;
        unused.set_true(&ct, "tcpBeLiberal")?;
        unused.duration(&ct, "udpTimeout", &[])?;
        unused.duration(&ct, "udpStreamTimeout", &[])?;
    }
    Ok(out)
}

/// `mode`: `None` for `""` (iptables); ipvs and kernelspace are upstream modes svcproxy
/// does not implement.
fn read_mode<'a>(root: &Section<'a>) -> Result<Option<&'a str>, ConfigFileError> {
    match root.string("mode")? {
        None => Ok(None),
        Some(m @ ("iptables" | "nftables" | "userspace")) => Ok(Some(m)),
        Some(m @ ("ipvs" | "kernelspace")) => Err(ConfigFileError::UnsupportedMode(m.into())),
        Some(other) => Err(ConfigFileError::Invalid {
            field: "mode".into(),
            value: other.into(),
            reason: "not a proxy mode (use \"\", iptables, nftables or userspace)".into(),
        }),
    }
}

/// `clusterCIDR`: comma-separated, one CIDR per IP family at most (upstream's validation).
fn read_cluster_cidr(root: &Section) -> Result<Vec<IpNet>, ConfigFileError> {
    let Some(text) = root.string("clusterCIDR")? else {
        return Ok(Vec::new());
    };
    let field = root.path_of("clusterCIDR");
    let cidrs = text
        .split(',')
        .map(|part| {
            part.trim()
                .parse::<IpNet>()
                .map_err(|source| ConfigFileError::Cidr {
                    field: field.clone(),
                    value: part.to_string(),
                    source,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let same_family =
        matches!(cidrs.as_slice(), [a, b] if a.addr().is_ipv4() == b.addr().is_ipv4());
    if cidrs.len() > 2 || same_family {
        return Err(ConfigFileError::Invalid {
            field,
            value: text.to_string(),
            reason: "at most one CIDR per IP family".into(),
        });
    }
    Ok(cidrs)
}

/// `nodePortAddresses`: CIDRs and upstream's keywords.
fn read_nodeport_addresses(root: &Section) -> Result<Option<Vec<String>>, ConfigFileError> {
    let Some(items) = root.strings("nodePortAddresses")? else {
        return Ok(None);
    };
    for (i, item) in items.iter().enumerate() {
        if !matches!(*item, "primary" | "localhost" | "all") {
            item.parse::<IpNet>()
                .map_err(|source| ConfigFileError::Cidr {
                    field: format!("{}[{i}]", root.path_of("nodePortAddresses")),
                    value: item.to_string(),
                    source,
                })?;
        }
    }
    Ok(Some(items.into_iter().map(str::to_string).collect()))
}

fn read_detect_local_mode(root: &Section) -> Result<Option<DetectLocalMode>, ConfigFileError> {
    Ok(match root.string("detectLocalMode")? {
        None => None,
        Some("ClusterCIDR") => Some(DetectLocalMode::ClusterCidr),
        Some("NodeCIDR") => Some(DetectLocalMode::NodeCidr),
        Some("BridgeInterface") => Some(DetectLocalMode::BridgeInterface),
        Some("InterfaceNamePrefix") => Some(DetectLocalMode::InterfaceNamePrefix),
        Some(other) => {
            return Err(ConfigFileError::Invalid {
                field: root.path_of("detectLocalMode"),
                value: other.into(),
                reason: "use ClusterCIDR, NodeCIDR, BridgeInterface or InterfaceNamePrefix".into(),
            });
        }
    })
}

fn read_logging(
    logging: &Section,
    out: &mut FileSettings,
    unused: &mut Unused,
) -> Result<(), ConfigFileError> {
    out.logging_format = match logging.string("format")? {
        None => None,
        Some(f @ ("text" | "json")) => Some(f.to_string()),
        Some(other) => {
            return Err(ConfigFileError::Invalid {
                field: logging.path_of("format"),
                value: other.into(),
                reason: "use text or json".into(),
            });
        }
    };
    out.verbosity = logging
        .int("verbosity", UINT32)?
        .filter(|v| *v != 0)
        .map(|v| v as u32);
    // An integer is nanoseconds, a string a Go duration (component-base's TimeOrMetaDuration).
    let flush = match logging.raw("flushFrequency") {
        Some(Value::Number(_)) => logging
            .int("flushFrequency", 0..=i64::MAX)?
            .map(|ns| Duration::from_nanos(ns as u64)),
        _ => logging.duration("flushFrequency")?,
    };
    if let Some(d) = flush.filter(|d| !d.is_zero() && *d != 5 * SECOND) {
        unused.warn(&logging.path_of("flushFrequency"), &format!("{d:?}"));
    }
    for item in logging.sections("vmodule", schema::VMODULE_ITEM)? {
        let pattern = item.string("filePattern")?.unwrap_or("");
        let level = item.int("verbosity", UINT32)?.unwrap_or(0);
        unused.warn(&logging.path_of("vmodule"), &format!("{pattern}={level}"));
    }
    if let Some(options) = logging.section("options", schema::LOGGING_OPTIONS)? {
        for format in ["text", "json"] {
            if let Some(routing) = options.section(format, schema::OUTPUT_ROUTING)? {
                unused.set_true(&routing, "splitStream")?;
                unused.quantity(&routing, "infoBufferSize")?;
            }
        }
    }
    Ok(())
}

/// The iptables and nftables sections: the one for the mode feeds the settings (as upstream's
/// conversion picks them); the other is ignored, with a warning when it holds something.
fn read_mode_sections(
    root: &Section,
    mode: Option<&str>,
    out: &mut FileSettings,
    unused: &mut Unused,
) -> Result<(), ConfigFileError> {
    let nftables_mode = mode == Some("nftables");
    let iptables = root.section("iptables", schema::IPTABLES)?;
    let nftables = root.section("nftables", schema::NFTABLES)?;
    if let Some(ipt) = &iptables {
        out.localhost_nodeports = ipt.bool("localhostNodePorts")?;
        unused.set_true(ipt, "snatNodeInternalIP")?;
    }
    let (active, other) = if nftables_mode {
        (nftables, iptables)
    } else {
        (iptables, nftables)
    };
    if let Some(sec) = active {
        out.masquerade_all = sec.bool("masqueradeAll")?.filter(|b| *b);
        out.masquerade_bit = sec.int("masqueradeBit", MASQUERADE_BIT)?.map(|b| b as u8);
        out.sync_period = sec.duration("syncPeriod")?;
        out.min_sync_period = sec.duration("minSyncPeriod")?;
    }
    if let Some(sec) = other {
        unused.set_true(&sec, "masqueradeAll")?;
        unused.int(&sec, "masqueradeBit", MASQUERADE_BIT, &[14])?;
        unused.duration(&sec, "syncPeriod", &[30 * SECOND])?;
        unused.duration(&sec, "minSyncPeriod", &[SECOND])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
