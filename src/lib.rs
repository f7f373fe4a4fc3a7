//! svcproxy: a Kubernetes service proxy, a drop-in replacement for kube-proxy.
//!
//! Data flows one way:
//!
//! ```text
//! API server / manifest files ──▶ source ──▶ model::ChangeTracker ──▶ sync ──▶ dataplane ──▶ kernel
//! ```
//!
//! - [`model`] is pure: service ports, endpoints, the change tracker and the per-node endpoint
//!   selection where every Kubernetes traffic-policy rule is decided once.
//! - [`dataplane`] turns a snapshot into kernel state for one backend: iptables rules, or
//!   the userspace proxy's addresses and listeners.
//! - [`source`] reads Kubernetes objects (from files for now) into model changes.
//! - [`render`] is the `svcproxy render` command: files in, `iptables-restore` input out.

/// mimalloc instead of glibc malloc: rule rendering allocates millions of small strings, and
/// mimalloc keeps freed memory for reuse instead of faulting pages back in on every full sync.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod config;
pub mod config_file;
pub mod conntrack;
pub mod daemon;
pub mod dataplane;
pub mod health;
pub mod http;
pub mod metrics;
pub mod model;
pub mod render;
pub mod source;
pub mod sync;
