//! The iptables kernel edge: the only code that runs iptables binaries.
//!
//! Everything goes through three calls (`iptables-restore --noflush` of a whole batch,
//! `iptables-save` of tables, and `iptables -S` of one chain), never one process per rule.

use std::io::Write;
use std::process::{Command, Stdio};

use super::save::builtin_chains;
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
    /// not at all. `bulk` marks a batch that names a large share of the table's chains (a
    /// full sync), which an implementation may shape differently for speed.
    fn restore(&mut self, family: IpFamily, input: &str, bulk: bool) -> Result<(), BackendError>;

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
    /// Whether bulk nft batches get the cache prelude (turned off if it ever fails).
    prelude: bool,
}

impl ProcessEdge {
    /// An edge for `variant`.
    pub fn new(variant: Variant) -> Self {
        Self {
            variant,
            prelude: true,
        }
    }
}

/// Adds the cache prelude to every table block of a restore batch: `:B - [0:0]` for each
/// built-in chain the block writes to, then a bare `-S`.
///
/// Why (measured in `hack/NOFLUSH-STUDY.md`): with `--noflush`, iptables-nft 1.8.9 keeps
/// the chains a batch names in a sorted list walked with string compares per line, so a full
/// batch costs lines × chains (5k services: 94 s). A chain-less `-S` makes it fetch the whole
/// table once instead, as a flushing restore does (5k: 2.6 s). The `:B -` lines keep the
/// built-in chains' policy and rules and stop `-S` from caching placeholders for them. The
/// listing `-S` prints goes to stdout, which the edge discards.
///
/// Returns the shaped batch and, for error messages, the input line numbers after which
/// prelude lines were inserted (with how many).
pub fn with_cache_prelude(input: &str) -> (String, Vec<(usize, usize)>) {
    let (parts, inserted) = cache_prelude_parts(input);
    (parts.concat(), inserted)
}

/// [`with_cache_prelude`] without copying the batch: the pieces to write in order (slices of
/// `input` and the prelude lines), so a full sync does not hold a second copy of its batch.
pub fn cache_prelude_parts(input: &str) -> (Vec<std::borrow::Cow<'_, str>>, Vec<(usize, usize)>) {
    use std::borrow::Cow;
    let mut parts: Vec<Cow<'_, str>> = Vec::new();
    let mut inserted = Vec::new();
    let mut copied_to = 0;
    let mut offset = 0;
    for (i, line) in input.split_inclusive('\n').enumerate() {
        offset += line.len();
        let Some(table) = line.trim_end().strip_prefix('*') else {
            continue;
        };
        let block = &input[offset..];
        let block = &block[..block.find("\nCOMMIT").map_or(block.len(), |p| p + 1)];
        let mut prelude = String::new();
        for b in builtin_chains(table) {
            let writes = block.lines().any(|l| {
                let mut w = l.split_whitespace();
                matches!(w.next(), Some("-A" | "-I" | "-D")) && w.next() == Some(b)
            });
            if writes {
                prelude.push_str(&format!(":{b} - [0:0]\n"));
            }
        }
        prelude.push_str("-S\n");
        parts.push(Cow::Borrowed(&input[copied_to..offset]));
        inserted.push((i + 1, prelude.lines().count()));
        parts.push(Cow::Owned(prelude));
        copied_to = offset;
    }
    parts.push(Cow::Borrowed(&input[copied_to..]));
    (parts, inserted)
}

