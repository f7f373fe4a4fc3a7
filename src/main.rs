//! The svcproxy binary: flag parsing, logging, and dispatch to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use svcproxy::config::{DaemonFlags, LogFormat, ProxyFlags, ProxyMode, Settings};
use svcproxy::daemon::{self, DaemonOptions};
use svcproxy::dataplane::iptables::edge::Variant;
use svcproxy::model::IpFamily;

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

/// Flags of the proxy daemon (upstream kube-proxy's names) plus svcproxy's own.
#[derive(clap::Args, Debug)]
struct DaemonArgs {
    #[command(flatten)]
    flags: DaemonFlags,
    /// iptables variant to program: detected from the node's existing rules by default.
    #[arg(long, value_enum)]
    iptables_backend: Option<Variant>,
    /// Remove every rule svcproxy or kube-proxy installed (all modes, both families) and exit.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    cleanup: bool,
    /// Check the flags and --config, print the effective settings and exit (0 when valid).
    #[arg(long)]
    check_config: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the rules this node would apply for Services, EndpointSlices and Nodes in files.
    Render(RenderArgs),
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
    /// IP family of the rule set (iptables-restore for 4, ip6tables-restore for 6; the
    /// `ip` or `ip6` table in nftables mode).
    #[arg(long, value_enum, default_value = "4")]
    ip_family: Family,
    #[command(flatten)]
    flags: ProxyFlags,
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match cli.command {
        Some(Command::Render(args)) => {
            init_logging("info", LogFormat::Text);
            render(args)
        }
        None if cli.daemon.cleanup => {
            init_logging("info", LogFormat::Text);
            cleanup()
        }
        None => {
            let explicit = |id: &str| {
                matches!(
                    matches.value_source(id),
                    Some(clap::parser::ValueSource::CommandLine)
                )
            };
            match settings(&cli.daemon.flags, &explicit) {
                Ok(s) if cli.daemon.check_config => {
                    println!("{s:#?}");
                    ExitCode::SUCCESS
                }
                Ok(s) => {
                    init_logging(s.log_filter(), s.logging_format);
                    run_daemon(s, cli.daemon.iptables_backend)
                }
                Err(e) => {
                    eprintln!("svcproxy: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Reads `--config` (if any) and merges the flags over it.
fn settings(flags: &DaemonFlags, explicit: &dyn Fn(&str) -> bool) -> anyhow::Result<Settings> {
    let file = match &flags.config {
        Some(path) => {
            let (file, warnings) = svcproxy::config_file::load(path)?;
            for w in warnings {
                eprintln!("svcproxy: warning: {}: {w}", path.display());
            }
            Some(file)
        }
        None => None,
    };
    Ok(Settings::resolve(flags, explicit, file.as_ref())?)
}

/// Logs to stderr at `default_filter` (RUST_LOG overrides), as text or JSON lines.
fn init_logging(default_filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn render(args: RenderArgs) -> ExitCode {
    if args.proxy_mode == ProxyMode::Userspace {
        eprintln!("svcproxy render: --proxy-mode userspace programs no rules to print");
        return ExitCode::FAILURE;
    }
    let family = match args.ip_family {
        Family::V4 => IpFamily::V4,
        Family::V6 => IpFamily::V6,
    };
    match svcproxy::render::render_files(&args.files, &args.flags, family, args.proxy_mode) {
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

fn run_daemon(settings: Settings, iptables_variant: Option<Variant>) -> ExitCode {
    let mode = settings.mode;
    let opts = DaemonOptions {
        settings,
        iptables_variant,
        families: daemon::kernel_families(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("svcproxy-io")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("svcproxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let daemon = match daemon::start(opts).await {
            Ok(d) => d,
            Err(e) => {
                eprintln!("svcproxy: {e}");
                return ExitCode::FAILURE;
            }
        };
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
        if mode == ProxyMode::Userspace {
            tracing::info!("shutting down; service addresses stay in place, connections close");
        } else {
            tracing::info!("shutting down; installed rules stay in place");
        }
        // The sync thread is joined off the runtime's worker threads.
        let _ = tokio::task::spawn_blocking(move || daemon.stop()).await;
        ExitCode::SUCCESS
    })
}
