//! The proxy daemon: wires a source, the change tracker, the sync runner, a backend, the
//! metrics and health servers, and the `--cleanup` command.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus_client::registry::Registry;

use crate::config::{ConfigError, ProxyFlags, ProxyMode, Settings, SourceSettings};
use crate::conntrack::{NetlinkConntrack, cleanup_stale_flows};
use crate::dataplane::iptables::RenderConfig;
use crate::dataplane::iptables::backend::{ConfigFn, IptablesBackend};
use crate::dataplane::iptables::cleanup::remove_rules;
use crate::dataplane::iptables::edge::{ProcessEdge, Variant};
use crate::dataplane::nftables;
use crate::dataplane::userspace::stats::UserspaceStats;
use crate::dataplane::userspace::{UserspaceBackend, UserspaceOptions};
use crate::dataplane::{Backend, BackendError};
use crate::health::service::ServiceHealthServers;
use crate::health::{self, ProxyHealth};
use crate::http::{self, BindError};
use crate::metrics::{self, Metrics, MetricsObserver, ProcessCollector, UserspaceCollector};
use crate::model::{ChangeTracker, IpFamily, NodeInfo, Snapshot};
use crate::source::api::{self, ApiError, ApiWatch};
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
    /// The API server client cannot be configured.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// A server port cannot be opened.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// A kernel setting could not be applied.
    #[error(transparent)]
    Kernel(#[from] BackendError),
    /// The sync thread could not be started.
    #[error("cannot start the sync thread: {0}")]
    Thread(std::io::Error),
}

/// Everything the daemon needs to start.
pub struct DaemonOptions {
    /// Effective settings (flags over config file over defaults).
    pub settings: Settings,
    /// `--iptables-backend`; detected from the node when `None`.
    pub iptables_variant: Option<Variant>,
    /// Families to serve.
    pub families: Vec<IpFamily>,
}

/// A running daemon; [`Daemon::stop`] ends it and leaves the rules in place.
pub struct Daemon {
    trigger: SyncTrigger,
    runner: Option<JoinHandle<()>>,
    _manifests: Option<ManifestsWatch>,
    _api: Option<ApiWatch>,
    servers: Vec<tokio::task::JoinHandle<()>>,
    /// Where the metrics server listens (the bound port when 0 was asked for).
    pub metrics_address: Option<SocketAddr>,
    /// Where the health server listens.
    pub healthz_address: Option<SocketAddr>,
}

impl Daemon {
    /// Stops the servers and watchers, then syncing; waits for the sync in progress.
    pub fn stop(mut self) {
        for s in &self.servers {
            s.abort();
        }
        self._api.take();
        self._manifests.take();
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

/// Sets `/proc/sys/<name>` in this network namespace (skipped when it already has `value`).
pub(crate) fn set_sysctl(name: &str, value: &str) -> Result<(), BackendError> {
    let path = format!("/proc/sys/{name}");
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    std::fs::write(&path, value).map_err(|source| BackendError::Sysctl {
        name: name.to_string(),
        source,
    })
}

/// The NAT modes' render settings, computed per sync from the node's facts; also sets the
/// node-wide sysctls those settings need.
fn nat_render_config(proxy: &ProxyFlags) -> Result<ConfigFn, DaemonError> {
    let probe = proxy.render_config(IpFamily::V4, &NodeInfo::default(), &[])?;
    if probe.serves_localhost_node_ports() {
        // Localhost NodePorts need route_localnet (set in this network namespace only).
        set_sysctl("net/ipv4/conf/all/route_localnet", "1")?;
    }
    let proxy = proxy.clone();
    Ok(Box::new(move |family, node| {
        proxy
            .render_config(family, node, &local_addresses())
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "invalid settings; using defaults");
                RenderConfig {
                    family,
                    ..RenderConfig::default()
                }
            })
    }))
}

/// Removes the service addresses a userspace-mode run left on this node (the NAT modes must
/// not find ClusterIPs made local). Failures are logged: the NAT rules work regardless.
async fn remove_userspace_leftovers() {
    // It drives netlink on a runtime of its own: run it off this one.
    let removed = tokio::task::spawn_blocking(crate::dataplane::userspace::remove_addresses).await;
    match removed {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => tracing::info!(
            addresses = n,
            "removed the userspace mode's service addresses"
        ),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot remove the userspace mode's service addresses")
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot remove the userspace mode's service addresses")
        }
    }
}

