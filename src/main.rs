//! The svcproxy binary: flag parsing, logging, and dispatch to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use svcproxy::config::ProxyFlags;
use svcproxy::model::IpFamily;

/// A Kubernetes service proxy: a drop-in replacement for kube-proxy.
#[derive(Parser, Debug)]
#[command(name = "svcproxy", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the rules this node would apply for Services, EndpointSlices and Nodes in files.
    Render(RenderArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ProxyMode {
    Iptables,
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
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Render(args)) => render(args),
        None => {
            eprintln!(
                "svcproxy: the proxy daemon is not available in this build yet; use `svcproxy render`"
            );
            ExitCode::from(2)
        }
    }
}

fn render(args: RenderArgs) -> ExitCode {
    let ProxyMode::Iptables = args.proxy_mode;
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
