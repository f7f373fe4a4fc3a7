//! Stale UDP conntrack cleanup against a real kernel.
//!
//! Two throwaway namespaces joined by a veth pair: a client and a "node" whose iptables DNAT
//! fake services to endpoint addresses on its own loopback, like kube-proxy's rules would.
//! The client sends real UDP (and one TCP connection) so the node's conntrack table holds
//! real entries; then the cleanup runs over ctnetlink inside the node namespace, and
//! `conntrack -L` there must show exactly the stale UDP entries gone. Needs root; never
//! touches the root namespace; the namespaces are removed even when an assertion fails.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Netns, kernel_tests_possible};
use svcproxy::conntrack::{
    ConntrackError, ConntrackTable, IPPROTO_UDP, NetlinkConntrack, cleanup_stale_flows,
};
use svcproxy::model::{
    Endpoint, IpFamily, NodeInfo, Protocol, ServiceName, ServicePort, ServicePortName,
    ServicePortState, Snapshot,
};

/// Flows to the service whose endpoint was removed, and to the one that is unchanged
/// (`SVCPROXY_CONNTRACK_TEST_FLOWS` overrides it, to time larger tables).
fn bulk() -> usize {
    std::env::var("SVCPROXY_CONNTRACK_TEST_FLOWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}
/// Flows of every other kind.
const FEW: usize = 20;

const CLIENT_MAC: &str = "02:00:00:00:00:01";
const NODE_MAC: &str = "02:00:00:00:00:02";

/// The two namespaces plus the sockets that must live as long as the flows are checked.
struct Topology {
    client: Netns,
    node: Netns,
    _listeners: Vec<UdpSocket>,
    _tcp_listener: TcpListener,
}

fn setup(tag: &str) -> Topology {
    let client = Netns::new(&format!("{tag}c"));
    let node = Netns::new(&format!("{tag}n"));
    node.ok(&[
        "ip",
        "link",
        "add",
        "n0",
        "address",
        NODE_MAC,
        "type",
        "veth",
        "peer",
        "name",
        "c0",
        "address",
        CLIENT_MAC,
        "netns",
        &client.name,
    ]);
    for (ns, dev, v4, v6) in [
        (&client, "c0", "10.200.0.1/24", "fd00:200::1/64"),
        (&node, "n0", "10.200.0.2/24", "fd00:200::2/64"),
    ] {
        ns.ok(&["ip", "addr", "add", v4, "dev", dev]);
        ns.ok(&["ip", "-6", "addr", "add", v6, "dev", dev, "nodad"]);
        ns.ok(&["ip", "link", "set", dev, "up"]);
    }
    // Static neighbours: no datagram waits in (or overflows) an ARP/ND queue.
    for (ns, dev, ip4, ip6, mac) in [
        (&client, "c0", "10.200.0.2", "fd00:200::2", NODE_MAC),
        (&node, "n0", "10.200.0.1", "fd00:200::1", CLIENT_MAC),
    ] {
        ns.ok(&[
            "ip",
            "neigh",
            "replace",
            ip4,
            "lladdr",
            mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ]);
        ns.ok(&[
            "ip",
            "-6",
            "neigh",
            "replace",
            ip6,
            "lladdr",
            mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ]);
    }
    client.ok(&["ip", "route", "add", "10.96.0.0/16", "via", "10.200.0.2"]);
    client.ok(&[
        "ip",
        "-6",
        "route",
        "add",
        "fd00:96::/64",
        "via",
        "fd00:200::2",
    ]);

    // Endpoints (and the VIP of the service that had no rules) are local to the node.
    for addr in [
        "10.244.0.10",
        "10.244.0.11",
        "10.244.0.12",
        "10.244.0.13",
        "10.96.0.30",
    ] {
        node.ok(&["ip", "addr", "add", &format!("{addr}/32"), "dev", "lo"]);
    }
    for addr in ["fd00:244::10", "fd00:244::11", "fd00:244::12"] {
        node.ok(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{addr}/128"),
            "dev",
            "lo",
            "nodad",
        ]);
    }

    let dnat = |tool: &str, proto: &str, dst: &str, dport: &str, to: &str| {
        node.ok(&[
            tool,
            "-w",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            proto,
            "-d",
            dst,
            "--dport",
            dport,
            "-j",
            "DNAT",
            "--to-destination",
            to,
        ]);
    };
    // default/dns: was on endpoint A (10.244.0.10), now only on B.
    dnat("iptables", "udp", "10.96.0.10", "53", "10.244.0.10:5353");
    dnat("iptables", "tcp", "10.96.0.10", "53", "10.244.0.10:5353");
    dnat("iptables", "udp", "10.200.0.2", "30053", "10.244.0.10:5353");
    dnat(
        "ip6tables",
        "udp",
        "fd00:96::10",
        "53",
        "[fd00:244::10]:5353",
    );
    // default/kept: on endpoint C, unchanged.
    dnat("iptables", "udp", "10.96.0.11", "53", "10.244.0.12:5353");
    dnat(
        "ip6tables",
        "udp",
        "fd00:96::11",
        "53",
        "[fd00:244::12]:5353",
    );
    // default/late (10.96.0.30): no rule at all, as before its first endpoint appeared.

    // Dual-stack listeners, so datagrams are consumed instead of answered with ICMP errors.
    let (listeners, tcp_listener) = node.enter(|| {
        let udp = ["[::]:5353", "[::]:53", "[::]:9999"]
            .into_iter()
            .map(|a| UdpSocket::bind(a).unwrap_or_else(|e| panic!("bind udp {a}: {e}")))
            .collect::<Vec<_>>();
        (
            udp,
            TcpListener::bind("[::]:5353").expect("bind tcp [::]:5353"),
        )
    });
    Topology {
        client,
        node,
        _listeners: listeners,
        _tcp_listener: tcp_listener,
    }
}

/// Sends one datagram to `dst` from each of `count` client ports (one flow each). Explicit
/// ports, because ephemeral ones get reused once a socket closes and two datagrams would
/// then share one tuple (and one conntrack entry).
fn send_udp(dst: &str, count: usize) {
    let dst: SocketAddr = dst.parse().unwrap();
    let any: IpAddr = if dst.is_ipv4() {
        ip("0.0.0.0")
    } else {
        ip("::")
    };
    assert!(count <= 50_000, "client ports 10000.. would run out");
    for port in 10_000..10_000 + count as u16 {
        let socket = UdpSocket::bind(SocketAddr::new(any, port)).expect("bind client socket");
        socket.send_to(b"ping", dst).expect("send datagram");
    }
}

/// One line of `conntrack -L`: protocol, original destination, reply source.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    proto: String,
    orig_dst: String,
    reply_src: String,
}

