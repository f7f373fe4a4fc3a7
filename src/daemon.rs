//! The proxy daemon: wires a source, the change tracker, the sync runner and a backend, and
//! the `--cleanup` command.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::config::{ConfigError, ProxyFlags};
use crate::conntrack::{NetlinkConntrack, cleanup_stale_flows};
use crate::dataplane::iptables::RenderConfig;
use crate::dataplane::iptables::backend::{ConfigFn, IptablesBackend};
use crate::dataplane::iptables::cleanup::remove_rules;
use crate::dataplane::iptables::edge::{ProcessEdge, Variant};
use crate::dataplane::nftables;
use crate::dataplane::{Backend, BackendError, ProxyMode};
use crate::model::{ChangeTracker, IpFamily, NodeInfo, Snapshot};
use crate::source::manifests::{self, ManifestsError, ManifestsWatch};
use crate::sync::{SyncObserver, SyncReport, SyncRunner, SyncSettings, SyncTrigger};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Inconsistent flags.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The manifests directory cannot be used.
    #[error(transparent)]
    Manifests(#[from] ManifestsError),
    /// No source of services was given.
    #[error(
        "no source of services: pass --manifests-dir DIR (the API-server source is not built yet)"
    )]
    NoSource,
    /// A kernel setting could not be applied.
    #[error(transparent)]
    Kernel(#[from] BackendError),
    /// The sync thread could not be started.
    #[error("cannot start the sync thread: {0}")]
    Thread(std::io::Error),
}

/// Everything the daemon needs to start.
pub struct DaemonOptions {
    /// Rule-shaping flags.
    pub flags: ProxyFlags,
    /// `--manifests-dir`.
    pub manifests_dir: Option<PathBuf>,
    /// Sync timing.
    pub settings: SyncSettings,
    /// `--iptables-backend`; detected from the node when `None`.
    pub iptables_variant: Option<Variant>,
    /// Families to serve.
    pub families: Vec<IpFamily>,
    /// `--proxy-mode`.
    pub mode: ProxyMode,
    /// Extra observers of each sync (conntrack cleanup, metrics, health).
    pub observers: Vec<Box<dyn SyncObserver>>,
}

/// A running daemon; [`Daemon::stop`] ends it and leaves the rules in place.
pub struct Daemon {
    trigger: SyncTrigger,
    runner: Option<JoinHandle<()>>,
    _watch: Option<ManifestsWatch>,
}

impl Daemon {
    /// Stops syncing and waits for the sync in progress to finish.
    pub fn stop(mut self) {
        self.trigger.stop();
        if let Some(r) = self.runner.take() {
            let _ = r.join();
        }
    }
}

/// The families this kernel can serve: IPv4, and IPv6 unless it is disabled.
pub fn kernel_families() -> Vec<IpFamily> {
    let v6 = std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
        .map(|s| s.trim() == "0")
        .unwrap_or(false);
    if v6 {
        vec![IpFamily::V4, IpFamily::V6]
    } else {
        vec![IpFamily::V4]
    }
}

/// Addresses on this host's interfaces (for `--nodeport-addresses` CIDRs).
pub fn local_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out: Vec<IpAddr> = Vec::new();
    for a in addrs {
        let Some(sa) = a.address else { continue };
        let ip = if let Some(v4) = sa.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = sa.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

fn set_sysctl(name: &str, value: &str) -> Result<(), BackendError> {
    let path = format!("/proc/sys/{name}");
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    std::fs::write(&path, value).map_err(|source| BackendError::Sysctl {
        name: name.to_string(),
        source,
    })
}

/// Starts the daemon: source, runner thread, backend.
pub fn start(opts: DaemonOptions) -> Result<Daemon, DaemonError> {
    let node_name = opts.flags.node_name();
    // Validate flag combinations now, so the per-sync config function cannot fail.
    let probe = opts
        .flags
        .render_config(IpFamily::V4, &NodeInfo::default(), &[])?;
    if probe.serves_localhost_node_ports() {
        // Localhost NodePorts need route_localnet (set in this network namespace only).
        set_sysctl("net/ipv4/conf/all/route_localnet", "1")?;
    }
    tracing::info!(node = %node_name, mode = ?opts.mode, families = ?opts.families, "starting svcproxy");

    let tracker = Arc::new(Mutex::new(ChangeTracker::new(NodeInfo {
        name: node_name.clone(),
        ..NodeInfo::default()
    })));
    let trigger = SyncTrigger::new();
    let flags = opts.flags.clone();
    let config: ConfigFn = Box::new(move |family, node| {
        flags
            .render_config(family, node, &local_addresses())
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "invalid settings; using defaults");
                RenderConfig {
                    family,
                    ..RenderConfig::default()
                }
            })
    });
    let backend: Box<dyn Backend> = match opts.mode {
        ProxyMode::Iptables => {
            let variant = opts.iptables_variant.unwrap_or_else(Variant::detect);
            tracing::info!(iptables = ?variant, "iptables variant");
            nftables::backend::remove_leftovers_of_nftables_mode();
            Box::new(IptablesBackend::new(
                ProcessEdge::new(variant),
                &opts.families,
                config,
            ))
        }
        ProxyMode::Nftables => Box::new(nftables::backend::start(&opts.families, config)),
    };
    let mut runner = SyncRunner::new(tracker.clone(), backend, trigger.clone(), opts.settings);
    for o in opts.observers {
        runner.observe(o);
    }
    let runner = std::thread::Builder::new()
        .name("sync".into())
        .spawn(move || runner.run())
        .map_err(DaemonError::Thread)?;

    let watch = match &opts.manifests_dir {
        Some(dir) => Some(manifests::watch(dir, &node_name, tracker, trigger.clone())?),
        None => {
            trigger.stop();
            let _ = runner.join();
            return Err(DaemonError::NoSource);
        }
    };
    Ok(Daemon {
        trigger,
        runner: Some(runner),
        _watch: watch,
    })
}

