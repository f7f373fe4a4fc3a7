//! The API-server source: kube-rs watchers on v1 Services, discovery.k8s.io/v1 EndpointSlices
//! and this node's v1 Node, feeding the change tracker.
//!
//! - Only objects this proxy serves are listed: the label selector excludes headless services'
//!   objects and those handled by another proxy (`service.kubernetes.io/service-proxy-name`),
//!   as upstream's informers do; the Node watch is narrowed to this node by field selector.
//! - Syncing starts only after all three initial lists are complete.
//! - A watch that ends or expires (410 Gone) is relisted by the watcher; objects missing from
//!   the new list are deleted then, and nothing is flushed in between, so the installed rules
//!   keep serving throughout. An unreachable API server is retried with exponential backoff.
//! - An object that cannot be converted is logged with its namespace/name and the reason and
//!   skipped (its last good version stays in force); everything else keeps syncing.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::path::Path;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, ObjectReference, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Config, Resource};
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;

use super::{Object, ObjectRef, apply_object, delete_ref};
use crate::model::ChangeTracker;
use crate::sync::SyncTrigger;

/// Upstream's selector for the Service and EndpointSlice informers.
pub const PROXIED_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// The API server cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The kubeconfig file cannot be read or used.
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The file.
        path: String,
        /// Why.
        source: kube::config::KubeconfigError,
    },
    /// `--master` is not a URL.
    #[error("--master {0:?} is not a valid URL")]
    Master(String),
    /// No configuration was found (not in a pod, no kubeconfig).
    #[error("no API server configuration: not running in a pod and no --kubeconfig/--master ({0})")]
    Infer(kube::config::InferConfigError),
    /// The client could not be built.
    #[error("cannot build the API client: {0}")]
    Client(#[from] kube::Error),
}

/// Builds a client: `--kubeconfig` if given, else the in-cluster service account, else the
/// usual kubeconfig search; `--master` overrides the server URL (plain `http://` works).
pub async fn client(kubeconfig: Option<&Path>, master: Option<&str>) -> Result<Client, ApiError> {
    let master_url = master
        .map(|m| {
            m.parse::<http::Uri>()
                .map_err(|_| ApiError::Master(m.to_string()))
        })
        .transpose()?;
    let mut config = match (kubeconfig, &master_url) {
        (Some(path), _) => {
            let kerr = |source| ApiError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let kc = Kubeconfig::read_from(path).map_err(kerr)?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(kerr)?
        }
        (None, Some(url)) => Config::new(url.clone()),
        (None, None) => Config::infer().await.map_err(ApiError::Infer)?,
    };
    if let Some(url) = master_url {
        config.cluster_url = url;
    }
    Ok(Client::try_from(config)?)
}

/// Which initial lists have completed.
#[derive(Debug, Default)]
struct Listed {
    services: bool,
    slices: bool,
    node: bool,
}

/// What every watcher task shares.
struct Sink {
    node_name: String,
    tracker: Arc<Mutex<ChangeTracker>>,
    trigger: SyncTrigger,
    listed: Mutex<Listed>,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Services,
    Slices,
    Node,
}

impl Sink {
    fn tracker(&self) -> std::sync::MutexGuard<'_, ChangeTracker> {
        self.tracker.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn apply(&self, obj: &Object) {
        let result = apply_object(&mut self.tracker(), &self.node_name, obj);
        match result {
            Ok(true) => self.trigger.kick(),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "skipping object that cannot be proxied"),
        }
    }

    fn delete(&self, r: &ObjectRef) {
        if delete_ref(&mut self.tracker(), &self.node_name, r) {
            self.trigger.kick();
        }
    }

    fn list_done(&self, kind: Kind) {
        let mut l = self.listed.lock().unwrap_or_else(|p| p.into_inner());
        match kind {
            Kind::Services => l.services = true,
            Kind::Slices => l.slices = true,
            Kind::Node => l.node = true,
        }
        if l.services && l.slices && l.node && !self.trigger.is_ready() {
            tracing::info!("initial lists of Services, EndpointSlices and the Node complete");
            self.trigger.set_ready();
        }
    }
}

