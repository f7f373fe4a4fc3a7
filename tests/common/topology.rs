//! A small cluster in network namespaces, for tests that send real packets through the proxy.
//!
//! ```text
//!  external (192.168.0.2) ──veth── node-a (192.168.0.10 / 192.168.1.10) ──veth── node-b (192.168.1.11)
//!                                   │ routed /32 veths (gateway 10.244.1.1)        └ remote pod 10.244.2.10 (lo)
//!                pod-1 .11  pod-2 .12  pod-3 .13  client .100   (10.244.1.0/24, fd00:10:244:1::/64)
//! ```
//!
//! Pods are routed (Calico style), not bridged, so every pod packet crosses node-a's
//! netfilter without `br_netfilter`. The proxy runs inside node-a. Everything lives in
//! namespaces this test created; dropping the topology kills its processes and deletes them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Netns;

/// Where the test-host agent script lives.
pub fn agent() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/netns/agent.py")
}

/// The namespaces and processes of one test cluster.
pub struct Topology {
    /// The node running the proxy.
    pub node: Netns,
    /// Another node, with one remote pod.
    pub remote: Netns,
    /// A host outside the cluster.
    pub external: Netns,
    /// A pod on node-a used as a client.
    pub client: Netns,
    /// Backend pods on node-a.
    pub pods: Vec<Netns>,
    /// The proxy's manifests directory.
    pub manifests: tempfile::TempDir,
    procs: Vec<Child>,
    proxy: Option<Child>,
    proxy_log: PathBuf,
}

/// Pod `i` (1-based) address on node-a.
pub fn pod_ip(i: usize) -> String {
    format!("10.244.1.{}", 10 + i)
}

/// Pod `i` (1-based) IPv6 address on node-a.
pub fn pod_ip6(i: usize) -> String {
    format!("fd00:10:244:1::{}", 10 + i)
}

/// The remote pod's address (on node-b).
pub const REMOTE_POD: &str = "10.244.2.10";
/// The client pod's address.
pub const CLIENT_IP: &str = "10.244.1.100";
/// node-a's address on the external link.
pub const NODE_IP: &str = "192.168.0.10";
/// The external host's address.
pub const EXTERNAL_IP: &str = "192.168.0.2";

fn link_pod(node: &Netns, pod: &Netns, idx: usize, ip: &str, ip6: &str) {
    let host_if = format!("vp{idx}");
    node.ok(&[
        "ip", "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
    ]);
    node.ok(&["ip", "link", "set", &host_if, "up"]);
    node.ok(&["ip", "addr", "add", "10.244.1.1/32", "dev", &host_if]);
    node.ok(&[
        "ip",
        "-6",
        "addr",
        "add",
        "fd00:10:244:1::1/128",
        "dev",
        &host_if,
        "nodad",
    ]);
    node.ok(&["ip", "route", "add", &format!("{ip}/32"), "dev", &host_if]);
    node.ok(&[
        "ip",
        "-6",
        "route",
        "add",
        &format!("{ip6}/128"),
        "dev",
        &host_if,
    ]);
    pod.ok(&["ip", "link", "set", "eth0", "up"]);
    pod.ok(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
    pod.ok(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{ip6}/128"),
        "dev",
        "eth0",
        "nodad",
    ]);
    pod.ok(&[
        "ip",
        "route",
        "add",
        "10.244.1.1",
        "dev",
        "eth0",
        "scope",
        "link",
    ]);
    pod.ok(&[
        "ip",
        "route",
        "add",
        "default",
        "via",
        "10.244.1.1",
        "dev",
        "eth0",
    ]);
    pod.ok(&[
        "ip",
        "-6",
        "route",
        "add",
        "fd00:10:244:1::1",
        "dev",
        "eth0",
    ]);
    pod.ok(&[
        "ip",
        "-6",
        "route",
        "add",
        "default",
        "via",
        "fd00:10:244:1::1",
        "dev",
        "eth0",
    ]);
}