/// Tables the nftables mode (svcproxy's and upstream's) creates.
const NFT_TABLES: &[(&str, &str)] = &[
    ("ip", "svcproxy"),
    ("ip6", "svcproxy"),
    ("ip", "kube-proxy"),
    ("ip6", "kube-proxy"),
];

fn nft_tables() -> Option<String> {
    let out = std::process::Command::new("nft")
        .args(["list", "tables"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `--cleanup`: removes the rules of every mode (svcproxy's and upstream kube-proxy's), in
/// both families and both iptables variants. Returns what could not be removed.
pub fn cleanup_everything() -> Vec<String> {
    let mut problems = Vec::new();
    for variant in [Variant::Nft, Variant::Legacy] {
        if variant == Variant::Legacy && !Variant::legacy_in_use() {
            continue; // reading legacy tables would create empty ones
        }
        let mut edge = ProcessEdge::new(variant);
        for family in [IpFamily::V4, IpFamily::V6] {
            match remove_rules(&mut edge, family) {
                Ok(()) => {}
                // A variant whose tools are not installed has nothing to clean.
                Err(BackendError::Spawn { .. }) => {}
                Err(e) => problems.push(format!("{variant:?} {family:?}: {e}")),
            }
        }
    }
    if let Some(tables) = nft_tables() {
        for (family, name) in NFT_TABLES {
            if tables
                .lines()
                .any(|l| l.trim() == format!("table {family} {name}"))
            {
                let out = std::process::Command::new("nft")
                    .args(["delete", "table", family, name])
                    .output();
                if !out.is_ok_and(|o| o.status.success()) {
                    problems.push(format!("nft table {family} {name} could not be deleted"));
                }
            }
        }
    }
    problems
}

/// Deletes stale UDP/SCTP conntrack entries after every successful sync, so clients are
/// moved off removed endpoints (and off "no endpoints" entries) at once.
pub struct ConntrackCleaner {
    families: Vec<IpFamily>,
    table: Option<NetlinkConntrack>,
}

impl ConntrackCleaner {
    /// A cleaner for `families`; the netlink socket is opened on first use.
    pub fn new(families: Vec<IpFamily>) -> Self {
        Self {
            families,
            table: None,
        }
    }
}

impl SyncObserver for ConntrackCleaner {
    fn synced(&mut self, report: &SyncReport, snapshot: &Snapshot) {
        if report.result.is_err() {
            return;
        }
        if self.table.is_none() {
            match NetlinkConntrack::new() {
                Ok(t) => self.table = Some(t),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open the conntrack netlink socket; stale UDP flows are not cleaned");
                    return;
                }
            }
        }
        let Some(table) = self.table.as_mut() else {
            return;
        };
        let mut broken = false;
        for family in &self.families {
            match cleanup_stale_flows(table, snapshot, *family) {
                Ok(stats) if stats.deleted > 0 || stats.errors > 0 => {
                    tracing::info!(
                        ?family,
                        deleted = stats.deleted,
                        examined = stats.examined,
                        errors = stats.errors,
                        "cleaned stale conntrack entries"
                    );
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(?family, error = %e, "conntrack cleanup failed; retried after the next sync");
                    broken = true;
                }
            }
        }
        if broken {
            // Reopen the socket next time in case it is the socket that broke.
            self.table = None;
        }
    }
}

/// Observers every daemon runs.
pub fn default_observers(families: &[IpFamily]) -> Vec<Box<dyn SyncObserver>> {
    vec![Box::new(ConntrackCleaner::new(families.to_vec()))]
}
