//! File watching with `notify`: the worker's source paths and the config
//! file, with ignore globs. Debouncing and coalescing are the supervisor's
//! job (one build at a time, one more after it); this module only says what
//! changed.
//!
//! Files are watched through their parent folder (non-recursively, filtered
//! to the one name), because editors save by writing a new file and renaming
//! it over the old one, which would silently end a watch on the old inode.
//!
//! Folders are watched one by one: this module walks each watched tree
//! itself and leaves out every folder the ignore globs cover whole
//! (`**/target/**`, `**/node_modules/**`, `**/.git/**`). Such a folder then
//! costs no inotify watch and sends no events: with `paths = ["."]`, a
//! recursive watch would take one watch for every folder of a build tree
//! and hear every file a build writes, only to drop them. A folder that
//! appears later (made, or moved in) is watched when its event arrives, by a
//! thread of this module: notify's own thread cannot add watches from
//! inside its event handler.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use crate::config::IgnoreSet;
use notify::event::ModifyKind;
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
    _inner: Arc<Mutex<RecommendedWatcher>>,
    folders: usize,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("folders", &self.folders)
            .finish_non_exhaustive()
    }
}

impl Watcher {
    /// How many folders were watched when watching started (a file counts
    /// as its folder).
    pub fn folders(&self) -> usize {
        self.folders
    }
}

struct Filter {
    root: PathBuf,
    config: PathBuf,
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
    ignore: IgnoreSet,
    /// Never watched, whatever the globs say: the daemon's own state folder
    /// (see [`watch`]).
    skip: Vec<PathBuf>,
}

impl Filter {
    /// `path` relative to the root when under it, else as it is.
    fn rel<'a>(&self, path: &'a Path) -> &'a Path {
        path.strip_prefix(&self.root).unwrap_or(path)
    }

    /// The watched folder `path` is under (the innermost one).
    fn tree_of(&self, path: &Path) -> Option<&Path> {
        self.dirs
            .iter()
            .filter(|d| path.starts_with(d))
            .max_by_key(|d| d.components().count())
            .map(PathBuf::as_path)
    }

    /// Whether `path`, under the watched folder `top`, is ignored: a glob
    /// matches it, or it is in a folder below `top` that is left out whole.
    fn ignored(&self, path: &Path, top: Option<&Path>) -> bool {
        if self.skip.iter().any(|s| path.starts_with(s)) || self.ignore.is_match(self.rel(path)) {
            return true;
        }
        let Some(top) = top else { return false };
        let mut p = path;
        while p != top && p.starts_with(top) {
            if self.ignore.prunes(self.rel(p)) {
                return true;
            }
            match p.parent() {
                Some(parent) => p = parent,
                None => break,
            }
        }
        false
    }

    fn classify(&self, path: &Path) -> Option<Change> {
        if path == self.config {
            return Some(Change::Config);
        }
        let tree = self.tree_of(path);
        if tree.is_none() && !self.files.iter().any(|f| f == path) {
            return None;
        }
        if self.ignored(path, tree) {
            return None;
        }
        Some(Change::Source(self.rel(path).to_path_buf()))
    }
}

/// Watches `dir` and every folder under it that is not left out, each
/// non-recursively; returns how many. A folder reached twice (through a
/// symbolic link) is watched once, so a link loop ends.
fn watch_tree(
    w: &mut RecommendedWatcher,
    dir: &Path,
    filter: &Filter,
) -> Result<usize, WatchError> {
    let mut seen = HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    let mut count = 0;
    while let Some(d) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&d) else {
            // Gone meanwhile (the top folder's absence is caught below).
            if d == dir {
                return Err(WatchError {
                    path: d,
                    source: notify::Error::path_not_found(),
                });
            }
            continue;
        };
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        match w.watch(&d, RecursiveMode::NonRecursive) {
            Ok(()) => count += 1,
            // Gone between the listing and the watch.
            Err(e) if d != dir && matches!(e.kind, notify::ErrorKind::PathNotFound) => continue,
            Err(e)
                if d != dir
                    && matches!(&e.kind, notify::ErrorKind::Io(io)
                        if io.kind() == std::io::ErrorKind::PermissionDenied) =>
            {
                tracing::warn!(folder = %d.display(), "not watched: permission denied");
                continue;
            }
            Err(source) => return Err(WatchError { path: d, source }),
        }
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            // Following symbolic links, as a recursive watch does.
            let is_dir = match entry.file_type() {
                Ok(t) if t.is_dir() => true,
                Ok(t) if t.is_symlink() => path.is_dir(),
                _ => false,
            };
            if is_dir
                && !filter.ignore.prunes(filter.rel(&path))
                && !filter.skip.iter().any(|s| path.starts_with(s))
            {
                stack.push(path);
            }
        }
    }
    Ok(count)
}

