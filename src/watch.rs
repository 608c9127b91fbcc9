//! File watching with `notify`: the worker's source paths and the config
//! file, with ignore globs. Debouncing and coalescing are the supervisor's
//! job (one build at a time, one more after it); this module only says what
//! changed.
//!
//! Files are watched through their parent folder (non-recursively, filtered
//! to the one name), because editors save by writing a new file and renaming
//! it over the old one, which would silently end a watch on the old inode.

use std::path::{Path, PathBuf};

use crate::config::IgnoreSet;
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A watched source file (path relative to root when under it).
    Source(PathBuf),
    /// The config file.
    Config,
}

/// Why watching could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot watch {}: {source}", path.display())]
pub struct WatchError {
    path: PathBuf,
    #[source]
    source: notify::Error,
}

/// A live set of watches; dropping it stops them.
pub struct Watcher {
    _inner: RecommendedWatcher,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Watcher")
    }
}

struct Filter {
    root: PathBuf,
    config: PathBuf,
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
    ignore: IgnoreSet,
}

impl Filter {
    fn classify(&self, path: &Path) -> Option<Change> {
        if path == self.config {
            return Some(Change::Config);
        }
        let watched =
            self.files.iter().any(|f| f == path) || self.dirs.iter().any(|d| path.starts_with(d));
        if !watched {
            return None;
        }
        let rel = path.strip_prefix(&self.root).unwrap_or(path);
        if self.ignore.is_match(rel) || self.ignore.is_match(path) {
            return None;
        }
        Some(Change::Source(rel.to_path_buf()))
    }
}

/// Starts watching `paths` (files or folders, absolute) and `config`,
/// sending each relevant change to `tx`.
///
/// # Errors
/// [`WatchError`] naming the path that could not be watched.
pub fn watch(
    root: &Path,
    paths: &[PathBuf],
    config: &Path,
    ignore: IgnoreSet,
    tx: mpsc::UnboundedSender<Change>,
) -> Result<Watcher, WatchError> {
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    for p in paths {
        if p.is_dir() {
            dirs.push(p.clone());
        } else {
            files.push(p.clone());
        }
    }
    let filter = Filter {
        root: root.to_path_buf(),
        config: config.to_path_buf(),
        files: files.clone(),
        dirs: dirs.clone(),
        ignore,
    };
    let handler = move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        if matches!(event.kind, EventKind::Access(_) | EventKind::Other) {
            return;
        }
        for path in &event.paths {
            if let Some(change) = filter.classify(path) {
                let _ = tx.send(change);
            }
        }
    };
    let mut inner = notify::recommended_watcher(handler).map_err(|source| WatchError {
        path: root.to_path_buf(),
        source,
    })?;
    let mut parents: Vec<PathBuf> = files
        .iter()
        .chain(std::iter::once(&config.to_path_buf()))
        .filter_map(|f| f.parent().map(Path::to_path_buf))
        .collect();
    parents.sort();
    parents.dedup();
    for d in &dirs {
        inner
            .watch(d, RecursiveMode::Recursive)
            .map_err(|source| WatchError {
                path: d.clone(),
                source,
            })?;
    }
    for p in &parents {
        if dirs.iter().any(|d| p.starts_with(d)) {
            continue;
        }
        inner
            .watch(p, RecursiveMode::NonRecursive)
            .map_err(|source| WatchError {
                path: p.clone(),
                source,
            })?;
    }
    Ok(Watcher { _inner: inner })
}