fn link_hosts(a: &Netns, a_if: &str, a_ip: &str, b: &Netns, b_if: &str, b_ip: &str) {
    a.ok(&[
        "ip", "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ]);
    a.ok(&["ip", "link", "set", a_if, "up"]);
    a.ok(&["ip", "addr", "add", a_ip, "dev", a_if]);
    b.ok(&["ip", "link", "set", b_if, "up"]);
    b.ok(&["ip", "addr", "add", b_ip, "dev", b_if]);
}

impl Topology {
    /// Builds the namespaces and starts HTTP (8080) and UDP echo (5353) servers in every
    /// backend pod and in the remote pod.
    pub fn new() -> Topology {
        let node = Netns::new("node");
        let remote = Netns::new("nodeb");
        let external = Netns::new("ext");
        let client = Netns::new("client");
        let pods: Vec<Netns> = (1..=3).map(|_| Netns::new("pod")).collect();
        for sysctl in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            node.ok(&["sysctl", "-qw", sysctl]);
        }
        for (i, pod) in pods.iter().enumerate() {
            link_pod(&node, pod, i + 1, &pod_ip(i + 1), &pod_ip6(i + 1));
        }
        link_pod(&node, &client, 9, CLIENT_IP, "fd00:10:244:1::100");
        link_hosts(
            &node,
            "eth-ext",
            &format!("{NODE_IP}/24"),
            &external,
            "eth0",
            &format!("{EXTERNAL_IP}/24"),
        );
        // Like a real node, node-a has a default route (to a host the test owns): locally
        // generated packets to a ClusterIP need a route before NAT rewrites them.
        node.ok(&["ip", "route", "add", "default", "via", EXTERNAL_IP]);
        for net in ["203.0.113.0/24", "198.51.100.0/24"] {
            external.ok(&["ip", "route", "add", net, "via", NODE_IP]);
        }
        link_hosts(
            &node,
            "eth-b",
            "192.168.1.10/24",
            &remote,
            "eth0",
            "192.168.1.11/24",
        );
        node.ok(&["ip", "route", "add", "10.244.2.0/24", "via", "192.168.1.11"]);
        remote.ok(&[
            "ip",
            "addr",
            "add",
            &format!("{REMOTE_POD}/32"),
            "dev",
            "lo",
        ]);
        remote.ok(&["ip", "route", "add", "default", "via", "192.168.1.10"]);

        let manifests = tempfile::tempdir().expect("tempdir");
        let proxy_log = manifests
            .path()
            .join("..")
            .join(format!("svcproxy-{}.log", node.name));
        let mut t = Topology {
            node,
            remote,
            external,
            client,
            pods,
            manifests,
            procs: Vec::new(),
            proxy: None,
            proxy_log,
        };
        for i in 0..t.pods.len() {
            let name = format!("pod-{}", i + 1);
            let ns = t.pods[i].name.clone();
            t.spawn(&ns, &["http", &name, "0.0.0.0", "8080"]);
            t.spawn(&ns, &["http", &name, "::", "8081"]);
            t.spawn(&ns, &["udp", &name, "0.0.0.0", "5353"]);
        }
        let remote = t.remote.name.clone();
        t.spawn(&remote, &["http", "remote-pod", REMOTE_POD, "8080"]);
        t.spawn(&remote, &["udp", "remote-pod", REMOTE_POD, "5353"]);
        for i in 1..=t.pods.len() {
            t.wait_tcp(&pod_ip(i), 8080);
        }
        t.wait_tcp(REMOTE_POD, 8080);
        t
    }

    fn spawn(&mut self, ns: &str, args: &[&str]) {
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "python3"])
            .arg(agent())
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start agent");
        self.procs.push(child);
    }

    /// Waits until something answers HTTP on `ip:port` (from node-a).
    fn wait_tcp(&self, ip: &str, port: u16) {
        // Generous: python start-up on a loaded 2-core machine can take seconds.
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end {
            let url = format!("http://{ip}:{port}/");
            if self
                .node
                .run(&["curl", "-s", "--max-time", "1", &url])
                .status
                .success()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("test server {ip}:{port} never came up");
    }

    /// Writes (or replaces) a manifest file in the proxy's directory.
    pub fn write_manifest(&self, file: &str, yaml: &str) {
        let tmp = self.manifests.path().join(format!(".{file}.tmp"));
        fs::write(&tmp, yaml).expect("write manifest");
        fs::rename(&tmp, self.manifests.path().join(file)).expect("rename manifest");
    }

    /// Removes a manifest file.
    pub fn remove_manifest(&self, file: &str) {
        fs::remove_file(self.manifests.path().join(file)).expect("remove manifest");
    }

    /// Starts the proxy in node-a, reading the manifests directory, with `extra` flags.
    pub fn start_proxy(&mut self, mode: &str, extra: &[&str]) {
        let dir = self.manifests.path().to_string_lossy().into_owned();
        self.start_proxy_with_source(mode, &["--manifests-dir", &dir], extra);
    }

    /// Starts the proxy in node-a with `source` flags (`--manifests-dir DIR` or
    /// `--master URL`) and `extra` flags.
    pub fn start_proxy_with_source(&mut self, mode: &str, source: &[&str], extra: &[&str]) {
        let log = fs::File::create(&self.proxy_log).expect("proxy log");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.node.name,
                env!("CARGO_BIN_EXE_svcproxy"),
            ])
            .args([
                "--proxy-mode",
                mode,
                "--hostname-override",
                "node-a",
                "--cluster-cidr",
                "10.244.0.0/16,fd00:10:244::/56",
            ])
            .args(["--min-sync-period", "100ms", "--sync-period", "30s"])
            .args(source)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start svcproxy");
        self.proxy = Some(child);
    }

    /// Stops the proxy (SIGTERM) and waits for it.
    pub fn stop_proxy(&mut self) {
        if let Some(mut p) = self.proxy.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &p.id().to_string()])
                .status();
            let end = Instant::now() + Duration::from_secs(5);
            while Instant::now() < end {
                if let Ok(Some(_)) = p.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = p.kill();
            let _ = p.wait();
        }
    }

    /// The proxy's log so far.
    pub fn proxy_log(&self) -> String {
        fs::read_to_string(&self.proxy_log).unwrap_or_default()
    }

    /// One HTTP GET from `ns`; `Some("pod-1 10.244.1.100")` or `None` on failure.
    pub fn http(ns: &Netns, host: &str, port: u16) -> Option<String> {
        let url = if host.contains(':') {
            format!("http://[{host}]:{port}/")
        } else {
            format!("http://{host}:{port}/")
        };
        let out = ns.run(&[
            "curl",
            "-s",
            "--connect-timeout",
            "1",
            "--max-time",
            "2",
            &url,
        ]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// How a connection attempt ended: curl's exit code and the time it took.
    pub fn http_attempt(ns: &Netns, host: &str, port: u16) -> (i32, Duration) {
        let url = format!("http://{host}:{port}/");
        let start = Instant::now();
        let out = ns.run(&[
            "curl",
            "-s",
            "--connect-timeout",
            "2",
            "--max-time",
            "3",
            &url,
        ]);
        (out.status.code().unwrap_or(-1), start.elapsed())
    }

    /// One UDP exchange from `ns` (optionally from a fixed source port).
    pub fn udp(ns: &Netns, host: &str, port: u16, src_port: u16) -> Option<String> {
        let out = ns.run(&[
            "python3",
            agent().to_str().unwrap(),
            "udp-ask",
            host,
            &port.to_string(),
            &src_port.to_string(),
        ]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Polls `f` until it returns true; returns the time it took, or panics with the log.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut() -> bool,
    ) -> Duration {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if f() {
                return start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "timed out after {timeout:?} waiting for {what}\n--- svcproxy log ---\n{}",
            self.proxy_log()
        );
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.stop_proxy();
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        let _ = fs::remove_file(&self.proxy_log);
    }
}
