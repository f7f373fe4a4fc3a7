//! Sources of Kubernetes objects, turned into model changes.
//!
//! Every source (the API server, `--manifests-dir`, files for `render`) feeds the same
//! [`ChangeTracker`] through [`apply_object`] and [`delete_object`].

pub mod api;
pub mod files;
pub mod manifests;

use std::time::SystemTime;

use crate::model::convert::{self, ConvertError};
use crate::model::{ChangeTracker, ServiceName};

pub use files::Object;

/// Applies an added or updated object to the tracker. Returns whether anything is now pending.
///
/// An object that cannot be converted leaves the tracker as it was (the last good version of
/// that object stays in force) and returns the error for the caller to report.
pub fn apply_object(
    tracker: &mut ChangeTracker,
    node_name: &str,
    obj: &Object,
) -> Result<bool, ConvertError> {
    match obj {
        Object::Service(svc) => {
            let ports = convert::service_ports(svc)?;
            let name = ServiceName::new(
                svc.metadata.namespace.clone().unwrap_or_default(),
                svc.metadata.name.clone().unwrap_or_default(),
            );
            Ok(tracker.update_service(name, Some(ports)))
        }
        Object::EndpointSlice(slice) => match convert::endpoint_slice(slice)? {
            Some(info) => {
                let changed =
                    tracker.update_slice(info.service.clone(), info.slice_name.clone(), Some(info));
                if let Some(at) = changed.then(|| trigger_time(slice)).flatten() {
                    tracker.record_trigger_time(at);
                }
                Ok(changed)
            }
            None => Ok(false),
        },
        Object::Node(node) => {
            if node.metadata.name.as_deref() != Some(node_name) {
                return Ok(false);
            }
            Ok(tracker.update_node(convert::node_info(node)?))
        }
    }
}

/// Annotation the EndpointSlice controller sets to when the change behind a slice update
/// happened (a pod became ready, ...): the start of the network-programming latency.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// The slice's trigger time, if it has a valid one (RFC 3339).
fn trigger_time(slice: &k8s_openapi::api::discovery::v1::EndpointSlice) -> Option<SystemTime> {
    let text = slice
        .metadata
        .annotations
        .as_ref()?
        .get(TRIGGER_TIME_ANNOTATION)?;
    let ts: jiff::Timestamp = text.parse().ok()?;
    Some(SystemTime::from(ts))
}

/// What identifies an object in the tracker: enough to delete it, nothing more (sources
/// keep these instead of whole objects).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ObjectRef {
    /// A Service.
    Service(ServiceName),
    /// An EndpointSlice of `service`.
    EndpointSlice {
        /// The Service it belongs to.
        service: ServiceName,
        /// The slice's name.
        name: String,
    },
    /// A Node.
    Node(String),
}

impl Object {
    /// The tracker identity of this object, if it has the fields that make one.
    pub fn object_ref(&self) -> Option<ObjectRef> {
        match self {
            Object::Service(svc) => {
                let (ns, name) = (
                    svc.metadata.namespace.as_ref()?,
                    svc.metadata.name.as_ref()?,
                );
                Some(ObjectRef::Service(ServiceName::new(ns, name)))
            }
            Object::EndpointSlice(slice) => {
                let labels = slice.metadata.labels.as_ref();
                let service = labels.and_then(|l| l.get(convert::SERVICE_NAME_LABEL))?;
                let (ns, name) = (
                    slice.metadata.namespace.as_ref()?,
                    slice.metadata.name.as_ref()?,
                );
                Some(ObjectRef::EndpointSlice {
                    service: ServiceName::new(ns, service),
                    name: name.clone(),
                })
            }
            Object::Node(node) => Some(ObjectRef::Node(node.metadata.name.clone()?)),
        }
    }
}

/// Removes a deleted object from the tracker. Returns whether anything is now pending.
pub fn delete_object(tracker: &mut ChangeTracker, node_name: &str, obj: &Object) -> bool {
    obj.object_ref()
        .is_some_and(|r| delete_ref(tracker, node_name, &r))
}

/// Removes the object `r` names from the tracker. Returns whether anything is now pending.
pub fn delete_ref(tracker: &mut ChangeTracker, node_name: &str, r: &ObjectRef) -> bool {
    match r {
        ObjectRef::Service(name) => tracker.update_service(name.clone(), None),
        ObjectRef::EndpointSlice { service, name } => {
            tracker.update_slice(service.clone(), name.clone(), None)
        }
        ObjectRef::Node(name) => {
            if name != node_name {
                return false;
            }
            let mut info = tracker.node().clone();
            info.deleting = true;
            tracker.update_node(info)
        }
    }
}
