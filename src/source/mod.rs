//! Sources of Kubernetes objects, turned into model changes.
//!
//! Every source (files today; the API server and `--manifests-dir` next) feeds the same
//! [`ChangeTracker`] through [`apply_object`] and [`delete_object`].

pub mod files;
pub mod manifests;

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
                Ok(tracker.update_slice(info.service.clone(), info.slice_name.clone(), Some(info)))
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

/// Removes a deleted object from the tracker. Returns whether anything is now pending.
pub fn delete_object(tracker: &mut ChangeTracker, node_name: &str, obj: &Object) -> bool {
    match obj {
        Object::Service(svc) => {
            let (Some(ns), Some(name)) = (&svc.metadata.namespace, &svc.metadata.name) else {
                return false;
            };
            tracker.update_service(ServiceName::new(ns, name), None)
        }
        Object::EndpointSlice(slice) => {
            let labels = slice.metadata.labels.as_ref();
            let service = labels.and_then(|l| l.get(convert::SERVICE_NAME_LABEL));
            let (Some(ns), Some(name), Some(service)) =
                (&slice.metadata.namespace, &slice.metadata.name, service)
            else {
                return false;
            };
            tracker.update_slice(ServiceName::new(ns, service), name.clone(), None)
        }
        Object::Node(node) => {
            if node.metadata.name.as_deref() != Some(node_name) {
                return false;
            }
            let mut info = tracker.node().clone();
            info.deleting = true;
            tracker.update_node(info)
        }
    }
}
