//! The svcproxy binary: flag parsing, logging, and dispatch to the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use svcproxy::config::ProxyFlags;
use svcproxy::daemon::{self, DaemonOptions};
use svcproxy::dataplane::iptables::edge::Variant;
use svcproxy::model::IpFamily;
use svcproxy::sync::SyncSettings;

/// A Kubernetes service proxy: a drop-in replacement for kube-proxy.
#[derive(Parser, Debug)]
#[command(
    name = "svcproxy",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    daemon: DaemonArgs,
}

/// Flags of the proxy daemon (upstream kube-proxy's names).
#[derive(clap::Args, Debug)]
struct DaemonArgs {
    /// Which proxy mode to use.
    #[arg(long, value_enum, default_value = "iptables")]
    proxy_mode: ProxyMode,
    /// Read Services, EndpointSlices and Nodes from YAML/JSON files in this directory and
    /// watch it for changes (standalone nodes, demos, tests).
    #[arg(long)]
    manifests_dir: Option<PathBuf>,
    /// Minimum interval between rule syncs (Go duration).
    #[arg(long, alias = "iptables-min-sync-period", value_parser = svcproxy::config::parse_duration, default_value = "1s")]
    min_sync_period: Duration,
    /// Maximum interval between full rule syncs (Go duration).
    #[arg(long, alias = "iptables-sync-period", value_parser = svcproxy::config::parse_duration, default_value = "30s")]
    sync_period: Duration,
    /// iptables variant to program: detected from the node's existing rules by default.
    #[arg(long, value_enum)]
    iptables_backend: Option<Variant>,
    /// Remove every rule svcproxy or kube-proxy installed (all modes, both families) and exit.
    #[arg(long)]
    cleanup: bool,
    #[command(flatten)]
    flags: ProxyFlags,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the rules this node would apply for Services, EndpointSlices and Nodes in files.
    Render(RenderArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ProxyMode {
    /// NAT rules through iptables-restore.
    Iptables,
    /// Proxy connections in the svcproxy process (no NAT rules).
    Userspace,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Family {
    #[value(name = "4")]
    V4,
    #[value(name = "6")]
    V6,
}

#[derive(clap::Args, Debug)]
struct RenderArgs {
    /// A YAML/JSON file or a directory of them (repeatable; multi-document and `kind: List`).
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<PathBuf>,
    /// The proxy mode whose rules to print.
    #[arg(long, value_enum, default_value = "iptables")]
    proxy_mode: ProxyMode,
    /// IP family of the rule set (iptables-restore for 4, ip6tables-restore for 6).
    #[arg(long, value_enum, default_value = "4")]
    ip_family: Family,
    #[command(flatten)]
    flags: ProxyFlags,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Render(args)) => render(args),
        None if cli.daemon.cleanup => cleanup(),
        None => run_daemon(cli.daemon),
    }
}

fn render(args: RenderArgs) -> ExitCode {
    if args.proxy_mode != ProxyMode::Iptables {
        eprintln!("svcproxy render: only --proxy-mode iptables has rules to print");
        return ExitCode::FAILURE;
    }
    let family = match args.ip_family {
        Family::V4 => IpFamily::V4,
        Family::V6 => IpFamily::V6,
    };
    match svcproxy::render::render_files(&args.files, &args.flags, family) {
        Ok(out) => {
            for w in &out.warnings {
                eprintln!("warning: skipped {w}");
            }
            print!("{}", out.text);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("svcproxy render: {e}");
            ExitCode::FAILURE
        }
    }
}

fn cleanup() -> ExitCode {
    let problems = daemon::cleanup_everything();
    if problems.is_empty() {
        eprintln!("svcproxy --cleanup: no proxy rules left");
        ExitCode::SUCCESS
    } else {
        for p in &problems {
            eprintln!("svcproxy --cleanup: {p}");
        }
        ExitCode::FAILURE
    }
}

fn run_daemon(args: DaemonArgs) -> ExitCode {
    let mode = match args.proxy_mode {
        ProxyMode::Iptables => daemon::Mode::Iptables,
        ProxyMode::Userspace => daemon::Mode::Userspace,
    };
    let settings = SyncSettings {
        min_sync_period: args.min_sync_period,
        sync_period: args.sync_period,
        canary_period: args
            .sync_period
            .clamp(Duration::from_secs(1), Duration::from_secs(5)),
    };
    let families = daemon::kernel_families();
    let opts = DaemonOptions {
        flags: args.flags,
        manifests_dir: args.manifests_dir,
        settings,
        iptables_variant: args.iptables_backend,
        // The userspace proxy creates no conntrack NAT entries to clean.
        observers: if mode == daemon::Mode::Userspace {
            Vec::new()
        } else {
            daemon::default_observers(&families)
        },
        mode,
        families,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("svcproxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let daemon = match daemon::start(opts) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("svcproxy: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => std::future::pending::<()>().await,
        }
    });
    tracing::info!("shutting down; installed rules stay in place");
    daemon.stop();
    ExitCode::SUCCESS
}
