//! The iptables kernel edge: the only code that runs iptables binaries.
//!
//! Everything goes through three calls (`iptables-restore --noflush` of a whole batch,
//! `iptables-save` of tables, and `iptables -S` of one chain), never one process per rule.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::dataplane::BackendError;
use crate::model::IpFamily;

/// Which iptables implementation the node's other components use; svcproxy follows it so
/// its rules sit in the same tables as kubelet's and the CNI plugin's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Variant {
    /// iptables-nft (the nf_tables kernel API).
    Nft,
    /// iptables-legacy (the x_tables kernel API).
    Legacy,
}

impl Variant {
    fn binary(self, family: IpFamily, tool: &str) -> String {
        let base = match family {
            IpFamily::V4 => "iptables",
            IpFamily::V6 => "ip6tables",
        };
        let variant = match self {
            Variant::Nft => "nft",
            Variant::Legacy => "legacy",
        };
        if tool.is_empty() {
            format!("{base}-{variant}")
        } else {
            format!("{base}-{variant}-{tool}")
        }
    }

    /// Whether any iptables-legacy table exists in this network namespace (read without
    /// creating one).
    pub fn legacy_in_use() -> bool {
        ["/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"]
            .iter()
            .any(|p| std::fs::read_to_string(p).is_ok_and(|s| !s.trim().is_empty()))
    }

    /// Picks the variant the way kubernetes-sigs/iptables-wrappers does: kubelet's hint
    /// chains first, then whichever variant holds more rules; nft on a tie or a fresh node.
    ///
    /// Legacy tables are only read when the kernel already has some in this network
    /// namespace (`/proc/net/ip{,6}_tables_names`): reading them would create empty ones and
    /// make every later iptables-nft command warn about "legacy tables present".
    pub fn detect() -> Variant {
        let save = |v: Variant, family, table: Option<&str>| {
            let mut cmd = Command::new(v.binary(family, "save"));
            if let Some(t) = table {
                cmd.args(["-t", t]);
            }
            cmd.stderr(Stdio::null())
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        let legacy_in_use = Variant::legacy_in_use();
        let candidates: &[Variant] = if legacy_in_use {
            &[Variant::Nft, Variant::Legacy]
        } else {
            &[Variant::Nft]
        };
        for v in candidates {
            let mangle = save(*v, IpFamily::V4, Some("mangle"));
            if mangle.contains("KUBE-IPTABLES-HINT") || mangle.contains("KUBE-KUBELET-CANARY") {
                return *v;
            }
        }
        if !legacy_in_use {
            return Variant::Nft;
        }
        let count = |v| {
            [IpFamily::V4, IpFamily::V6]
                .iter()
                .map(|f| {
                    save(v, *f, None)
                        .lines()
                        .filter(|l| l.starts_with("-A "))
                        .count()
                })
                .sum::<usize>()
        };
        if count(Variant::Legacy) > count(Variant::Nft) {
            Variant::Legacy
        } else {
            Variant::Nft
        }
    }
}

/// The kernel operations the iptables backend needs.
pub trait IptablesEdge: Send {
    /// Applies a restore batch with `--noflush`: each table in it is replaced atomically or
    /// not at all.
    fn restore(&mut self, family: IpFamily, input: &str) -> Result<(), BackendError>;

    /// `iptables-save` of one table (or all when `None`).
    fn save(&mut self, family: IpFamily, table: Option<&str>) -> Result<String, BackendError>;

    /// `iptables -S CHAIN` of one chain; `None` when the chain does not exist.
    fn list_chain(
        &mut self,
        family: IpFamily,
        table: &str,
        chain: &str,
    ) -> Result<Option<String>, BackendError>;

    /// The variant in use (for logs).
    fn variant(&self) -> Variant;
}

/// Runs the real binaries of one variant.
#[derive(Clone, Debug)]
pub struct ProcessEdge {
    variant: Variant,
}

impl ProcessEdge {
    /// An edge for `variant`.
    pub fn new(variant: Variant) -> Self {
        Self { variant }
    }
}

fn run(
    tool: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<std::process::Output, BackendError> {
    let spawn = |source| BackendError::Spawn {
        tool: tool.to_string(),
        source,
    };
    let mut child = Command::new(tool)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn)?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        // A failed write shows up as the tool's own error below.
        let _ = pipe.write_all(input.as_bytes());
    }
    child.wait_with_output().map_err(spawn)
}

fn tool_error(tool: &str, args: &[&str], out: &std::process::Output) -> BackendError {
    let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if stderr.len() > 2000 {
        stderr.truncate(2000);
        stderr.push('…');
    }
    BackendError::Tool {
        tool: format!("{tool} {}", args.join(" ")),
        status: out.status.to_string(),
        stderr,
    }
}

impl IptablesEdge for ProcessEdge {
    fn restore(&mut self, family: IpFamily, input: &str) -> Result<(), BackendError> {
        let tool = self.variant.binary(family, "restore");
        let args = ["--noflush", "--wait"];
        let out = run(&tool, &args, Some(input))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(tool_error(&tool, &args, &out))
        }
    }

    fn save(&mut self, family: IpFamily, table: Option<&str>) -> Result<String, BackendError> {
        let tool = self.variant.binary(family, "save");
        let args: Vec<&str> = table.map(|t| vec!["-t", t]).unwrap_or_default();
        let out = run(&tool, &args, None)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(tool_error(&tool, &args, &out))
        }
    }

    fn list_chain(
        &mut self,
        family: IpFamily,
        table: &str,
        chain: &str,
    ) -> Result<Option<String>, BackendError> {
        let tool = self.variant.binary(family, "");
        let args = ["-w", "-t", table, "-S", chain];
        let out = run(&tool, &args, None)?;
        if out.status.success() {
            Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
        } else if out.status.code() == Some(1) {
            // "No chain/target/match by that name."
            Ok(None)
        } else {
            Err(tool_error(&tool, &args, &out))
        }
    }

    fn variant(&self) -> Variant {
        self.variant
    }
}