/// Whether an iptables-restore error names one of the prelude's lines (1-based).
fn failed_on_inserted_line(stderr: &str, inserted: &[(usize, usize)]) -> bool {
    let Some(pos) = stderr.find("line ") else {
        return false;
    };
    let digits: String = stderr[pos + 5..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let Ok(n) = digits.parse::<usize>() else {
        return false;
    };
    // Shaped line numbers of the prelude lines: after input line `after`, shifted by the
    // prelude lines inserted before it.
    let mut shift = 0;
    for (after, k) in inserted {
        let first = after + shift + 1;
        if (first..first + k).contains(&n) {
            return true;
        }
        shift += k;
    }
    false
}

/// Maps "line N" in an iptables-restore error back to the line of the unshaped batch.
fn unshift_line_numbers(stderr: &str, inserted: &[(usize, usize)]) -> String {
    let mut out = String::new();
    let mut rest = stderr;
    while let Some(pos) = rest.find("line ") {
        out.push_str(&rest[..pos + 5]);
        rest = &rest[pos + 5..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if let Ok(n) = digits.parse::<usize>() {
            let shift: usize = inserted
                .iter()
                .filter(|(after, k)| n > after + k)
                .map(|(_, k)| k)
                .sum();
            out.push_str(&n.saturating_sub(shift).to_string());
            rest = &rest[digits.len()..];
        }
    }
    out.push_str(rest);
    out
}

/// Runs a tool, feeding it `stdin` piece by piece. A tool fed on stdin has its stdout
/// discarded: nothing reads it while we write, and a large listing (the `-S` prelude prints
/// the whole table) would fill the pipe and deadlock both sides.
fn run(
    tool: &str,
    args: &[&str],
    stdin: Option<&[std::borrow::Cow<'_, str>]>,
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
        .stdout(if stdin.is_some() {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn)?;
    if let Some(parts) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        // A failed write shows up as the tool's own error below.
        for part in parts {
            if pipe.write_all(part.as_bytes()).is_err() {
                break;
            }
        }
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
    fn restore(&mut self, family: IpFamily, input: &str, bulk: bool) -> Result<(), BackendError> {
        let tool = self.variant.binary(family, "restore");
        let args = ["--noflush", "--wait"];
        if bulk && self.prelude && self.variant == Variant::Nft {
            let (parts, inserted) = cache_prelude_parts(input);
            let out = run(&tool, &args, Some(&parts))?;
            if out.status.success() {
                return Ok(());
            }
            let stderr = String::from_utf8_lossy(&out.stderr);
            if !failed_on_inserted_line(&stderr, &inserted) {
                return Err(BackendError::Tool {
                    tool: format!("{tool} {}", args.join(" ")),
                    status: out.status.to_string(),
                    stderr: unshift_line_numbers(stderr.trim(), &inserted),
                });
            }
            // This iptables does not accept the prelude: retry plain, and stop using it.
            tracing::warn!(error = %stderr.trim(), "iptables-restore rejected the -S cache prelude; not using it again");
            self.prelude = false;
        }
        let out = run(&tool, &args, Some(&[std::borrow::Cow::Borrowed(input)]))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prelude_follows_each_table_header() {
        let input = "*filter\n:KUBE-SERVICES - [0:0]\n-I INPUT 1 -j KUBE-SERVICES\n-A KUBE-SERVICES -j RETURN\nCOMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -j RETURN\nCOMMIT\n";
        let (shaped, inserted) = with_cache_prelude(input);
        assert_eq!(
            shaped,
            "*filter\n:INPUT - [0:0]\n-S\n:KUBE-SERVICES - [0:0]\n-I INPUT 1 -j KUBE-SERVICES\n-A KUBE-SERVICES -j RETURN\nCOMMIT\n*nat\n-S\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -j RETURN\nCOMMIT\n"
        );
        assert_eq!(inserted, vec![(1, 2), (6, 1)]);
        // "line 5" of the shaped batch is line 3 of the input.
        assert_eq!(
            unshift_line_numbers("Error occurred at line: 5", &inserted),
            "Error occurred at line: 5"
        );
        assert_eq!(
            unshift_line_numbers("failed at line 5 of input", &inserted),
            "failed at line 3 of input"
        );
        // Shaped lines 2-3 and 9 are the prelude.
        assert!(failed_on_inserted_line("line 3 failed", &inserted));
        assert!(failed_on_inserted_line("line 9 failed", &inserted));
        assert!(!failed_on_inserted_line("line 5 failed", &inserted));
        assert!(!failed_on_inserted_line("no line number", &inserted));
    }
}
