//! Builders shared by the model tests.

use std::net::IpAddr;

use serde_json::{Value, json};
use svcproxy::model::{Endpoint, NodeInfo, Protocol, ServiceName, ServicePort, ServicePortName};

/// The node the proxy runs on in every test.
pub const NODE: &str = "node-a";
/// Its zone.
pub const ZONE: &str = "zone-a";

/// `node-a` in `zone-a`.
pub fn node() -> NodeInfo {
    NodeInfo {
        name: NODE.into(),
        zone: Some(ZONE.into()),
        ..NodeInfo::default()
    }
}

pub fn ip(s: &str) -> IpAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("bad test IP {s:?}: {e}"))
}

pub fn svc_name(ns: &str, name: &str) -> ServiceName {
    ServiceName::new(ns, name)
}

pub fn spn(ns: &str, name: &str, port: &str, protocol: Protocol) -> ServicePortName {
    ServicePortName {
        service: svc_name(ns, name),
        port: port.into(),
        protocol,
    }
}

/// A plain ClusterIP service port (`10.96.0.10`), every option at its default.
pub fn service_port(
    ns: &str,
    name: &str,
    port_name: &str,
    protocol: Protocol,
    port: u16,
) -> ServicePort {
    ServicePort::cluster_ip(spn(ns, name, port_name, protocol), ip("10.96.0.10"), port)
}

/// A ready, serving, non-terminating endpoint on port 80 of `node` (`""`: no nodeName).
pub fn ep(addr: &str, node: &str) -> Endpoint {
    Endpoint {
        node_name: (!node.is_empty()).then(|| node.into()),
        ..Endpoint::ready_at(ip(addr), 80)
    }
}

/// Fluent modifiers for [`ep`].
pub trait EndpointExt: Sized {
    /// Sets the three conditions.
    fn conditions(self, ready: bool, serving: bool, terminating: bool) -> Self;
    /// Not ready, not serving, not terminating (e.g. failing its readiness probe).
    fn not_ready(self) -> Self {
        self.conditions(false, false, false)
    }
    /// Terminating (never ready), still serving or not.
    fn terminating(self, serving: bool) -> Self {
        self.conditions(false, serving, true)
    }
    /// Target port.
    fn port(self, port: u16) -> Self;
    /// `hints.forZones`.
    fn zones(self, zones: &[&str]) -> Self;
    /// `hints.forNodes`.
    fn nodes(self, nodes: &[&str]) -> Self;
}

impl EndpointExt for Endpoint {
    fn conditions(mut self, ready: bool, serving: bool, terminating: bool) -> Self {
        self.ready = ready;
        self.serving = serving;
        self.terminating = terminating;
        self
    }
    fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }
    fn zones(mut self, zones: &[&str]) -> Self {
        self.zone_hints = zones.iter().map(|z| z.to_string()).collect();
        self
    }
    fn nodes(mut self, nodes: &[&str]) -> Self {
        self.node_hints = nodes.iter().map(|n| n.to_string()).collect();
        self
    }
}

/// JSON merge patch (RFC 7396): objects merge recursively, `null` deletes, anything else
/// (arrays included) replaces.
pub fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    b.remove(k);
                } else {
                    merge(b.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

/// `base` with `patch` merged in, deserialized as a k8s-openapi object.
pub fn object<T: serde::de::DeserializeOwned>(mut base: Value, patch: &Value) -> T {
    merge(&mut base, patch);
    serde_json::from_value(base.clone())
        .unwrap_or_else(|e| panic!("test object does not deserialize: {e}\n{base:#}"))
}

#[test]
fn merge_patch_helper() {
    let mut v = json!({"a": {"b": 1, "c": [1, 2]}, "d": 1});
    merge(&mut v, &json!({"a": {"c": [3], "e": "x"}, "d": null}));
    assert_eq!(v, json!({"a": {"b": 1, "c": [3], "e": "x"}}));
}