fn conntrack_list(ns: &Netns) -> Vec<Entry> {
    let mut entries = Vec::new();
    for family in ["ipv4", "ipv6"] {
        let out = ns.ok(&["conntrack", "-L", "-f", family]);
        for line in out.lines() {
            let proto = line
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
            let field = |key: &str, nth: usize| {
                line.split_whitespace()
                    .filter_map(|t| t.strip_prefix(key))
                    .nth(nth)
                    .unwrap_or_default()
                    .to_string()
            };
            let join = |ip: String, port: String| {
                if ip.contains(':') {
                    format!("[{ip}]:{port}")
                } else {
                    format!("{ip}:{port}")
                }
            };
            entries.push(Entry {
                orig_dst: join(field("dst=", 0), field("dport=", 0)),
                reply_src: join(field("src=", 1), field("sport=", 1)),
                proto,
            });
        }
    }
    entries
}

/// TCP and UDP entries per `proto orig_dst -> reply_src` (ICMPv6 housekeeping is ignored).
fn census(entries: &[Entry]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for e in entries
        .iter()
        .filter(|e| e.proto == "udp" || e.proto == "tcp")
    {
        *out.entry(format!("{} {} -> {}", e.proto, e.orig_dst, e.reply_src))
            .or_default() += 1;
    }
    out
}

