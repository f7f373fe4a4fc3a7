//! The pure model: service ports, endpoints, the change tracker and endpoint selection.
//!
//! No I/O, no async, no API client: everything here is deterministic and unit-tested, and
//! every Kubernetes semantic rule lives here once so that backends never re-decide policy.

pub mod convert;
pub mod selection;
pub mod tracker;
pub mod types;

pub use convert::{ConvertError, InvalidField, SliceInfo};
pub use selection::{PathPlan, Selection, select};
pub use tracker::{ChangeTracker, Changes, Snapshot};
pub use types::{
    Endpoint, IpFamily, NodeInfo, Protocol, ServiceName, ServicePort, ServicePortName,
    ServicePortState, SessionAffinity,
};
