//! `svcproxy render`: the rules this node would apply for a set of manifest files.

use std::path::PathBuf;

use crate::config::{ConfigError, ProxyFlags};
use crate::dataplane::ProxyMode;
use crate::dataplane::iptables::{Renderer, Scope};
use crate::dataplane::nftables::diff::Mirror;
use crate::model::{ChangeTracker, IpFamily, NodeInfo};
use crate::source::files::{self, LoadError};
use crate::source::{Object, apply_object};

/// Why a render could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// A file or directory could not be read or parsed.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The flags are inconsistent.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// The rendered rules and the objects that were skipped.
#[derive(Clone, Debug, Default)]
pub struct RenderOutput {
    /// `iptables-restore` input, or the `nft -f` transaction.
    pub text: String,
    /// One line per skipped object: which one and why.
    pub warnings: Vec<String>,
}

/// Loads `paths` and renders the full rule set of `family` in `mode` for the node named by
/// `flags`, as a fresh node would apply it (jump rules included).
pub fn render_files(
    paths: &[PathBuf],
    flags: &ProxyFlags,
    family: IpFamily,
    mode: ProxyMode,
) -> Result<RenderOutput, RenderError> {
    let loaded = files::load_paths(paths)?;
    let mut warnings: Vec<String> = loaded.warnings.iter().map(ToString::to_string).collect();
    let node_name = flags.node_name();
    let mut tracker = ChangeTracker::new(NodeInfo {
        name: node_name.clone(),
        ..NodeInfo::default()
    });
    // Node first: endpoint selection depends on it, and its absence is not an error.
    let (nodes, others): (Vec<&Object>, Vec<&Object>) = loaded
        .objects
        .iter()
        .partition(|o| matches!(o, Object::Node(_)));
    for obj in nodes.into_iter().chain(others) {
        if let Err(e) = apply_object(&mut tracker, &node_name, obj) {
            warnings.push(e.to_string());
        }
    }
    let (snapshot, _) = tracker.drain();
    let cfg = flags.render_config(family, &snapshot.node, &[])?;
    if mode == ProxyMode::Nftables {
        let mut text = String::new();
        Mirror::render(&cfg, &snapshot).write_full(&mut text);
        return Ok(RenderOutput { text, warnings });
    }
    let mut renderer = Renderer::new(cfg);
    let rendered = renderer.render(
        &snapshot,
        Scope::Full {
            existing: &Default::default(),
        },
    );
    Ok(RenderOutput {
        text: rendered.text,
        warnings,
    })
}
