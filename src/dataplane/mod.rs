//! Dataplane backends: each turns a [`crate::model::Snapshot`] into kernel state.
//!
//! Every backend is split into a pure renderer, a pure differ and a thin kernel edge, so all
//! but the edge is testable without root.

pub mod iptables;
pub mod naming;
