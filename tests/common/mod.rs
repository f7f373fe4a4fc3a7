//! Shared helpers for tests that need the real kernel: throwaway network namespaces.
//!
//! Every namespace is deleted when its guard drops, also when the test panics, and nothing
//! here ever touches the root namespace's netfilter tables, routes or sysctls.

#![allow(dead_code)]

pub mod builders;
pub mod mock_api;
pub mod topology;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Whether this process runs as root (kernel tests need it).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Returns false (after a loud message) when kernel tests cannot run here.
pub fn kernel_tests_possible(test: &str) -> bool {
    if is_root() {
        return true;
    }
    eprintln!("\n!!! SKIPPED {test}: kernel tests need root (network namespaces, netfilter) !!!\n");
    false
}

/// A network namespace owned by a test.
pub struct Netns {
    /// `ip netns` name.
    pub name: String,
}

impl Netns {
    /// Creates a fresh namespace with loopback up.
    pub fn new(tag: &str) -> Netns {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("svp-{tag}-{}-{n}", std::process::id());
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = Netns { name };
        ns.ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace, feeding `stdin`.
    pub fn run_with_input(&self, cmd: &[&str], stdin: &str) -> Output {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ip netns exec");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .expect("write stdin");
        child.wait_with_output().expect("wait")
    }

    /// Runs a command inside the namespace.
    pub fn run(&self, cmd: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .output()
            .expect("run ip netns exec")
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, cmd: &[&str]) -> String {
        let out = self.run(cmd);
        assert!(
            out.status.success(),
            "{cmd:?} in {} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Netns {
    /// Runs `f` on a thread that has entered this network namespace (processes it spawns
    /// and sockets it opens live there); the test's own thread never leaves its namespace.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        use nix::sched::{CloneFlags, setns};
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let fd = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                setns(&fd, CloneFlags::CLONE_NEWNET).expect("setns into the test namespace");
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