/// Starts the daemon: servers, backend, runner thread and source. Must run inside a tokio
/// runtime (the servers and API watchers are tasks on it).
pub async fn start(opts: DaemonOptions) -> Result<Daemon, DaemonError> {
    let settings = &opts.settings;
    let node_name = settings.proxy.node_name();
    let mode = settings.mode;
    tracing::info!(node = %node_name, mode = mode.name(), families = ?opts.families, "starting svcproxy");

    let tracker = Arc::new(Mutex::new(ChangeTracker::new(NodeInfo {
        name: node_name.clone(),
        ..NodeInfo::default()
    })));
    let trigger = SyncTrigger::new();

    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry));
    registry.register_collector(Box::new(ProcessCollector));
    // Per-service connection counters of the userspace proxy (empty in the other modes).
    let userspace_stats = UserspaceStats::new();
    registry.register_collector(Box::new(UserspaceCollector(userspace_stats.clone())));
    let registry = Arc::new(registry);
    let health = ProxyHealth::new(2 * settings.sync_period, trigger.clone(), tracker.clone());

    let mut servers = Vec::new();
    let mut metrics_address = None;
    if let Some(addr) = settings.metrics_bind_address {
        let h = metrics::handler(
            registry,
            metrics.clone(),
            tracker.clone(),
            trigger.clone(),
            mode.name(),
        );
        let (task, bound) = http::spawn_server("metrics", addr, h)?;
        tracing::info!(address = %bound, "serving /metrics");
        servers.push(task);
        metrics_address = Some(bound);
    }
    let mut healthz_address = None;
    if let Some(addr) = settings.healthz_bind_address {
        let h = health::handler(health.clone(), metrics.clone());
        let (task, bound) = http::spawn_server("healthz", addr, h)?;
        tracing::info!(address = %bound, "serving /healthz and /livez");
        servers.push(task);
        healthz_address = Some(bound);
    }

    let backend: Box<dyn Backend> = match mode {
        ProxyMode::Iptables => {
            remove_userspace_leftovers().await;
            let config = nat_render_config(&settings.proxy)?;
            let variant = opts.iptables_variant.unwrap_or_else(Variant::detect);
            tracing::info!(iptables = ?variant, "programming iptables");
            nftables::backend::remove_leftovers_of_nftables_mode();
            Box::new(IptablesBackend::new(
                ProcessEdge::new(variant),
                &opts.families,
                config,
            ))
        }
        ProxyMode::Nftables => {
            remove_userspace_leftovers().await;
            let config = nat_render_config(&settings.proxy)?;
            Box::new(nftables::backend::start(&opts.families, config))
        }
        ProxyMode::Userspace => {
            let mut options = UserspaceOptions::from_flags(&settings.proxy, &opts.families);
            options.stats = userspace_stats;
            // The backend runs its own runtime and blocks on it: build it off this one.
            let built = tokio::task::spawn_blocking(move || {
                // Another mode's DNAT rules would take the traffic the listeners should get.
                for problem in cleanup_nat_modes() {
                    tracing::warn!(%problem, "cannot remove the NAT modes' rules");
                }
                UserspaceBackend::new(options)
            })
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            Box::new(built?)
        }
    };
    let sync_settings = SyncSettings {
        min_sync_period: settings.min_sync_period,
        sync_period: settings.sync_period,
        canary_period: settings
            .sync_period
            .clamp(Duration::from_secs(1), Duration::from_secs(5)),
    };
    let mut runner = SyncRunner::new(tracker.clone(), backend, trigger.clone(), sync_settings);
    runner.observe(Box::new(MetricsObserver::new(metrics.clone(), mode.name())));
    runner.observe(Box::new(health.clone()));
    runner.observe(Box::new(ServiceHealthServers::new(
        tokio::runtime::Handle::current(),
        health,
        opts.families.contains(&IpFamily::V6),
    )));
    if mode != ProxyMode::Userspace {
        // The userspace proxy creates no conntrack NAT entries to clean.
        runner.observe(Box::new(ConntrackCleaner::new(
            opts.families.clone(),
            metrics.clone(),
        )));
    }
    let runner = std::thread::Builder::new()
        .name("sync".into())
        .spawn(move || runner.run())
        .map_err(DaemonError::Thread)?;
    let mut daemon = Daemon {
        trigger: trigger.clone(),
        runner: Some(runner),
        _manifests: None,
        _api: None,
        servers,
        metrics_address,
        healthz_address,
    };

    match &settings.source {
        SourceSettings::Manifests(dir) => {
            match manifests::watch(dir, &node_name, tracker, trigger) {
                Ok(w) => daemon._manifests = Some(w),
                Err(e) => {
                    daemon.stop();
                    return Err(e.into());
                }
            }
        }
        SourceSettings::Api { kubeconfig, master } => {
            let client = match api::client(kubeconfig.as_deref(), master.as_deref()).await {
                Ok(c) => c,
                Err(e) => {
                    daemon.stop();
                    return Err(e.into());
                }
            };
            tokio::spawn(api::post_startup_event(
                client.clone(),
                node_name.clone(),
                mode.name(),
            ));
            daemon._api = Some(api::watch(client, &node_name, tracker, trigger));
        }
    }
    Ok(daemon)
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
/// both families and both iptables variants, and the userspace mode's addresses. Returns
/// what could not be removed.
pub fn cleanup_everything() -> Vec<String> {
    let mut problems = cleanup_nat_modes();
    if let Err(e) = crate::dataplane::userspace::remove_addresses() {
        problems.push(format!("userspace: {e}"));
    }
    problems
}

/// Removes the NAT modes' rules (iptables and nftables, svcproxy's and upstream's): what
/// the userspace mode must not find when it starts, since their DNAT would take its traffic.
pub fn cleanup_nat_modes() -> Vec<String> {
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
    metrics: Arc<Metrics>,
}

impl ConntrackCleaner {
    /// A cleaner for `families`, recording into `metrics`; the netlink socket is opened on
    /// first use.
    pub fn new(families: Vec<IpFamily>, metrics: Arc<Metrics>) -> Self {
        Self {
            families,
            table: None,
            metrics,
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
        let started = std::time::Instant::now();
        for family in &self.families {
            let result = cleanup_stale_flows(table, snapshot, *family);
            if let Ok(stats) = &result {
                self.metrics
                    .conntrack_deleted_entries
                    .inc_by(stats.deleted as u64);
            }
            match result {
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
        self.metrics
            .conntrack_cleanup_duration
            .observe(started.elapsed().as_secs_f64());
        if broken {
            // Reopen the socket next time in case it is the socket that broke.
            self.table = None;
        }
    }
}
