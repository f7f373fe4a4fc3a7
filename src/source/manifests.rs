//! `--manifests-dir`: Services, EndpointSlices and Nodes from YAML/JSON files in a directory,
//! watched so that creating, editing, deleting or renaming a file applies like API events.
//!
//! For standalone nodes, demos and tests. Each file is reloaded on its own when it changes;
//! a file that stops parsing keeps its last good objects in force (and the error is logged
//! with the file name), so a half-saved edit never takes services down.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::event::ModifyKind;
use notify::{EventKind, RecursiveMode, Watcher};

use super::files::{self, Object};
use super::{ObjectRef, apply_object, delete_ref};
use crate::model::ChangeTracker;
use crate::sync::SyncTrigger;

/// How long to wait for more file events before reloading (editors write in bursts).
const DEBOUNCE: Duration = Duration::from_millis(50);

/// The manifests directory cannot be watched.
#[derive(Debug, thiserror::Error)]
pub enum ManifestsError {
    /// The directory is missing or unreadable.
    #[error("--manifests-dir {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// inotify could not be set up.
    #[error("cannot watch {path}: {source}")]
    Watch {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: notify::Error,
    },
}

/// Identity of an object across files.
type Key = (&'static str, String, String);

fn key(obj: &Object) -> Key {
    let (kind, meta) = match obj {
        Object::Service(s) => ("Service", &s.metadata),
        Object::EndpointSlice(s) => ("EndpointSlice", &s.metadata),
        Object::Node(n) => ("Node", &n.metadata),
    };
    (
        kind,
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// The directory's objects (identities only: whole objects are parsed, applied and dropped;
/// keeping them would cost ~6 KB per service), per file, and how they reach the tracker.
struct DirState {
    dir: PathBuf,
    node_name: String,
    tracker: Arc<Mutex<ChangeTracker>>,
    trigger: SyncTrigger,
    files: HashMap<PathBuf, BTreeMap<Key, Option<ObjectRef>>>,
}

impl DirState {
    /// The file whose definition of `key` is in force: the lexically last one defining it
    /// (duplicates are a user error; this keeps the outcome deterministic).
    fn owner(&self, key: &Key) -> Option<&PathBuf> {
        self.files
            .iter()
            .filter(|(_, objs)| objs.contains_key(key))
            .map(|(p, _)| p)
            .max()
    }

    /// Reads one object of `file` again (when a duplicate's owner changes, which is rare).
    fn read_object(file: &Path, k: &Key) -> Option<Object> {
        files::load_file(file)
            .ok()?
            .objects
            .into_iter()
            .find(|o| key(o) == *k)
    }

    /// Replaces the objects of `path` with what the file holds now; returns whether the
    /// tracker changed.
    fn reload(&mut self, path: &Path) -> bool {
        let new: BTreeMap<Key, Object> = if path.is_file() && files::is_manifest_path(path) {
            match files::load_file(path) {
                Ok(loaded) => {
                    for w in &loaded.warnings {
                        tracing::warn!(file = %w.path.display(), object = %w.object, reason = %w.reason, "skipping object");
                    }
                    loaded.objects.into_iter().map(|o| (key(&o), o)).collect()
                }
                Err(e) => {
                    tracing::error!(error = %e, "keeping the last good objects of this file");
                    return false;
                }
            }
        } else {
            BTreeMap::new()
        };
        let old = self.files.remove(path).unwrap_or_default();
        if !new.is_empty() {
            let refs = new
                .iter()
                .map(|(k, o)| (k.clone(), o.object_ref()))
                .collect();
            self.files.insert(path.to_path_buf(), refs);
        }
        let mut keys: Vec<&Key> = old.keys().chain(new.keys()).collect();
        keys.sort();
        keys.dedup();
        let mut tracker = self.tracker.lock().unwrap_or_else(|p| p.into_inner());
        let mut changed = false;
        for k in keys {
            let owner = self.owner(k).cloned();
            let obj = match &owner {
                Some(o) if o.as_path() == path => new.get(k).cloned(),
                Some(o) if new.contains_key(k) => {
                    tracing::warn!(object = ?k, used = %o.display(), ignored = %path.display(), "object defined in two files");
                    None
                }
                // This file defined it and no longer does (or lost ownership): the owner's
                // version applies again.
                Some(o) if o.as_path() < path => Self::read_object(o, k),
                Some(_) => None,
                None => {
                    if let Some(Some(r)) = old.get(k) {
                        changed |= delete_ref(&mut tracker, &self.node_name, r);
                    }
                    None
                }
            };
            if let Some(obj) = obj {
                match apply_object(&mut tracker, &self.node_name, &obj) {
                    Ok(c) => changed |= c,
                    Err(e) => {
                        tracing::warn!(file = %path.display(), error = %e, "skipping object that cannot be proxied")
                    }
                }
            }
        }
        tracing::debug!(file = %path.display(), objects = new.len(), changed, "reloaded manifest file");
        changed
    }

    /// Reloads every file (start-up, and when a directory itself changed).
    fn rescan(&mut self) -> bool {
        let mut paths: Vec<PathBuf> = files::manifest_files(&self.dir).unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot list the manifests directory");
            Vec::new()
        });
        paths.extend(self.files.keys().cloned());
        paths.sort();
        paths.dedup();
        let mut changed = false;
        for p in paths {
            changed |= self.reload(&p);
        }
        changed
    }

    fn run(mut self, events: Receiver<notify::Result<notify::Event>>) {
        loop {
            let Ok(first) = events.recv() else { return };
            let mut batch = vec![first];
            loop {
                match events.recv_timeout(DEBOUNCE) {
                    Ok(e) => batch.push(e),
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            let mut paths: Vec<PathBuf> = Vec::new();
            let mut rescan = false;
            for ev in batch {
                match ev {
                    // Our own reads produce access events: never react to those.
                    Ok(ev) if matches!(ev.kind, EventKind::Access(_)) => {}
                    Ok(ev) => {
                        let dir_changed =
                            matches!(
                                ev.kind,
                                EventKind::Create(_)
                                    | EventKind::Remove(_)
                                    | EventKind::Modify(ModifyKind::Name(_))
                            ) && ev.paths.iter().any(|p| p.is_dir() && *p != self.dir);
                        rescan |= ev.need_rescan()
                            || dir_changed
                            || matches!(ev.kind, EventKind::Other | EventKind::Any);
                        paths.extend(ev.paths.into_iter().filter(|p| *p != self.dir));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "file watch error; rescanning the directory");
                        rescan = true;
                    }
                }
            }
            paths.sort();
            paths.dedup();
            if paths.is_empty() && !rescan {
                continue;
            }
            tracing::debug!(?paths, rescan, "manifest files changed");
            let changed = if rescan {
                self.rescan()
            } else {
                paths.iter().fold(false, |acc, p| self.reload(p) | acc)
            };
            if changed {
                self.trigger.kick();
            }
        }
    }
}

/// Keeps the watch alive; dropping it stops watching.
pub struct ManifestsWatch {
    _watcher: notify::RecommendedWatcher,
}

/// Loads `dir` into `tracker`, marks the initial state ready, and watches for changes on a
/// background thread.
pub fn watch(
    dir: &Path,
    node_name: &str,
    tracker: Arc<Mutex<ChangeTracker>>,
    trigger: SyncTrigger,
) -> Result<ManifestsWatch, ManifestsError> {
    let meta = std::fs::metadata(dir).map_err(|source| ManifestsError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(ManifestsError::Dir {
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        });
    }
    // Watch before the first scan so no change between the two is missed.
    let (tx, rx) = channel();
    let mut watcher = notify::recommended_watcher(tx).map_err(|source| ManifestsError::Watch {
        path: dir.to_path_buf(),
        source,
    })?;
    watcher
        .watch(dir, RecursiveMode::Recursive)
        .map_err(|source| ManifestsError::Watch {
            path: dir.to_path_buf(),
            source,
        })?;
    let mut state = DirState {
        dir: dir.to_path_buf(),
        node_name: node_name.to_string(),
        tracker,
        trigger: trigger.clone(),
        files: HashMap::new(),
    };
    state.rescan();
    trigger.kick();
    trigger.set_ready();
    std::thread::Builder::new()
        .name("manifests-watch".into())
        .spawn(move || state.run(rx))
        .map_err(|source| ManifestsError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
    Ok(ManifestsWatch { _watcher: watcher })
}