/// The running watchers; dropping this stops them.
pub struct ApiWatch {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for ApiWatch {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts the three watchers on the current tokio runtime.
pub fn watch(
    client: Client,
    node_name: &str,
    tracker: Arc<Mutex<ChangeTracker>>,
    trigger: SyncTrigger,
) -> ApiWatch {
    let sink = Arc::new(Sink {
        node_name: node_name.to_string(),
        tracker,
        trigger,
        listed: Mutex::default(),
    });
    let proxied = watcher::Config::default().labels(PROXIED_SELECTOR);
    let tasks = vec![
        tokio::spawn(run_watcher(
            Api::<Service>::all(client.clone()),
            proxied.clone(),
            |s| Object::Service(Box::new(s)),
            sink.clone(),
            Kind::Services,
        )),
        tokio::spawn(run_watcher(
            Api::<EndpointSlice>::all(client.clone()),
            proxied,
            |s| Object::EndpointSlice(Box::new(s)),
            sink.clone(),
            Kind::Slices,
        )),
        tokio::spawn(run_watcher(
            Api::<Node>::all(client),
            watcher::Config::default().fields(&format!("metadata.name={node_name}")),
            |n| Object::Node(Box::new(n)),
            sink,
            Kind::Node,
        )),
    ];
    ApiWatch { tasks }
}

/// Follows one kind until aborted; see the module docs for relist semantics.
async fn run_watcher<K>(
    api: Api<K>,
    config: watcher::Config,
    wrap: fn(K) -> Object,
    sink: Arc<Sink>,
    kind: Kind,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut known: BTreeSet<ObjectRef> = BTreeSet::new();
    let mut relisting: Option<BTreeSet<ObjectRef>> = None;
    let mut failures = 0u32;
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                failures += 1;
                // Every failure while the server is away would repeat the same line.
                if failures == 1 || failures.is_power_of_two() {
                    tracing::warn!(?kind, failures, error = %e, "API watch failed; retrying with backoff, installed rules keep serving");
                }
                continue;
            }
        };
        if failures > 0 {
            tracing::info!(?kind, failures, "API watch restored");
            failures = 0;
        }
        match event {
            Event::Init => relisting = Some(BTreeSet::new()),
            Event::InitApply(o) | Event::Apply(o) => {
                let obj = wrap(o);
                if let Some(r) = obj.object_ref() {
                    if let Some(seen) = relisting.as_mut() {
                        seen.insert(r.clone());
                    }
                    known.insert(r);
                }
                sink.apply(&obj);
            }
            Event::Delete(o) => {
                if let Some(r) = wrap(o).object_ref() {
                    known.remove(&r);
                    sink.delete(&r);
                }
            }
            Event::InitDone => {
                let seen = relisting.take().unwrap_or_default();
                for gone in known.difference(&seen) {
                    sink.delete(gone);
                }
                known = seen;
                sink.list_done(kind);
            }
        }
    }
}

/// Reports the start-up like upstream (`Starting` / `StartKubeProxy` on this Node, through
/// events.k8s.io/v1). Failure is only logged: events are informational.
pub async fn post_startup_event(client: Client, node_name: String, mode: &'static str) {
    let node_name = node_name.as_str();
    let now = jiff::Timestamp::now();
    let event = K8sEvent {
        metadata: ObjectMeta {
            name: Some(format!("{node_name}.{:x}", now.as_nanosecond())),
            namespace: Some("default".into()),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(now)),
        action: Some("StartKubeProxy".into()),
        reason: Some("Starting".into()),
        type_: Some("Normal".into()),
        note: Some(format!("svcproxy started in {mode} mode")),
        reporting_controller: Some("svcproxy".into()),
        reporting_instance: Some(format!("svcproxy-{node_name}")),
        regarding: Some(ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(node_name.into()),
            uid: Some(node_name.into()),
            ..ObjectReference::default()
        }),
        ..K8sEvent::default()
    };
    let api: Api<K8sEvent> = Api::namespaced(client, "default");
    if let Err(e) = api.create(&PostParams::default(), &event).await {
        tracing::warn!(error = %e, "cannot post the start-up event");
    }
}
