//! An in-process Kubernetes API server for tests: real HTTP list and watch (chunked JSON
//! event streams) for Services, EndpointSlices and Nodes, event creation, resource versions,
//! `410 Gone` for expired versions, dropped watches, and going away and coming back on the
//! same port. The real kube client talks to it over TCP exactly as to an API server.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

/// The kinds the mock serves: (path, list kind, api version).
const KINDS: &[(&str, &str, &str)] = &[
    ("/api/v1/services", "ServiceList", "v1"),
    (
        "/apis/discovery.k8s.io/v1/endpointslices",
        "EndpointSliceList",
        "discovery.k8s.io/v1",
    ),
    ("/api/v1/nodes", "NodeList", "v1"),
];

#[derive(Clone, Debug)]
struct WatchEvent {
    rv: u64,
    path: &'static str,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Store {
    rv: u64,
    /// Watches may start from resource versions above this; older ones get 410 Gone.
    oldest_rv: u64,
    objects: BTreeMap<(&'static str, String), Value>,
    history: Vec<WatchEvent>,
    events_posted: Vec<Value>,
    requests: Vec<String>,
}

struct Shared {
    store: Mutex<Store>,
    tx: broadcast::Sender<Option<WatchEvent>>,
}

/// A running mock API server.
pub struct MockApi {
    shared: Arc<Shared>,
    /// The address it listens on.
    pub addr: SocketAddr,
    server: Option<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

fn path_of(obj: &Value) -> &'static str {
    match obj["kind"].as_str() {
        Some("Service") => KINDS[0].0,
        Some("EndpointSlice") => KINDS[1].0,
        Some("Node") => KINDS[2].0,
        other => panic!("mock API server does not serve kind {other:?}"),
    }
}

fn key_of(obj: &Value) -> String {
    format!(
        "{}/{}",
        obj["metadata"]["namespace"].as_str().unwrap_or(""),
        obj["metadata"]["name"]
            .as_str()
            .expect("object without a name")
    )
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `obj` matches the label selector (only `!key` and `key=value` terms) and the field
/// selector (only `metadata.name=`).
fn matches(obj: &Value, labels: Option<&str>, fields: Option<&str>) -> bool {
    let obj_labels = &obj["metadata"]["labels"];
    for term in labels.unwrap_or("").split(',').filter(|t| !t.is_empty()) {
        let ok = if let Some(k) = term.strip_prefix('!') {
            obj_labels.get(k).is_none()
        } else if let Some((k, v)) = term.split_once('=') {
            obj_labels.get(k).and_then(Value::as_str) == Some(v)
        } else {
            obj_labels.get(term).is_some()
        };
        if !ok {
            return false;
        }
    }
    for term in fields.unwrap_or("").split(',').filter(|t| !t.is_empty()) {
        if let Some(name) = term.strip_prefix("metadata.name=")
            && obj["metadata"]["name"].as_str() != Some(name)
        {
            return false;
        }
    }
    true
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, body: Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

impl MockApi {
    /// Starts a server on a free port of 127.0.0.1 (in the calling thread's namespace).
    pub async fn start() -> MockApi {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts a server on `addr`.
    pub async fn start_on(addr: SocketAddr) -> MockApi {
        let (tx, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            tx,
        });
        let mut api = MockApi {
            shared,
            addr,
            server: None,
            conns: Arc::default(),
        };
        api.serve().await;
        api
    }

    async fn serve(&mut self) {
        let listener = TcpListener::bind(self.addr).await.expect("bind mock API");
        self.addr = listener.local_addr().unwrap();
        let shared = self.shared.clone();
        let conns = self.conns.clone();
        self.server = Some(tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = shared.clone();
                let task = tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(shared, req).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                conns.lock().unwrap().push(task);
            }
        }));
    }

    /// The server URL for `--master`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client for this server.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url().parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    /// Creates or replaces an object (given as JSON with kind and metadata).
    pub fn apply(&self, mut obj: Value) {
        let path = path_of(&obj);
        let key = key_of(&obj);
        let mut st = self.shared.store.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let kind = if st.objects.contains_key(&(path, key.clone())) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.objects.insert((path, key), obj.clone());
        let ev = WatchEvent {
            rv,
            path,
            kind,
            object: obj,
        };
        st.history.push(ev.clone());
        let _ = self.shared.tx.send(Some(ev));
    }

