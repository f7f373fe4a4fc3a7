//! UDP service ports: one socket per service address, one session per client address.
//!
//! A session is a connected socket to the endpoint chosen for the client's first datagram
//! (round-robin or ClientIP affinity); the client's later datagrams follow it and the
//! endpoint's answers are sent back from the service address. A session ends after
//! [`UDP_IDLE_TIMEOUT`] without traffic either way, when the endpoint answers with ICMP port
//! unreachable (counted as a connect error; the next datagram picks again), when its
//! endpoint leaves the service (the client moves on with its next datagram, as conntrack
//! cleanup does in the NAT modes), or when the service port is deleted.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use super::balancer::Path;
use super::listeners::{ConnSettings, ListenerSpec, PortEntry};
use super::stats::ActiveGuard;

/// How long a UDP session lives without a datagram in either direction (the kernel's
/// conntrack UDP timeout for the NAT modes is 30 s too).
pub const UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest datagram relayed.
const MAX_DATAGRAM: usize = 65_536;

struct Session {
    endpoint: SocketAddr,
    upstream: Arc<UdpSocket>,
    /// The endpoint-list generation under which `endpoint` was last known valid.
    generation: AtomicU64,
    activity: Arc<AtomicU64>,
    stop: CancellationToken,
}

type Sessions = Arc<Mutex<HashMap<SocketAddr, Arc<Session>>>>;

/// A bound UDP socket on `addr` with SO_REUSEADDR and IP_FREEBIND (see the TCP listener).
pub fn open_udp(runtime: &tokio::runtime::Handle, addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = super::listeners::bound_socket(addr, socket2::Type::DGRAM)?;
    let _guard = runtime.enter();
    UdpSocket::from_std(socket.into())
}

/// Relays datagrams of one service address until `stop`; sessions end with it.
pub async fn serve(
    socket: UdpSocket,
    spec: ListenerSpec,
    entry: Arc<PortEntry>,
    settings: ConnSettings,
    stop: CancellationToken,
) {
    let socket = Arc::new(socket);
    let sessions: Sessions = Arc::default();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, client) = tokio::select! {
            () = stop.cancelled() => break,
            () = entry.connections.cancelled() => break,
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    // ICMP errors of earlier replies surface here; they do not concern the
                    // next datagram.
                    tracing::debug!(error = %e, "UDP receive error");
                    continue;
                }
            },
        };
        let Some(session) = session_for(&sessions, &socket, client, &spec, &entry, &settings).await
        else {
            continue;
        };
        session.activity.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = session.upstream.send(&buf[..n]).await {
            tracing::debug!(client = %client, endpoint = %session.endpoint, error = %e, "UDP send failed");
            end_session(&sessions, client, &session, &entry, true);
        }
    }
    let all: Vec<Arc<Session>> = sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain()
        .map(|(_, s)| s)
        .collect();
    for s in all {
        s.stop.cancel();
    }
}

fn end_session(
    sessions: &Sessions,
    client: SocketAddr,
    session: &Arc<Session>,
    entry: &PortEntry,
    failed: bool,
) {
    let mut map = sessions.lock().unwrap_or_else(|p| p.into_inner());
    if map.get(&client).is_some_and(|s| Arc::ptr_eq(s, session)) {
        map.remove(&client);
    }
    drop(map);
    session.stop.cancel();
    if failed {
        entry.counters.connect_error();
        entry
            .balancer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .failed(client.ip(), session.endpoint, Instant::now());
    }
}

/// The client's session, revalidated against the current endpoints, or a new one.
async fn session_for(
    sessions: &Sessions,
    socket: &Arc<UdpSocket>,
    client: SocketAddr,
    spec: &ListenerSpec,
    entry: &Arc<PortEntry>,
    settings: &ConnSettings,
) -> Option<Arc<Session>> {
    let path = spec.path;
    let existing = sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&client)
        .cloned();
    let generation = entry.generation.load(Ordering::Acquire);
    if let Some(s) = existing {
        if s.generation.load(Ordering::Relaxed) == generation {
            return Some(s);
        }
        let still_there = entry
            .balancer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .plan()
            .contains(s.endpoint);
        if still_there {
            s.generation.store(generation, Ordering::Relaxed);
            return Some(s);
        }
        tracing::debug!(client = %client, endpoint = %s.endpoint, "endpoint left the service; new UDP session");
        end_session(sessions, client, &s, entry, false);
    }
    let local = path == Path::External && settings.local.contains(client.ip());
    let endpoint = {
        let mut b = entry.balancer.lock().unwrap_or_else(|p| p.into_inner());
        if spec.load_balancer && !b.plan().admits_on_load_balancer(client.ip()) {
            return None;
        }
        let first = *b
            .candidates(client.ip(), path, local, Instant::now())
            .first()?;
        b.connected(client.ip(), first, Instant::now());
        first
    };
    let bind: SocketAddr = match endpoint {
        SocketAddr::V4(_) => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0).into(),
        SocketAddr::V6(_) => (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0).into(),
    };
    let upstream = match UdpSocket::bind(bind).await {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!(error = %e, "cannot open a UDP session socket");
            return None;
        }
    };
    if let Err(e) = upstream.connect(endpoint).await {
        tracing::debug!(endpoint = %endpoint, error = %e, "UDP connect failed");
        entry.counters.connect_error();
        return None;
    }
    let session = Arc::new(Session {
        endpoint,
        upstream: Arc::new(upstream),
        generation: AtomicU64::new(generation),
        activity: Arc::new(AtomicU64::new(0)),
        stop: CancellationToken::new(),
    });
    sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(client, session.clone());
    tokio::spawn(replies(
        session.clone(),
        socket.clone(),
        client,
        sessions.clone(),
        entry.clone(),
        entry.counters.connection(),
    ));
    Some(session)
}

