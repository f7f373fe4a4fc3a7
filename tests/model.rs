//! Table-driven unit tests of the pure model (`svcproxy::model`): endpoint selection, conversion
//! of Kubernetes objects and the change tracker.
//!
//! Each semantic rule gets its own table; a table reports every failing row at once, by its
//! description, instead of stopping at the first one.

#[path = "model/common.rs"]
mod common;
#[path = "model/convert.rs"]
mod convert;
#[path = "model/selection.rs"]
mod selection;
#[path = "model/tracker.rs"]
mod tracker;