    /// Deletes an object by kind, namespace and name.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) {
        let path = path_of(&json!({"kind": kind}));
        let mut st = self.shared.store.lock().unwrap();
        let Some(mut obj) = st.objects.remove(&(path, format!("{namespace}/{name}"))) else {
            panic!("mock API: no {kind} {namespace}/{name} to delete");
        };
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let ev = WatchEvent {
            rv,
            path,
            kind: "DELETED",
            object: obj,
        };
        st.history.push(ev.clone());
        let _ = self.shared.tx.send(Some(ev));
    }

    /// Forgets the event history: watches resuming from an older version get 410 Gone and
    /// the client must relist.
    pub fn expire_history(&self) {
        let mut st = self.shared.store.lock().unwrap();
        st.oldest_rv = st.rv;
        st.history.clear();
    }

    /// Ends every open watch with an ERROR 410 event (as an API server does after etcd
    /// compaction), forcing a relist.
    pub fn gone(&self) {
        self.expire_history();
        let _ = self.shared.tx.send(None);
    }

    /// Stops listening and drops every connection (the API server went away).
    pub fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
        }
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    /// Listens again on the same address with the same state.
    pub async fn restart(&mut self) {
        self.serve().await;
    }

    /// Events posted by clients (events.k8s.io/v1 and v1).
    pub fn posted_events(&self) -> Vec<Value> {
        self.shared.store.lock().unwrap().events_posted.clone()
    }

    /// Request lines received so far (`GET /api/v1/services?...`).
    pub fn requests(&self) -> Vec<String> {
        self.shared.store.lock().unwrap().requests.clone()
    }
}

impl Drop for MockApi {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    shared
        .store
        .lock()
        .unwrap()
        .requests
        .push(format!("{} {path}?{query}", req.method()));
    if req.method() == Method::POST && path.ends_with("/events") {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        shared.store.lock().unwrap().events_posted.push(v.clone());
        return full(StatusCode::CREATED, v);
    }
    let Some(&(kind_path, list_kind, api_version)) = KINDS.iter().find(|k| k.0 == path) else {
        return full(
            StatusCode::NOT_FOUND,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound"}),
        );
    };
    let labels = query_param(&query, "labelSelector");
    let fields = query_param(&query, "fieldSelector");
    if query_param(&query, "watch").as_deref() == Some("true")
        || query_param(&query, "watch").as_deref() == Some("1")
    {
        let from: u64 = query_param(&query, "resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        return watch(shared, kind_path, from, labels, fields);
    }
    let st = shared.store.lock().unwrap();
    let items: Vec<Value> = st
        .objects
        .iter()
        .filter(|((p, _), o)| *p == kind_path && matches(o, labels.as_deref(), fields.as_deref()))
        .map(|(_, o)| o.clone())
        .collect();
    full(
        StatusCode::OK,
        json!({
            "kind": list_kind,
            "apiVersion": api_version,
            "metadata": {"resourceVersion": st.rv.to_string()},
            "items": items,
        }),
    )
}

fn line(v: &Value) -> Result<Frame<Bytes>, Infallible> {
    let mut s = v.to_string();
    s.push('\n');
    Ok(Frame::data(Bytes::from(s)))
}

fn gone_event() -> Value {
    json!({"type": "ERROR", "object": {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "too old resource version", "reason": "Expired", "code": 410}})
}

fn watch(
    shared: Arc<Shared>,
    path: &'static str,
    from: u64,
    labels: Option<String>,
    fields: Option<String>,
) -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1024);
    let mut live = shared.tx.subscribe();
    let (backlog, expired) = {
        let st = shared.store.lock().unwrap();
        let expired = from < st.oldest_rv;
        let backlog: Vec<WatchEvent> = st
            .history
            .iter()
            .filter(|e| e.rv > from && e.path == path)
            .cloned()
            .collect();
        (backlog, expired)
    };
    tokio::spawn(async move {
        if expired {
            let _ = tx.send(line(&gone_event())).await;
            return;
        }
        let mut last = from;
        let send = |e: &WatchEvent, last: u64| {
            (e.path == path
                && e.rv > last
                && matches(&e.object, labels.as_deref(), fields.as_deref()))
            .then(|| json!({"type": e.kind, "object": e.object}))
        };
        for e in &backlog {
            if let Some(v) = send(e, last)
                && tx.send(line(&v)).await.is_err()
            {
                return;
            }
            last = last.max(e.rv);
        }
        let timeout = tokio::time::sleep(Duration::from_secs(290));
        tokio::pin!(timeout);
        loop {
            tokio::select! {
                _ = &mut timeout => return,
                ev = live.recv() => match ev {
                    Ok(Some(e)) => {
                        if let Some(v) = send(&e, last)
                            && tx.send(line(&v)).await.is_err() {
                                return;
                            }
                        last = last.max(e.rv);
                    }
                    Ok(None) => {
                        let _ = tx.send(line(&gone_event())).await;
                        return;
                    }
                    Err(_) => return,
                },
            }
        }
    });
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

/// A Service JSON object with one TCP port 80 → 8080 and `cluster_ip`.
pub fn service(ns: &str, name: &str, cluster_ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": ns, "name": name},
        "spec": {
            "type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        },
    })
}

/// An EndpointSlice JSON object for `service` with ready endpoints `ips` on `node`, port 8080.
pub fn slice(ns: &str, service: &str, name: &str, ips: &[&str], node: &str) -> Value {
    let endpoints: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true, "serving": true, "terminating": false}, "nodeName": node}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": ns, "name": name,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    })
}

/// A Node JSON object.
pub fn node(name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": "zone-a"}},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
    })
}
