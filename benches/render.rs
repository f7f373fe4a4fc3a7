//! Render benchmarks (issue figures): model build + full render at 1k and 10k services × 10
//! endpoints, and a partial render after one endpoint change at 10k.
//!
//! `cargo bench --bench render`

use std::collections::BTreeSet;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use svcproxy::dataplane::iptables::{LocalDetector, RenderConfig, Renderer, Scope};
use svcproxy::model::convert::{endpoint_slice, service_ports};
use svcproxy::model::{ChangeTracker, IpFamily, NodeInfo, ServiceName};

const ENDPOINTS: usize = 10;

fn objects(n: usize) -> Vec<(Service, EndpointSlice)> {
    (0..n)
        .map(|i| {
            let svc: Service = serde_json::from_value(serde_json::json!({
                "metadata": {"namespace": "bench", "name": format!("svc-{i}")},
                "spec": {
                    "type": if i % 10 == 0 { "NodePort" } else { "ClusterIP" },
                    "clusterIP": format!("10.96.{}.{}", i / 250, i % 250 + 1),
                    "ports": [{"name": "http", "port": 80, "protocol": "TCP",
                               "nodePort": if i % 10 == 0 { Some(30000 + i / 10) } else { None }}]
                }
            }))
            .unwrap();
            let eps: Vec<_> = (0..ENDPOINTS)
                .map(|e| {
                    serde_json::json!({
                        "addresses": [format!("10.{}.{}.{}", 128 + i / 2500, (i / 10) % 250, (i % 10) * 20 + e + 1)],
                        "nodeName": format!("node-{}", e % 3),
                        "conditions": {"ready": true}
                    })
                })
                .collect();
            let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
                "metadata": {"namespace": "bench", "name": format!("svc-{i}-abcde"),
                             "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": eps
            }))
            .unwrap();
            (svc, slice)
        })
        .collect()
}

fn node() -> NodeInfo {
    NodeInfo {
        name: "node-0".into(),
        ..NodeInfo::default()
    }
}

fn config() -> RenderConfig {
    RenderConfig {
        family: IpFamily::V4,
        local_detector: LocalDetector::Cidrs(vec!["10.128.0.0/9".parse().unwrap()]),
        ..RenderConfig::default()
    }
}

fn build_tracker(objs: &[(Service, EndpointSlice)]) -> ChangeTracker {
    let mut tracker = ChangeTracker::new(node());
    for (svc, slice) in objs {
        let name = ServiceName::new("bench", svc.metadata.name.clone().unwrap());
        tracker.update_service(name, Some(service_ports(svc).unwrap()));
        let info = endpoint_slice(slice).unwrap().unwrap();
        tracker.update_slice(info.service.clone(), info.slice_name.clone(), Some(info));
    }
    tracker
}

fn full(c: &mut Criterion) {
    let mut group = c.benchmark_group("full");
    group.sample_size(10);
    for n in [1_000, 10_000] {
        let objs = objects(n);
        group.bench_function(format!("model_build+render/{n}x{ENDPOINTS}"), |b| {
            b.iter(|| {
                let mut tracker = build_tracker(&objs);
                let (snap, _) = tracker.drain();
                let mut renderer = Renderer::new(config());
                let out = renderer.render(
                    &snap,
                    Scope::Full {
                        existing: &BTreeSet::new(),
                    },
                );
                black_box(out.text.len())
            })
        });
        let mut tracker = build_tracker(&objs);
        let (snap, _) = tracker.drain();
        group.bench_function(format!("render_only/{n}x{ENDPOINTS}"), |b| {
            b.iter(|| {
                let mut renderer = Renderer::new(config());
                black_box(
                    renderer
                        .render(
                            &snap,
                            Scope::Full {
                                existing: &BTreeSet::new(),
                            },
                        )
                        .text
                        .len(),
                )
            })
        });
    }
    group.finish();
}

fn partial(c: &mut Criterion) {
    let n = 10_000;
    let objs = objects(n);
    let mut tracker = build_tracker(&objs);
    let mut renderer = Renderer::new(config());
    {
        let (snap, _) = tracker.drain();
        renderer.render(
            &snap,
            Scope::Full {
                existing: &BTreeSet::new(),
            },
        );
    }
    // Alternate one service between 10 and 9 endpoints.
    let (_, slice) = &objs[n / 2];
    let full_info = endpoint_slice(slice).unwrap().unwrap();
    let mut fewer = full_info.clone();
    fewer.endpoints.pop();
    let mut toggle = false;
    let mut group = c.benchmark_group("partial");
    group.bench_function(format!("one_endpoint_change/{n}x{ENDPOINTS}"), |b| {
        b.iter(|| {
            toggle = !toggle;
            let info = if toggle {
                fewer.clone()
            } else {
                full_info.clone()
            };
            tracker.update_slice(info.service.clone(), info.slice_name.clone(), Some(info));
            let (snap, changes) = tracker.drain();
            let out = renderer.render(
                &snap,
                Scope::Partial {
                    changed: &changes.services,
                },
            );
            assert!(!out.full);
            black_box(out.text.len())
        })
    });
    group.finish();
}

criterion_group!(benches, full, partial);
criterion_main!(benches);
