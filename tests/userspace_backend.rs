//! The userspace backend end to end on loopback, without root: service addresses go to an
//! in-memory address edge, "ClusterIPs" are 127.x addresses (already local), endpoints are
//! test servers on 127.0.0.1. Checks listener reconciliation and the connection-lifetime
//! contract: connections survive endpoint changes and are closed when their service is
//! deleted; a port without endpoints refuses at once.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use svcproxy::dataplane::Backend;
use svcproxy::dataplane::userspace::addresses::{AddressEdge, FakeAddresses};
use svcproxy::dataplane::userspace::stats::UserspaceStats;
use svcproxy::dataplane::userspace::{
    DEFAULT_IDLE_TIMEOUT, NodeSettings, UserspaceBackend, UserspaceError, UserspaceOptions,
};
use svcproxy::model::{
    Changes, Endpoint, IpFamily, NodeInfo, Protocol, ServiceName, ServicePort, ServicePortName,
    ServicePortState, Snapshot,
};

/// A server that answers every line with "<name> <line>" on a long-lived connection.
fn server(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 256];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let answer = format!("{name} {}", String::from_utf8_lossy(&buf[..n]));
                    if s.write_all(answer.as_bytes()).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

fn free_port(ip: IpAddr) -> u16 {
    TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn name() -> ServicePortName {
    ServicePortName {
        service: ServiceName::new("ns", "web"),
        port: "http".into(),
        protocol: Protocol::Tcp,
    }
}

fn snapshot(ip: IpAddr, port: u16, endpoints: &[SocketAddr]) -> Snapshot {
    let sp = ServicePort::cluster_ip(name(), ip, port);
    let eps: Vec<Endpoint> = endpoints
        .iter()
        .map(|e| Endpoint::ready_at(e.ip(), e.port()))
        .collect();
    let mut ports = BTreeMap::new();
    ports.insert(
        name(),
        ServicePortState {
            port: Arc::new(sp),
            endpoints: Arc::from(eps),
        },
    );
    Snapshot {
        ports,
        node: NodeInfo {
            name: "node".into(),
            ..NodeInfo::default()
        },
    }
}

/// An IPv4 userspace backend on `edge` with `workers` proxy threads and default settings.
fn backend(edge: Box<dyn AddressEdge>, workers: usize) -> UserspaceBackend {
    UserspaceBackend::with_edge(
        UserspaceOptions {
            families: vec![IpFamily::V4],
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            node_settings: Box::new(|_| NodeSettings::default()),
            worker_threads: workers,
            stats: UserspaceStats::new(),
        },
        edge,
    )
    .unwrap()
}

fn ask(s: &mut TcpStream, line: &str) -> std::io::Result<String> {
    s.write_all(line.as_bytes())?;
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf)?;
    if n == 0 {
        return Err(ErrorKind::UnexpectedEof.into());
    }
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    Ok(s)
}

#[test]
fn connections_outlive_endpoint_changes_and_end_with_the_service() {
    let a = server("a");
    let b = server("b");
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    let port = free_port(ip);
    let service = SocketAddr::new(ip, port);
    let mut backend = backend(Box::new(FakeAddresses::default()), 2);
    let stats = backend.stats();
    let changes = Changes::default();

    backend
        .sync(&snapshot(ip, port, &[a]), &changes, true)
        .unwrap();
    assert_eq!(backend.listening(), vec![service]);
    assert!(backend.rules_intact());
    let mut long = connect(service).unwrap();
    assert_eq!(ask(&mut long, "1").unwrap(), "a 1");

    // Endpoint a replaced by b: the open connection stays on a, new ones go to b.
    backend
        .sync(&snapshot(ip, port, &[b]), &changes, false)
        .unwrap();
    assert_eq!(ask(&mut long, "2").unwrap(), "a 2");
    let mut fresh = connect(service).unwrap();
    assert_eq!(ask(&mut fresh, "x").unwrap(), "b x");
    drop(fresh);

    // No endpoints: the listener is closed, so new connections are refused by the kernel at
    // once; the open connection still works.
    backend
        .sync(&snapshot(ip, port, &[]), &changes, false)
        .unwrap();
    assert!(backend.listening().is_empty());
    let refused = connect(service).unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused);
    assert_eq!(ask(&mut long, "3").unwrap(), "a 3");

    // Endpoints back: the listener reopens on the same address.
    backend
        .sync(&snapshot(ip, port, &[b]), &changes, false)
        .unwrap();
    assert_eq!(ask(&mut connect(service).unwrap(), "y").unwrap(), "b y");

    let snap = stats.snapshot();
    assert_eq!(snap.len(), 1);
    assert_eq!(snap[0].name, name());
    assert_eq!(snap[0].accepted, 3);
    assert_eq!(snap[0].connect_errors, 0);
    let active_wait = std::time::Instant::now();
    while stats.snapshot()[0].active != 1 && active_wait.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        stats.snapshot()[0].active,
        1,
        "only the long connection is open"
    );

    // Service deleted: its connection is closed, its counters are gone.
    let mut empty = snapshot(ip, port, &[]);
    empty.ports.clear();
    backend.sync(&empty, &changes, false).unwrap();
    assert!(
        ask(&mut long, "4").is_err(),
        "connection closed with its service"
    );
    assert!(stats.snapshot().is_empty());
}

