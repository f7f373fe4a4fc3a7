//! Small builders for model objects used across test files.

use svcproxy::model::convert::{SliceInfo, SlicePort};
use svcproxy::model::{
    ChangeTracker, Endpoint, NodeInfo, Protocol, ServiceName, ServicePort, ServicePortName,
};

/// A ClusterIP service port `ns/<name>:p` (TCP) on `ip:port`.
pub fn service(name: &str, ip: &str, port: u16) -> ServicePort {
    let name = ServicePortName {
        service: ServiceName::new("ns", name),
        port: "p".into(),
        protocol: Protocol::Tcp,
    };
    ServicePort::cluster_ip(name, ip.parse().unwrap(), port)
}

/// A ready endpoint on node `node`.
pub fn endpoint(ip: &str, node: &str) -> Endpoint {
    Endpoint {
        node_name: Some(node.into()),
        ..Endpoint::ready_at(ip.parse().unwrap(), 0)
    }
}

/// The slice `<svc>-1` of `ns/<svc>` with ready endpoints on port 8080 of node "node".
pub fn slice(svc: &str, ips: &[&str]) -> SliceInfo {
    SliceInfo {
        service: ServiceName::new("ns", svc),
        slice_name: format!("{svc}-1"),
        ports: vec![SlicePort {
            name: "p".into(),
            protocol: Protocol::Tcp,
            port: 8080,
        }],
        endpoints: ips.iter().map(|ip| endpoint(ip, "node")).collect(),
    }
}

/// A tracker for node "node" holding services `names` on 10.96.x.y:80 (the i-th service at
/// 10.96.0.(i+1) for the first 250), two endpoints each.
pub fn tracker_with(names: &[&str]) -> ChangeTracker {
    let mut tracker = ChangeTracker::new(NodeInfo {
        name: "node".into(),
        ..NodeInfo::default()
    });
    for (i, svc) in names.iter().enumerate() {
        tracker.update_service(
            ServiceName::new("ns", *svc),
            Some(vec![service(
                svc,
                &format!("10.96.{}.{}", i / 250, i % 250 + 1),
                80,
            )]),
        );
        set_endpoints(
            &mut tracker,
            svc,
            &[
                &format!("10.{}.{}.1", 244 + i / 250, i % 250),
                &format!("10.{}.{}.2", 244 + i / 250, i % 250),
            ],
        );
    }
    tracker
}

/// Replaces the endpoints of `ns/<svc>`.
pub fn set_endpoints(tracker: &mut ChangeTracker, svc: &str, ips: &[&str]) {
    tracker.update_slice(
        ServiceName::new("ns", svc),
        format!("{svc}-1"),
        Some(slice(svc, ips)),
    );
}