fn wait_for(ns: &Netns, want: &BTreeMap<String, usize>) -> BTreeMap<String, usize> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = census(&conntrack_list(ns));
        if want.iter().all(|(k, n)| got.get(k) == Some(n)) || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn endpoint(addr: &str) -> Endpoint {
    Endpoint {
        node_name: Some("node".into()),
        ..Endpoint::ready_at(ip(addr), 5353)
    }
}

fn service_port(name: &str, protocol: Protocol, cluster_ips: &[&str]) -> ServicePort {
    let name = ServicePortName {
        service: ServiceName::new("default", name),
        port: protocol.as_str().into(),
        protocol,
    };
    ServicePort {
        cluster_ips: cluster_ips.iter().map(|s| ip(s)).collect(),
        ..ServicePort::cluster_ip(name, ip(cluster_ips[0]), 53)
    }
}

/// The state after the sync: default/dns lost endpoint A (10.244.0.10, fd00:244::10) and has
/// B; default/kept still has C; default/late got its first endpoint D.
fn snapshot() -> Snapshot {
    let mut dns = service_port("dns", Protocol::Udp, &["10.96.0.10", "fd00:96::10"]);
    dns.node_port = Some(30053);
    let ports = vec![
        (dns, vec![endpoint("10.244.0.11"), endpoint("fd00:244::11")]),
        (
            service_port("dns", Protocol::Tcp, &["10.96.0.10"]),
            vec![endpoint("10.244.0.11")],
        ),
        (
            service_port("kept", Protocol::Udp, &["10.96.0.11", "fd00:96::11"]),
            vec![endpoint("10.244.0.12"), endpoint("fd00:244::12")],
        ),
        (
            service_port("late", Protocol::Udp, &["10.96.0.30"]),
            vec![endpoint("10.244.0.13")],
        ),
    ];
    Snapshot {
        ports: ports
            .into_iter()
            .map(|(port, eps)| {
                (
                    port.name.clone(),
                    ServicePortState {
                        port: Arc::new(port),
                        endpoints: eps.into(),
                    },
                )
            })
            .collect(),
        node: NodeInfo {
            name: "node".into(),
            ..NodeInfo::default()
        },
    }
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

#[test]
fn stale_udp_flows_are_deleted_and_the_rest_kept() {
    if !kernel_tests_possible("stale_udp_flows_are_deleted_and_the_rest_kept") {
        return;
    }
    init_tracing();
    let topo = setup("ct");
    let bulk = bulk();
    let _tcp: TcpStream = topo.client.enter(|| {
        send_udp("10.96.0.10:53", bulk);
        send_udp("10.96.0.11:53", bulk);
        send_udp("10.96.0.30:53", FEW);
        send_udp("10.200.0.2:30053", FEW);
        send_udp("10.200.0.2:9999", FEW);
        send_udp("[fd00:96::10]:53", FEW);
        send_udp("[fd00:96::11]:53", FEW);
        TcpStream::connect_timeout(&"10.96.0.10:53".parse().unwrap(), Duration::from_secs(5))
            .expect("TCP connect through the DNAT rule")
    });

    let stale: BTreeMap<String, usize> = [
        ("udp 10.96.0.10:53 -> 10.244.0.10:5353", bulk),
        ("udp 10.96.0.30:53 -> 10.96.0.30:53", FEW),
        ("udp 10.200.0.2:30053 -> 10.244.0.10:5353", FEW),
        ("udp [fd00:96::10]:53 -> [fd00:244::10]:5353", FEW),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_string(), n))
    .collect();
    let kept: BTreeMap<String, usize> = [
        ("udp 10.96.0.11:53 -> 10.244.0.12:5353", bulk),
        ("udp 10.200.0.2:9999 -> 10.200.0.2:9999", FEW),
        ("udp [fd00:96::11]:53 -> [fd00:244::12]:5353", FEW),
        ("tcp 10.96.0.10:53 -> 10.244.0.10:5353", 1),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_string(), n))
    .collect();
    let all: BTreeMap<String, usize> = stale.clone().into_iter().chain(kept.clone()).collect();
    let before = wait_for(&topo.node, &all);
    assert_eq!(before, all, "conntrack entries before the cleanup");

    let snap = snapshot();
    let (v4, v6, t4, t6, (noop, t_noop)) = topo.node.enter(|| {
        let mut table = NetlinkConntrack::new().expect("open ctnetlink");
        let start = Instant::now();
        let v4 = cleanup_stale_flows(&mut table, &snap, IpFamily::V4).expect("v4 cleanup");
        let t4 = start.elapsed();
        let start = Instant::now();
        let v6 = cleanup_stale_flows(&mut table, &snap, IpFamily::V6).expect("v6 cleanup");
        let t6 = start.elapsed();
        let start = Instant::now();
        let noop = cleanup_stale_flows(&mut table, &snap, IpFamily::V4).expect("second run");
        (v4, v6, t4, t6, (noop, start.elapsed()))
    });
    eprintln!(
        "conntrack cleanup v4: {v4:?} in {t4:?}; v6: {v6:?} in {t6:?}; \
         second v4 run (dump only): {noop:?} in {t_noop:?}"
    );

    let udp4_total = 2 * bulk + 3 * FEW;
    assert_eq!(
        v4.examined, udp4_total,
        "one UDP dump; TCP is not even read"
    );
    assert_eq!(v4.deleted, bulk + 2 * FEW);
    assert_eq!((v4.already_gone, v4.errors), (0, 0));
    assert_eq!((v6.examined, v6.deleted, v6.errors), (2 * FEW, FEW, 0));
    assert_eq!(
        (noop.examined, noop.deleted),
        (udp4_total - bulk - 2 * FEW, 0)
    );

    let after = census(&conntrack_list(&topo.node));
    assert_eq!(after, kept, "exactly the stale UDP entries are gone");
}