/// Starts watching `paths` (files or folders, absolute) and `config`,
/// sending each relevant change to `tx`. Nothing under `skip` is watched
/// (the state folder, where every deploy writes its logs: with
/// `paths = ["."]` it would start a build after every deploy).
///
/// # Errors
/// [`WatchError`] naming the path that could not be watched.
pub fn watch(
    root: &Path,
    paths: &[PathBuf],
    config: &Path,
    ignore: IgnoreSet,
    skip: &[PathBuf],
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
    let filter = Arc::new(Filter {
        root: root.to_path_buf(),
        config: config.to_path_buf(),
        files,
        dirs,
        ignore,
        skip: skip.to_vec(),
    });
    // Folders that appeared in a watched tree, for the thread that watches
    // them.
    let (appeared_tx, appeared_rx) = std::sync::mpsc::channel::<PathBuf>();
    let handler = {
        let filter = filter.clone();
        move |res: notify::Result<notify::Event>| {
            let Ok(event) = res else { return };
            if matches!(event.kind, EventKind::Access(_) | EventKind::Other) {
                return;
            }
            let appeared = matches!(
                event.kind,
                EventKind::Create(_) | EventKind::Modify(ModifyKind::Name(_))
            );
            for path in &event.paths {
                if let Some(change) = filter.classify(path) {
                    // The thread checks whether it is a folder.
                    if appeared && matches!(change, Change::Source(_)) {
                        let _ = appeared_tx.send(path.clone());
                    }
                    let _ = tx.send(change);
                }
            }
        }
    };
    let mut inner = notify::recommended_watcher(handler).map_err(|source| WatchError {
        path: root.to_path_buf(),
        source,
    })?;
    let mut parents: Vec<PathBuf> = filter
        .files
        .iter()
        .chain(std::iter::once(&config.to_path_buf()))
        .filter_map(|f| f.parent().map(Path::to_path_buf))
        .collect();
    parents.sort();
    parents.dedup();
    let mut folders = 0;
    for d in &filter.dirs {
        folders += watch_tree(&mut inner, d, &filter)?;
    }
    for p in &parents {
        if filter.tree_of(p).is_some() {
            continue;
        }
        inner
            .watch(p, RecursiveMode::NonRecursive)
            .map_err(|source| WatchError {
                path: p.clone(),
                source,
            })?;
        folders += 1;
    }
    let inner = Arc::new(Mutex::new(inner));
    spawn_follower(Arc::downgrade(&inner), filter, appeared_rx)?;
    Ok(Watcher {
        _inner: inner,
        folders,
    })
}

/// The thread that watches folders appearing in a watched tree. It ends
/// when the watcher is dropped: the handler, and with it the sending side
/// of `appeared`, goes with it.
fn spawn_follower(
    inner: Weak<Mutex<RecommendedWatcher>>,
    filter: Arc<Filter>,
    appeared: std::sync::mpsc::Receiver<PathBuf>,
) -> Result<(), WatchError> {
    let root = filter.root.clone();
    std::thread::Builder::new()
        .name("watch-folders".into())
        .spawn(move || {
            while let Ok(path) = appeared.recv() {
                if !path.is_dir() {
                    continue;
                }
                let Some(inner) = inner.upgrade() else { return };
                let Ok(mut w) = inner.lock() else { return };
                match watch_tree(&mut w, &path, &filter) {
                    Ok(_) => {}
                    // Made and removed at once (a tool's temporary folder).
                    Err(_) if !path.exists() => {}
                    Err(e) => tracing::warn!(error = %e, "a new folder is not watched"),
                }
            }
        })
        .map(|_| ())
        .map_err(|e| WatchError {
            path: root,
            source: notify::Error::io(e),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(root: &Path, ignore: &[&str]) -> Filter {
        Filter {
            root: root.to_path_buf(),
            config: root.join("etc/baton.toml"),
            files: vec![root.join("Cargo.toml")],
            dirs: vec![
                root.to_path_buf(),
                Path::new("/elsewhere/lib").to_path_buf(),
            ],
            ignore: IgnoreSet::new(ignore).expect("globs"),
            skip: vec![root.join("state")],
        }
    }

    #[test]
    fn classifies_what_is_watched_and_not_ignored() {
        let root = Path::new("/srv/app");
        let f = filter(
            root,
            &["**/target/**", "**/node_modules", "**/*.swp", "**/dist/"],
        );
        let src = |p: &str| Some(Change::Source(PathBuf::from(p)));
        assert_eq!(f.classify(&root.join("src/main.rs")), src("src/main.rs"));
        assert_eq!(
            f.classify(&root.join("etc/baton.toml")),
            Some(Change::Config)
        );
        // The folder a `P/**` glob covers, itself and what is in it.
        assert_eq!(f.classify(&root.join("target")), None);
        assert_eq!(f.classify(&root.join("target/debug/app")), None);
        assert_eq!(f.classify(&root.join("web/target/x")), None);
        // A glob naming a folder leaves out what is in it too.
        assert_eq!(f.classify(&root.join("web/node_modules")), None);
        assert_eq!(f.classify(&root.join("web/node_modules/a/b.js")), None);
        assert_eq!(f.classify(&root.join("src/.main.rs.swp")), None);
        // `P/`, as in .gitignore: the folder and all in it.
        assert_eq!(f.classify(&root.join("web/dist")), None);
        assert_eq!(f.classify(&root.join("web/dist/app.js")), None);
        assert_eq!(
            f.classify(&root.join("web/distant.js")),
            src("web/distant.js")
        );
        // The state folder, whatever the globs.
        assert_eq!(f.classify(&root.join("state/gen-0001/worker.log")), None);
        assert_eq!(f.classify(&root.join("stateful.rs")), src("stateful.rs"));
        // A tree outside the root: globs apply below it, not to its own
        // path.
        assert_eq!(
            f.classify(Path::new("/elsewhere/lib/x.rs")),
            Some(Change::Source(PathBuf::from("/elsewhere/lib/x.rs")))
        );
        assert_eq!(f.classify(Path::new("/elsewhere/lib/target/x")), None);
        assert_eq!(f.classify(Path::new("/nowhere/x.rs")), None);
    }

    #[test]
    fn a_project_inside_a_folder_named_like_an_ignored_one_is_still_watched() {
        // Only what is below the watched folder is matched against the
        // folder globs, not the folders the project itself sits in.
        let root = Path::new("/home/u/target/app");
        let f = filter(root, &["**/target/**"]);
        assert_eq!(
            f.classify(&root.join("src/main.rs")),
            Some(Change::Source(PathBuf::from("src/main.rs")))
        );
        assert_eq!(f.classify(&root.join("target/x")), None);
    }
}