/// Sends the endpoint's answers back to the client until the session ends.
async fn replies(
    session: Arc<Session>,
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    sessions: Sessions,
    entry: Arc<PortEntry>,
    _active: ActiveGuard,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let tick = UDP_IDLE_TIMEOUT / 6;
    let mut last = session.activity.load(Ordering::Relaxed);
    let mut quiet = Duration::ZERO;
    loop {
        tokio::select! {
            () = session.stop.cancelled() => return,
            () = entry.connections.cancelled() => return,
            () = tokio::time::sleep(tick) => {
                let now = session.activity.load(Ordering::Relaxed);
                if now == last {
                    quiet += tick;
                    if quiet >= UDP_IDLE_TIMEOUT {
                        end_session(&sessions, client, &session, &entry, false);
                        return;
                    }
                } else {
                    last = now;
                    quiet = Duration::ZERO;
                }
            }
            r = session.upstream.recv(&mut buf) => match r {
                Ok(n) => {
                    session.activity.fetch_add(1, Ordering::Relaxed);
                    let _ = socket.send_to(&buf[..n], client).await;
                }
                Err(e) => {
                    // ICMP port unreachable from the endpoint: nothing serves there.
                    tracing::debug!(client = %client, endpoint = %session.endpoint, error = %e, "UDP endpoint error");
                    end_session(&sessions, client, &session, &entry, true);
                    return;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::userspace::balancer::{PortBalancer, PortPlan};
    use crate::dataplane::userspace::listeners::LocalClients;
    use crate::dataplane::userspace::stats::UserspaceStats;
    use crate::model::{Protocol, ServiceName, ServicePortName};

    async fn echo(name: &'static str) -> SocketAddr {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while let Ok((_, peer)) = s.recv_from(&mut buf).await {
                let _ = s.send_to(name.as_bytes(), peer).await;
            }
        });
        addr
    }

    async fn ask(client: &UdpSocket, to: SocketAddr) -> String {
        client.send_to(b"?", to).await.unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = tokio::time::timeout(Duration::from_secs(2), client.recv_from(&mut buf))
            .await
            .expect("answer")
            .unwrap();
        assert_eq!(from, to, "the answer comes from the service address");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sessions_stick_spread_and_follow_endpoint_removal() {
        let a = echo("a").await;
        let b = echo("b").await;
        let stats = UserspaceStats::new();
        let name = ServicePortName {
            service: ServiceName::new("ns", "dns"),
            port: "dns".into(),
            protocol: Protocol::Udp,
        };
        let entry = Arc::new(PortEntry {
            balancer: Mutex::new(PortBalancer::new(PortPlan {
                internal: vec![a, b],
                ..PortPlan::default()
            })),
            counters: stats.port(&name),
            connections: CancellationToken::new(),
            generation: AtomicU64::new(0),
        });
        let rt = tokio::runtime::Handle::current();
        let front = open_udp(&rt, "127.0.0.1:0".parse().unwrap()).unwrap();
        let front_addr = front.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve(
            front,
            ListenerSpec {
                port: name.clone(),
                family: crate::model::IpFamily::V4,
                path: Path::Internal,
                load_balancer: false,
            },
            entry.clone(),
            ConnSettings {
                idle_timeout: Duration::from_secs(10),
                local: Arc::new(LocalClients::default()),
            },
            stop.clone(),
        ));

        // One client keeps its endpoint; two clients are spread.
        let c1 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let c2 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let first = ask(&c1, front_addr).await;
        for _ in 0..5 {
            assert_eq!(ask(&c1, front_addr).await, first);
        }
        let second = ask(&c2, front_addr).await;
        assert_ne!(first, second);
        assert_eq!(stats.snapshot()[0].active, 2);
        assert_eq!(stats.snapshot()[0].accepted, 2);

        // c1's endpoint leaves: its next datagram goes to the other one.
        let keep = if first == "a" { b } else { a };
        entry.balancer.lock().unwrap().update(
            PortPlan {
                internal: vec![keep],
                ..PortPlan::default()
            },
            Instant::now(),
        );
        entry.generation.fetch_add(1, Ordering::Release);
        assert_eq!(ask(&c1, front_addr).await, second);
        stop.cancel();
    }
}