/// Deletes are exact: a request that names another entry id (as after the tuple was reused
/// by a newer flow) leaves the entry alone, and a missing entry is reported as `NotFound`,
/// which the cleanup counts as "already gone" rather than as an error.
#[test]
fn deletes_are_exact_and_report_missing_entries() {
    if !kernel_tests_possible("deletes_are_exact_and_report_missing_entries") {
        return;
    }
    init_tracing();
    let topo = setup("ctid");
    let client = topo.client.enter(|| {
        let socket = UdpSocket::bind("10.200.0.1:45000").expect("bind client");
        socket.send_to(b"one", "10.96.0.11:53").expect("send");
        socket
    });
    let want: BTreeMap<String, usize> =
        [("udp 10.96.0.11:53 -> 10.244.0.12:5353".to_string(), 1)].into();
    assert_eq!(wait_for(&topo.node, &want), want);

    // The socket is created in the node namespace and keeps working from this thread.
    let mut table = topo
        .node
        .enter(|| NetlinkConntrack::new().expect("open ctnetlink"));
    let dumped = table.dump(IpFamily::V4, IPPROTO_UDP).expect("dump");
    assert_eq!(dumped.len(), 1, "{dumped:?}");
    let flow = dumped.into_iter().next().unwrap();
    assert_eq!(flow.orig_src, "10.200.0.1:45000".parse().unwrap());
    assert_eq!(flow.reply_src, "10.244.0.12:5353".parse().unwrap());
    let id = flow.id.expect("the kernel reports entry ids");

    let mut other = flow.clone();
    other.id = Some(id ^ 1);
    assert!(matches!(
        table.delete(&other),
        Err(ConntrackError::NotFound)
    ));
    assert_eq!(
        census(&conntrack_list(&topo.node)),
        want,
        "other id: entry kept"
    );

    table.delete(&flow).expect("delete the dumped entry");
    assert_eq!(census(&conntrack_list(&topo.node)), BTreeMap::new());
    assert!(matches!(table.delete(&flow), Err(ConntrackError::NotFound)));

    // Same tuple again: a new entry, deleted through the batched path.
    client.send_to(b"two", "10.96.0.11:53").expect("send again");
    assert_eq!(wait_for(&topo.node, &want), want);
    let current = table.dump(IpFamily::V4, IPPROTO_UDP).expect("dump");
    let results = table.delete_all(&current);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(census(&conntrack_list(&topo.node)), BTreeMap::new());
}