#[test]
fn a_failing_endpoint_is_counted_and_skipped() {
    let a = server("a");
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    let port = free_port(ip);
    let mut backend = backend(Box::new(FakeAddresses::default()), 1);
    let stats = backend.stats();
    backend
        .sync(&snapshot(ip, port, &[dead, a]), &Changes::default(), true)
        .unwrap();
    for i in 0..6 {
        let mut s = connect(SocketAddr::new(ip, port)).unwrap();
        assert_eq!(ask(&mut s, &i.to_string()).unwrap(), format!("a {i}"));
    }
    let snap = stats.snapshot();
    assert_eq!(snap[0].accepted, 6);
    // Refused once, then tried last during its cooldown (and never needed).
    assert_eq!(snap[0].connect_errors, 1);
}

#[test]
fn load_balancer_source_ranges_are_enforced() {
    let a = server("a");
    let cluster_ip: IpAddr = "127.0.0.1".parse().unwrap();
    let lb_ip: IpAddr = "127.0.0.2".parse().unwrap();
    let port = free_port(lb_ip);
    let mut backend = backend(Box::new(FakeAddresses::default()), 1);
    let with_ranges = |range: &str| {
        let mut snap = snapshot(cluster_ip, port, &[a]);
        let state = snap.ports.get_mut(&name()).unwrap();
        let mut sp = (*state.port).clone();
        sp.load_balancer_ips = vec![lb_ip];
        sp.load_balancer_source_ranges = vec![range.parse().unwrap()];
        state.port = Arc::new(sp);
        snap
    };
    // The client (127.0.0.1) is outside the range: reset before any byte comes back.
    backend
        .sync(&with_ranges("10.0.0.0/8"), &Changes::default(), true)
        .unwrap();
    let mut s = connect(SocketAddr::new(lb_ip, port)).unwrap();
    assert!(
        ask(&mut s, "1").is_err(),
        "outside loadBalancerSourceRanges"
    );
    // The ClusterIP is not filtered.
    let mut c = connect(SocketAddr::new(cluster_ip, port)).unwrap();
    assert_eq!(ask(&mut c, "2").unwrap(), "a 2");
    // Inside the range: served.
    backend
        .sync(&with_ranges("127.0.0.0/8"), &Changes::default(), false)
        .unwrap();
    let mut s = connect(SocketAddr::new(lb_ip, port)).unwrap();
    assert_eq!(ask(&mut s, "3").unwrap(), "a 3");
}

#[test]
fn a_port_held_by_another_process_does_not_fail_the_sync_and_is_retried() {
    let a = server("a");
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    let holder = TcpListener::bind((ip, 0)).unwrap();
    let port = holder.local_addr().unwrap().port();
    let mut backend = backend(Box::new(FakeAddresses::default()), 1);
    let snap = snapshot(ip, port, &[a]);
    backend.sync(&snap, &Changes::default(), true).unwrap();
    assert!(backend.listening().is_empty());
    assert!(!backend.rules_intact(), "the canary asks for a retry");
    drop(holder);
    backend.sync(&snap, &Changes::default(), true).unwrap();
    assert_eq!(backend.listening(), vec![SocketAddr::new(ip, port)]);
    assert!(backend.rules_intact());
    let mut s = connect(SocketAddr::new(ip, port)).unwrap();
    assert_eq!(ask(&mut s, "1").unwrap(), "a 1");
}

/// An edge where every service IP "already existed" unmarked (the kernel answered EEXIST):
/// nothing is recorded as svcproxy's.
struct ForeignAddresses;

impl AddressEdge for ForeignAddresses {
    fn list(&mut self) -> Result<BTreeSet<IpAddr>, UserspaceError> {
        Ok(BTreeSet::new())
    }
    fn add(&mut self, _ip: IpAddr) -> Result<(), UserspaceError> {
        Ok(())
    }
    fn remove(&mut self, _ip: IpAddr) -> Result<(), UserspaceError> {
        Ok(())
    }
}

#[test]
fn canary_tells_a_foreign_local_address_from_a_missing_one() {
    let mut backend = backend(Box::new(ForeignAddresses), 1);
    // 127.0.0.1 is local (not svcproxy's): the canary is satisfied.
    let local = snapshot("127.0.0.1".parse().unwrap(), 1, &[]);
    backend.sync(&local, &Changes::default(), true).unwrap();
    assert!(backend.rules_intact());
    // 198.51.100.77 is nowhere (no endpoints, so no listener either): resync wanted.
    let missing = snapshot("198.51.100.77".parse().unwrap(), 1, &[]);
    backend.sync(&missing, &Changes::default(), true).unwrap();
    assert!(backend.listening().is_empty());
    assert!(!backend.rules_intact());
}
