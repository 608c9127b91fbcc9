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
//! inside its event handler. That thread also re-walks a watched folder
//! replaced whole (seen through its parent's watch), and every tree when
//! the kernel's event queue overflowed.
//!
//! Each folder is watched once, under its own path (notify keeps one path
//! per inotify watch): links are followed only out of the watched trees,
//! and a folder reached again through a link is left to the path it is
//! watched under.
//!
//! Each change says how the path was seen ([`Change`]): made
//! ([`Change::Appeared`]), a folder made or moved in
//! ([`Change::NewFolder`], no change by itself: it counts by the files it
//! brings), or changed otherwise. With that the supervisor tells files that
//! came and went (a tool's temporary files) from real changes. A folder
//! removed is no change of its own: it is empty by then, and its files'
//! removals were changes of their own.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use crate::config::IgnoreSet;
use notify::event::{CreateKind, ModifyKind, RemoveKind, RenameMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A watched source file changed, went away or was moved in (path
    /// relative to root when under it), or a folder was moved away.
    Source(PathBuf),
    /// A file made (it did not exist before), or what a new folder, once
    /// watched, brings: one file is named itself, more the folder. Gone
    /// again when the deploy is due (a tool's temporary file), it changed
    /// nothing.
    Appeared(PathBuf),
    /// A folder made or moved in: no change by itself (its files are), but
    /// what is removed or moved away below it afterwards came and went.
    NewFolder(PathBuf),
    /// The config file.
    Config,
    /// The kernel's event queue overflowed: changes were lost, so anything
    /// may have changed. Every tree has been walked again.
    Lost,
}

/// Why watching could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot watch {}: {}", path.display(), explain(source))]
pub struct WatchError {
    path: PathBuf,
    source: notify::Error,
}

/// A watch error as an operator can act on it: the kernel limit that was
/// reached, its value and how to raise it.
fn explain(e: &notify::Error) -> String {
    let sysctl = |name: &str| {
        std::fs::read_to_string(format!("/proc/sys/fs/inotify/{name}"))
            .map_or_else(|_| "?".into(), |v| v.trim().to_string())
    };
    match &e.kind {
        notify::ErrorKind::MaxFilesWatch => format!(
            "the inotify watch limit is reached (fs.inotify.max_user_watches = {}, for all of this user's processes); raise it (`sysctl -w fs.inotify.max_user_watches=524288`, and in /etc/sysctl.d/ to keep it) or leave more folders out (watch.ignore)",
            sysctl("max_user_watches")
        ),
        notify::ErrorKind::Io(io) if io.raw_os_error() == Some(nix::libc::EMFILE) => format!(
            "{io}: the limit of inotify instances (fs.inotify.max_user_instances = {}, for all of this user's processes) or of open files (ulimit -n) is reached",
            sysctl("max_user_instances")
        ),
        _ => e.to_string(),
    }
}

/// A live set of watches; dropping it stops them.
pub struct Watcher {
    _inner: Arc<Mutex<State>>,
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

/// A folder's identity: device and inode.
type Key = (u64, u64);

fn key_of(meta: &std::fs::Metadata) -> Key {
    (meta.dev(), meta.ino())
}

/// The notify watcher and the folders it watches, each once, by path and
/// by identity. notify keeps one path per inotify watch: watching a folder
/// again through a symbolic link would rename its watch (its events would
/// then name the link), and removing the link would end it.
struct State {
    w: RecommendedWatcher,
    by_key: HashMap<Key, PathBuf>,
    /// Each watched folder's identity, and whether it was reached through
    /// a link.
    by_path: BTreeMap<PathBuf, (Key, bool)>,
}

impl State {
    fn insert(&mut self, path: PathBuf, key: Key, linked: bool) {
        if let Some(old) = self.by_key.insert(key, path.clone()) {
            self.by_path.remove(&old);
        }
        if let Some((old, _)) = self.by_path.insert(path, (key, linked)) {
            self.by_key.remove(&old);
        }
    }

    /// The watched folders `path` and under it.
    fn at_and_under(&self, path: &Path) -> Vec<PathBuf> {
        self.by_path
            .range(path.to_path_buf()..)
            .take_while(|(p, _)| p.starts_with(path))
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Forgets `path` and every folder under it (gone or moved away:
    /// notify has dropped their watches); true when `path` was a link
    /// that was followed (what it led to may still be reached through
    /// another link).
    fn forget(&mut self, path: &Path) -> bool {
        let linked = |p: &Path| self.by_path.get(p).is_some_and(|&(_, l)| l);
        let link = linked(path) && !path.parent().is_some_and(linked);
        for p in self.at_and_under(path) {
            if let Some((k, _)) = self.by_path.remove(&p) {
                self.by_key.remove(&k);
            }
        }
        link
    }

    /// Watches the folder `d` (identity `key`) unless it is watched
    /// already, under this path or under another that still leads to it
    /// (a link, a bind mount).
    fn watch(&mut self, d: &Path, key: Key, linked: bool) -> Result<Watched, notify::Error> {
        // The path leads to another folder than the one watched under it
        // (a link renamed over another: no removal was seen): what it led
        // to, and every folder below, is no longer watched here.
        if self.by_path.get(d).is_some_and(|&(old, _)| old != key) {
            for p in self.at_and_under(d) {
                let _ = self.w.unwatch(&p);
            }
            self.forget(d);
        }
        match self.by_key.get(&key) {
            Some(p) if p == d => return Ok(Watched::Already),
            Some(p) if std::fs::metadata(p).is_ok_and(|m| key_of(&m) == key) => {
                return Ok(Watched::Elsewhere);
            }
            // Moved here, and its move not handled yet: notify keeps one
            // watch for both paths, and would drop it with the old one
            // (`insert` then drops the old path from the maps).
            Some(p) => {
                let _ = self.w.unwatch(p);
            }
            None => {}
        }
        self.w.watch(d, RecursiveMode::NonRecursive)?;
        self.insert(d.to_path_buf(), key, linked);
        Ok(Watched::New)
    }
}

/// What [`State::watch`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watched {
    /// Watched from now on.
    New,
    /// Watched before, under this path.
    Already,
    /// Watched under another path that leads to the same folder.
    Elsewhere,
}

struct Filter {
    root: PathBuf,
    /// The config file, as named and with every link resolved (events
    /// name it by the path its folder is watched under), and the links on
    /// the way to it and to the watched paths (see [`watch`]).
    config: Vec<PathBuf>,
    /// Files watched by name, as named and with links resolved.
    files: Vec<PathBuf>,
    /// Other spellings of those files, through a folder watched under
    /// another path (see [`watch`]), and the file each stands for (the
    /// config is known by its folder's identity, `config_at`).
    aliases: Vec<(PathBuf, PathBuf)>,
    /// The config's folder (identity) and file name: its events may come
    /// under any spelling of that folder, a watched tree's too (`paths =
    /// ["etclink"]` with `etclink -> etc`).
    config_at: Option<(Key, std::ffi::OsString)>,
    /// The folders that hold them and the config file (each watched by
    /// itself, and through its own parent, see [`watch`]).
    file_folders: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
    /// `dirs` with every link resolved, to tell a link that leads inside
    /// a watched tree.
    real_dirs: Vec<PathBuf>,
    ignore: IgnoreSet,
    /// Never watched, whatever the globs say: the daemon's own state folder
    /// (see [`watch`]), by path and by identity (a path spelled through a
    /// link).
    skip: Vec<PathBuf>,
    skip_keys: HashSet<Key>,
}

impl Filter {
    /// `path` as the globs see it: relative to the root when under it,
    /// else to its watched tree `top`, else (a file watched by name) its
    /// name.
    fn rel<'a>(&self, path: &'a Path, top: Option<&Path>) -> &'a Path {
        if let Ok(r) = path.strip_prefix(&self.root) {
            return r;
        }
        if let Some(r) = top.and_then(|t| path.strip_prefix(t).ok()) {
            return r;
        }
        path.file_name().map_or(path, Path::new)
    }

    /// The watched folder `path` is under (the innermost one).
    fn tree_of(&self, path: &Path) -> Option<&Path> {
        self.dirs
            .iter()
            .filter(|d| path.starts_with(d))
            .max_by_key(|d| d.components().count())
            .map(PathBuf::as_path)
    }

    /// Whether the folder `dir`, under the watched folder `top`, is left
    /// out whole.
    fn prunes(&self, dir: &Path, top: Option<&Path>) -> bool {
        self.skip.iter().any(|s| dir.starts_with(s)) || self.ignore.prunes(self.rel(dir, top))
    }

    /// Whether `path`, under the watched folder `top`, is ignored: a glob
    /// matches it, or it is in a folder below `top` that is left out whole,
    /// or it is such a folder itself (`is_dir`: a glob like `P/` names
    /// folders only, so a file called P is not left out).
    fn ignored(&self, path: &Path, top: Option<&Path>, is_dir: bool) -> bool {
        if self.skip.iter().any(|s| path.starts_with(s))
            || self.ignore.is_match(self.rel(path, top))
        {
            return true;
        }
        let Some(top) = top else { return false };
        let mut p = if is_dir { Some(path) } else { path.parent() };
        while let Some(d) = p {
            if d == top || !d.starts_with(top) {
                break;
            }
            if self.ignore.prunes(self.rel(d, Some(top))) {
                return true;
            }
            p = d.parent();
        }
        false
    }

    fn classify(&self, path: &Path, is_dir: bool) -> Option<Change> {
        if self.config.iter().any(|c| c == path) || self.is_config(path) {
            return Some(Change::Config);
        }
        let path = self
            .aliases
            .iter()
            .find(|(a, _)| a == path)
            .map_or(path, |(_, f)| f.as_path());
        let tree = self.tree_of(path);
        if tree.is_none() && !self.files.iter().any(|f| f == path) {
            return None;
        }
        if self.ignored(path, tree, is_dir) {
            return None;
        }
        Some(Change::Source(self.shown(path)))
    }

    /// Whether `path` is the config file under another spelling of its
    /// folder (looked at only for a file of the config's name).
    fn is_config(&self, path: &Path) -> bool {
        let Some((key, name)) = &self.config_at else {
            return false;
        };
        path.file_name() == Some(name.as_os_str())
            && path
                .parent()
                .and_then(|d| std::fs::metadata(d).ok())
                .is_some_and(|m| key_of(&m) == *key)
    }

    /// How a change is reported: relative to the root when under it.
    fn shown(&self, path: &Path) -> PathBuf {
        path.strip_prefix(&self.root).unwrap_or(path).to_path_buf()
    }

    /// Whether `path` (a link, or a folder below one) leads to a folder in
    /// a watched tree: that folder is watched under its own path, not the
    /// link's.
    fn leads_inside(&self, path: &Path) -> bool {
        std::fs::canonicalize(path)
            .is_ok_and(|real| self.real_dirs.iter().any(|d| real.starts_with(d)))
    }

    /// Whether `dir` is reached through a link below its watched tree.
    fn through_link(&self, dir: &Path) -> bool {
        let Some(top) = self.tree_of(dir) else {
            return false;
        };
        dir.ancestors()
            .take_while(|p| *p != top && p.starts_with(top))
            .any(|p| {
                p.symlink_metadata()
                    .is_ok_and(|m| m.file_type().is_symlink())
            })
    }
}

/// Watches `dir` and every folder under it that is not left out, each
/// non-recursively. With `files`, also tells which files it holds that are
/// not ignored (the walk of a new folder: what it changes). A folder that
/// is watched already under another path (reached through a link) is left
/// to that path, so a link loop ends; a link that leads inside a watched
/// tree is not followed.
fn watch_tree(
    st: &mut State,
    dir: &Path,
    filter: &Filter,
    mut files: Option<&mut Found>,
) -> Result<(), WatchError> {
    let top = filter.tree_of(dir);
    let linked = filter.through_link(dir);
    if linked && filter.leads_inside(dir) {
        return Ok(());
    }
    let mut seen = HashSet::new();
    let mut stack = vec![(dir.to_path_buf(), linked)];
    while let Some((d, linked)) = stack.pop() {
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
        let key = key_of(&meta);
        if !seen.insert(key) || filter.skip_keys.contains(&key) {
            continue;
        }
        match st.watch(&d, key, linked) {
            // Already: still walked, folders may have appeared under it.
            Ok(Watched::New | Watched::Already) => {}
            Ok(Watched::Elsewhere) => continue,
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
            // Following symbolic links that lead out of the watched trees,
            // as a recursive watch does; below such a link, not into a
            // watched tree either (it is watched under its own path).
            let via = match entry.file_type() {
                Ok(t) if t.is_dir() => Some(linked),
                Ok(t) if t.is_symlink() && path.is_dir() => Some(true),
                _ => None,
            };
            if let Some(via) = via
                && !filter.prunes(&path, top)
                && !(via && filter.leads_inside(&path))
            {
                stack.push((path, via));
            } else if via.is_none()
                && let Some(found) = files.as_deref_mut()
                && !matches!(found, Found::Many)
                && filter.classify(&path, false).is_some()
            {
                *found = match found {
                    Found::None => Found::One(path),
                    _ => Found::Many,
                };
            }
        }
    }
    Ok(())
}

/// The files not ignored that a walk found.
enum Found {
    None,
    One(PathBuf),
    Many,
}

/// What an event did to its paths.
#[derive(Clone, Copy)]
enum How {
    /// Made: did not exist before.
    Made,
    /// Moved in: it may replace one that did.
    MovedIn,
    Removed,
    MovedAway,
    Modified,
}

/// What the handler asks of the thread that keeps the watches up to date.
enum Job {
    /// A folder may have appeared (made, or moved in): watch it and what
    /// is under it.
    Walk(PathBuf),
    /// Something was removed or moved away: if it was a watched folder,
    /// notify has dropped its watches and those under it.
    Gone(PathBuf),
    /// Events were lost: walk every tree again.
    Rescan,
    /// A folder that holds a watched file or the config file was made or
    /// moved in (the one before was replaced whole): watch it again.
    Refolder(PathBuf),
}

/// How often folders that could not be watched (the inotify watch limit
/// reached) are tried again.
const RETRY_UNWATCHED: std::time::Duration = std::time::Duration::from_secs(2);
/// How often a warning says that some still are not.
const WARN_UNWATCHED: std::time::Duration = std::time::Duration::from_secs(60);

/// Every link met on the way to `path` (absolute), and on the way to each
/// link's target in turn (`app -> current`, `current -> releases/r5`), up
/// to 40 links, as the kernel resolves them.
fn links_on_the_way(path: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = Vec::new();
    let mut todo = vec![path.to_path_buf()];
    while let Some(p) = todo.pop() {
        let parts: Vec<_> = p.components().collect();
        let mut prefix = PathBuf::new();
        for (i, part) in parts.iter().enumerate() {
            prefix.push(part);
            if matches!(part, std::path::Component::ParentDir) {
                // What `..` means depends on the links before it.
                prefix = std::fs::canonicalize(&prefix).unwrap_or(prefix);
                continue;
            }
            let Ok(target) = std::fs::read_link(&prefix) else {
                continue;
            };
            if found.len() >= 40 || found.contains(&prefix) {
                break;
            }
            found.push(prefix.clone());
            // The rest of the path, from the link's target on.
            let mut next = prefix.parent().unwrap_or(Path::new("/")).join(target);
            next.extend(&parts[i + 1..]);
            todo.push(next);
            break;
        }
    }
    found
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
    // A file as named, and with every link resolved: its events name it
    // by the path its folder is watched under, which may be either.
    let spellings = |f: &Path| {
        let mut v = vec![f.to_path_buf()];
        v.extend(std::fs::canonicalize(f).ok().filter(|r| r != f));
        v
    };
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    for p in paths {
        if p.is_dir() {
            dirs.push(p.clone());
        } else {
            files.extend(spellings(p));
        }
    }
    let real_dirs = dirs
        .iter()
        .filter_map(|d| std::fs::canonicalize(d).ok())
        .collect();
    let mut skip_all = skip.to_vec();
    skip_all.extend(skip.iter().filter_map(|s| std::fs::canonicalize(s).ok()));
    skip_all.dedup();
    let skip_keys = skip
        .iter()
        .filter_map(|s| std::fs::metadata(s).ok())
        .map(|m| key_of(&m))
        .collect();
    // Links on the way to the config file or to a watched path (a
    // release's `current`, `/srv/app -> releases/r5`): switching one
    // changes what every path under it means. It is seen in the link's own
    // folder and taken as a config change, whose reload watches every path
    // again, resolved anew, and redeploys.
    let mut links: Vec<PathBuf> = std::iter::once(config)
        .chain(paths.iter().map(PathBuf::as_path))
        .flat_map(links_on_the_way)
        .collect();
    links.sort();
    links.dedup();
    let config_named = spellings(config);
    let mut config_spellings = config_named.clone();
    config_spellings.extend(links.iter().cloned());
    // Where each link is seen; not required (a folder on the way may be
    // one batond can pass through but not read, mode 711).
    let mut link_folders: Vec<PathBuf> = links
        .iter()
        .filter_map(|l| l.parent().map(Path::to_path_buf))
        .collect();
    link_folders.sort();
    link_folders.dedup();
    // Files are watched through their folder, and so is each watched
    // folder but the root, and each of those file folders: a folder
    // replaced whole (moved away and another moved in, or removed and made
    // again) is then seen and watched again.
    let mut parents: Vec<PathBuf> = files
        .iter()
        .chain(&config_named)
        .filter_map(|f| f.parent().map(Path::to_path_buf))
        .collect();
    parents.sort();
    parents.dedup();
    // A folder reached by two of those paths (the config's, through a
    // release link, and a watched file's, resolved) is watched under the
    // first only: its files' events then name them by that spelling,
    // which must be known too.
    let folder_keys: Vec<(&PathBuf, Key)> = parents
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok().map(|m| (p, key_of(&m))))
        .collect();
    let mut aliases: Vec<(PathBuf, PathBuf)> = Vec::new();
    for f in &files {
        let (Some(dir), Some(name)) = (f.parent(), f.file_name()) else {
            continue;
        };
        let Ok(key) = std::fs::metadata(dir).map(|m| key_of(&m)) else {
            continue;
        };
        for (p, _) in folder_keys
            .iter()
            .filter(|(p, k)| *k == key && p.as_path() != dir)
        {
            let alias = p.join(name);
            if !files.contains(&alias) && !aliases.iter().any(|(a, _)| *a == alias) {
                aliases.push((alias, f.clone()));
            }
        }
    }
    let config_at = config
        .parent()
        .zip(config.file_name())
        .and_then(|(dir, name)| {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            std::fs::metadata(dir)
                .ok()
                .map(|m| (key_of(&m), name.to_os_string()))
        });
    let filter = Arc::new(Filter {
        root: root.to_path_buf(),
        config: config_spellings,
        files,
        aliases,
        config_at,
        file_folders: parents.clone(),
        dirs,
        real_dirs,
        ignore,
        skip: skip_all,
        skip_keys,
    });
    let (jobs_tx, jobs_rx) = std::sync::mpsc::channel::<Job>();
    let handler = {
        let filter = filter.clone();
        let tx = tx.clone();
        move |res: notify::Result<notify::Event>| {
            let Ok(event) = res else { return };
            if event.need_rescan() {
                let _ = jobs_tx.send(Job::Rescan);
                return;
            }
            let how = match event.kind {
                // A rename is also its From and To events.
                EventKind::Access(_)
                | EventKind::Other
                | EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => return,
                EventKind::Create(_) => How::Made,
                EventKind::Modify(ModifyKind::Name(RenameMode::To)) => How::MovedIn,
                EventKind::Remove(_) => How::Removed,
                EventKind::Modify(ModifyKind::Name(RenameMode::From)) => How::MovedAway,
                _ => How::Modified,
            };
            for path in &event.paths {
                if matches!(how, How::Made | How::MovedIn) && filter.file_folders.contains(path) {
                    let _ = jobs_tx.send(Job::Refolder(path.clone()));
                }
                // (whether a folder, whether that is known)
                let (is_dir, known) = match event.kind {
                    EventKind::Create(CreateKind::Folder)
                    | EventKind::Remove(RemoveKind::Folder) => (true, true),
                    EventKind::Create(CreateKind::File) | EventKind::Remove(RemoveKind::File) => {
                        (false, true)
                    }
                    _ => std::fs::metadata(path).map_or((true, false), |m| (m.is_dir(), true)),
                };
                // A path moved in, as it is now itself (a link not
                // followed): gone again, or whether a real folder.
                let moved_in = matches!(how, How::MovedIn)
                    .then(|| std::fs::symlink_metadata(path).ok().map(|m| m.is_dir()));
                // Moved in and already gone again: what went says what it
                // was (a file's removal is a change, a folder's is not, and
                // a folder's files were never watched).
                if moved_in == Some(None) {
                    continue;
                }
                // Gone (moved away), so not known: a folder if that is
                // a change, else a file if that is one. A file named
                // like a folder-only glob (`dist/`) moved out of the
                // tree is then a change; a folder that glob leaves out,
                // moved out, is one too (a build too many, not one
                // missed).
                let (change, is_dir) = match filter.classify(path, is_dir) {
                    Some(c) => (c, is_dir),
                    None if !known => match filter.classify(path, false) {
                        Some(c) => (c, false),
                        None => continue,
                    },
                    None => continue,
                };
                let Change::Source(shown) = change else {
                    let _ = tx.send(change);
                    continue;
                };
                match how {
                    How::Made | How::MovedIn => {
                        let _ = jobs_tx.send(Job::Walk(path.clone()));
                    }
                    How::Removed | How::MovedAway => {
                        let _ = jobs_tx.send(Job::Gone(path.clone()));
                    }
                    How::Modified => {}
                }
                // A folder made or moved in is a change once walked, if
                // it brings files (see `spawn_follower`); a link moved
                // in is a change itself (it may now lead elsewhere; one
                // made is a file to inotify). A folder removed is
                // empty: its files' removals were changes of their own,
                // and an empty folder's coming and going changes
                // nothing.
                let change = match how {
                    How::Made if is_dir => Change::NewFolder(shown),
                    How::MovedIn if is_dir && moved_in == Some(Some(true)) => {
                        Change::NewFolder(shown)
                    }
                    How::Removed if is_dir => continue,
                    How::Made => Change::Appeared(shown),
                    _ => Change::Source(shown),
                };
                let _ = tx.send(change);
            }
        }
    };
    let inner = notify::recommended_watcher(handler).map_err(|source| WatchError {
        path: root.to_path_buf(),
        source,
    })?;
    let mut st = State {
        w: inner,
        by_key: HashMap::new(),
        by_path: BTreeMap::new(),
    };
    for d in &filter.dirs {
        watch_tree(&mut st, d, &filter, None)?;
    }
    let mut tops: Vec<PathBuf> = filter
        .dirs
        .iter()
        .filter(|d| *d != root)
        .chain(&parents)
        .filter_map(|d| d.parent().map(Path::to_path_buf))
        .collect();
    tops.sort();
    tops.dedup();
    for p in &parents {
        let meta = std::fs::metadata(p).map_err(|e| WatchError {
            path: p.clone(),
            source: notify::Error::io(e),
        })?;
        st.watch(p, key_of(&meta), false)
            .map_err(|source| WatchError {
                path: p.clone(),
                source,
            })?;
    }
    // Not required (a folder on the way may be one batond can pass through
    // but not read, mode 711); one the watch limit kept out is tried again
    // with the new folders.
    let mut unwatched = BTreeMap::new();
    let extra = link_folders
        .iter()
        .filter(|p| !parents.contains(p))
        .map(|p| {
            (
                p,
                "not watched: a switch of the link in it is not seen until it is",
            )
        })
        .chain(tops.iter().map(|p| {
            (
                p,
                "not watched: a watched folder replaced whole is not seen until it is",
            )
        }));
    for (p, what) in extra {
        let watched = std::fs::metadata(p)
            .map_err(notify::Error::io)
            .and_then(|m| st.watch(p, key_of(&m), false));
        if let Err(e) = watched {
            if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) {
                unwatched.insert(p.clone(), Unwatched::Parent);
            }
            tracing::warn!(error = %WatchError { path: p.clone(), source: e }, "{what}");
        }
    }
    let folders = st.by_key.len();
    let inner = Arc::new(Mutex::new(st));
    spawn_follower(Arc::downgrade(&inner), filter, jobs_rx, tx, unwatched)?;
    Ok(Watcher {
        _inner: inner,
        folders,
    })
}

/// The thread that keeps the watches up to date as folders come and go in
/// the watched trees: notify's own thread cannot add watches from inside
/// its event handler. It ends when the watcher is dropped: the handler, and
/// with it the sending side of `jobs`, goes with it.
fn spawn_follower(
    inner: Weak<Mutex<State>>,
    filter: Arc<Filter>,
    jobs: std::sync::mpsc::Receiver<Job>,
    tx: mpsc::UnboundedSender<Change>,
    mut unwatched: BTreeMap<PathBuf, Unwatched>,
) -> Result<(), WatchError> {
    let root = filter.root.clone();
    std::thread::Builder::new()
        .name("watch-folders".into())
        .spawn(move || {
            // Folders that could not be watched (the inotify watch limit
            // reached) are tried again every `RETRY_UNWATCHED`; and when
            // that was last said.
            let mut warned = std::time::Instant::now();
            loop {
                let job = if unwatched.is_empty() {
                    jobs.recv().ok()
                } else {
                    match jobs.recv_timeout(RETRY_UNWATCHED) {
                        Ok(job) => Some(job),
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                };
                let Some(inner) = inner.upgrade() else { return };
                let Ok(mut st) = inner.lock() else { return };
                let Some(job) = job else {
                    retry_unwatched(&mut st, &filter, &mut unwatched, &tx);
                    if unwatched.is_empty() {
                        tracing::info!("every folder is watched now");
                    } else if warned.elapsed() >= WARN_UNWATCHED {
                        warned = std::time::Instant::now();
                        tracing::warn!(folders = unwatched.len(), "folders still not watched (changes in them are not seen); trying again every 2 s");
                    }
                    continue;
                };
                match job {
                    Job::Gone(path) => {
                        // A link gone: what it led to may still be reached
                        // through another one.
                        if st.forget(&path) {
                            rewalk(&mut st, &filter);
                        }
                    }
                    Job::Walk(path) => {
                        if !path.is_dir() {
                            continue;
                        }
                        let mut files = Found::None;
                        match watch_tree(&mut st, &path, &filter, Some(&mut files)) {
                            // The folder's change: its files, written before
                            // its watch began, sent no event. A folder that
                            // brings none (made empty, or holding only what
                            // is ignored) changes nothing; one that brings
                            // one file is that file's change (the folder a
                            // build makes for its artifact).
                            Ok(()) => match files {
                                Found::None => {}
                                Found::One(f) => {
                                    let _ = tx.send(Change::Appeared(filter.shown(&f)));
                                }
                                Found::Many => {
                                    let _ = tx.send(Change::Appeared(filter.shown(&path)));
                                }
                            },
                            // Made and removed at once (a tool's temporary folder).
                            Err(_) if !path.exists() => {}
                            // What it holds is not known: a change; and it is
                            // tried again until it is watched.
                            Err(e) => {
                                note_unwatched(&mut unwatched, &mut warned, &path, Unwatched::Tree, &e);
                                let _ = tx.send(Change::Appeared(filter.shown(&path)));
                            }
                        }
                    }
                    Job::Refolder(path) => match refolder(&mut st, &filter, &path, &tx) {
                        Ok(()) => {}
                        Err(_) if !path.exists() => {}
                        // Its files changed all the same; and it is tried
                        // again until it is watched.
                        Err(e) => {
                            let e = WatchError { path: path.clone(), source: e };
                            note_unwatched(&mut unwatched, &mut warned, &path, Unwatched::FileFolder, &e);
                            file_folder_changed(&filter, &path, &tx);
                        }
                    },
                    Job::Rescan => {
                        tracing::warn!("file events were lost (the kernel's queue overflowed); watching every folder again");
                        rewalk(&mut st, &filter);
                        let _ = tx.send(Change::Lost);
                    }
                }
            }
        })
        .map(|_| ())
        .map_err(|e| WatchError {
            path: root,
            source: notify::Error::io(e),
        })
}

/// A folder that could not be watched, to be tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unwatched {
    /// A folder of a watched tree, with what is under it.
    Tree,
    /// The folder of a file watched by name or of the config file.
    FileFolder,
    /// A folder watched only to see a watched folder replaced, or a link
    /// on the way switched, in it.
    Parent,
}

/// Adds `path` to the folders tried again; the first of them is warned
/// about at once (later ones in the warning once a minute).
fn note_unwatched(
    unwatched: &mut BTreeMap<PathBuf, Unwatched>,
    warned: &mut std::time::Instant,
    path: &Path,
    kind: Unwatched,
    error: &WatchError,
) {
    if unwatched.is_empty() {
        *warned = std::time::Instant::now();
        tracing::warn!(%error, "a folder is not watched (changes in it are not seen); trying again every 2 s");
    }
    unwatched.insert(path.to_path_buf(), kind);
}

/// Tries again to watch the folders in `unwatched`: each one watched now,
/// or gone, leaves the set; one watched now is a change (what was written
/// in it meanwhile was not seen).
fn retry_unwatched(
    st: &mut State,
    filter: &Filter,
    unwatched: &mut BTreeMap<PathBuf, Unwatched>,
    tx: &mpsc::UnboundedSender<Change>,
) {
    unwatched.retain(|path, kind| {
        if !path.is_dir() {
            return false;
        }
        match kind {
            Unwatched::Tree => match watch_tree(st, path, filter, None) {
                Ok(()) => {
                    let _ = tx.send(Change::Appeared(filter.shown(path)));
                    false
                }
                Err(_) => true,
            },
            Unwatched::FileFolder => refolder(st, filter, path, tx).is_err(),
            Unwatched::Parent => std::fs::metadata(path.as_path())
                .map_err(notify::Error::io)
                .and_then(|m| st.watch(path, key_of(&m), false))
                .is_err(),
        }
    });
}

/// Watches again the folder `path` of a file watched by name or of the
/// config file, made or moved in over the one before, and says what
/// changed with it.
fn refolder(
    st: &mut State,
    filter: &Filter,
    path: &Path,
    tx: &mpsc::UnboundedSender<Change>,
) -> Result<(), notify::Error> {
    // The folder before, if notify still watches it under this path (one
    // moved away, or a link's old target), is not watched any more; its
    // inode number may be the new one's.
    let _ = st.w.unwatch(path);
    st.forget(path);
    let meta = std::fs::metadata(path).map_err(notify::Error::io)?;
    st.watch(path, key_of(&meta), false)?;
    file_folder_changed(filter, path, tx);
    Ok(())
}

/// What a file folder replaced whole changes: each file watched in it, and
/// the config file if it is there (a folder made empty, its files still to
/// come, is no config change yet).
fn file_folder_changed(filter: &Filter, path: &Path, tx: &mpsc::UnboundedSender<Change>) {
    for f in filter.files.iter().filter(|f| f.parent() == Some(path)) {
        let _ = tx.send(Change::Source(filter.shown(f)));
    }
    if filter
        .config
        .iter()
        .any(|c| c.parent() == Some(path) && c.exists())
    {
        let _ = tx.send(Change::Config);
    }
}

/// Walks every watched tree again, watching what is not watched.
fn rewalk(st: &mut State, filter: &Filter) {
    for d in &filter.dirs {
        if let Err(e) = watch_tree(st, d, filter, None) {
            tracing::warn!(error = %e, "a watched folder is not watched");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn filter(root: &Path, ignore: &[&str]) -> Filter {
        Filter {
            root: root.to_path_buf(),
            config: vec![root.join("etc/baton.toml")],
            files: vec![root.join("Cargo.toml")],
            aliases: Vec::new(),
            config_at: None,
            file_folders: vec![root.to_path_buf(), root.join("etc")],
            dirs: vec![
                root.to_path_buf(),
                Path::new("/elsewhere/lib").to_path_buf(),
            ],
            real_dirs: Vec::new(),
            ignore: IgnoreSet::new(ignore).expect("globs"),
            skip: vec![root.join("state")],
            skip_keys: HashSet::new(),
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
        let file = |p: &Path| f.classify(p, false);
        let folder = |p: &Path| f.classify(p, true);
        assert_eq!(file(&root.join("src/main.rs")), src("src/main.rs"));
        assert_eq!(file(&root.join("etc/baton.toml")), Some(Change::Config));
        // The folder a `P/**` glob covers, itself and what is in it.
        assert_eq!(folder(&root.join("target")), None);
        assert_eq!(file(&root.join("target/debug/app")), None);
        assert_eq!(file(&root.join("web/target/x")), None);
        // A glob naming a folder leaves out what is in it too.
        assert_eq!(folder(&root.join("web/node_modules")), None);
        assert_eq!(file(&root.join("web/node_modules/a/b.js")), None);
        assert_eq!(file(&root.join("src/.main.rs.swp")), None);
        // `P/`, as in .gitignore: the folder and all in it, and only a
        // folder: a file called dist is a source like any other.
        assert_eq!(folder(&root.join("web/dist")), None);
        assert_eq!(file(&root.join("web/dist/app.js")), None);
        assert_eq!(file(&root.join("tools/dist")), src("tools/dist"));
        assert_eq!(file(&root.join("web/distant.js")), src("web/distant.js"));
        // The state folder, whatever the globs.
        assert_eq!(file(&root.join("state/gen-0001/worker.log")), None);
        assert_eq!(file(&root.join("stateful.rs")), src("stateful.rs"));
        // A tree outside the root: globs apply below it, not to its own
        // path.
        assert_eq!(
            file(Path::new("/elsewhere/lib/x.rs")),
            src("/elsewhere/lib/x.rs")
        );
        assert_eq!(file(Path::new("/elsewhere/lib/target/x")), None);
        assert_eq!(file(Path::new("/nowhere/x.rs")), None);
    }

    #[test]
    fn a_project_inside_a_folder_named_like_an_ignored_one_is_still_watched() {
        // Only what is below the watched folder is matched against the
        // folder globs, not the folders the project itself sits in.
        let root = Path::new("/home/u/target/app");
        let f = filter(root, &["**/target/**"]);
        assert_eq!(
            f.classify(&root.join("src/main.rs"), false),
            Some(Change::Source(PathBuf::from("src/main.rs")))
        );
        assert_eq!(f.classify(&root.join("target/x"), false), None);
        // The same for a tree outside the root, and a file watched by name.
        let mut f = filter(root, &["**/target/**", "**/build/"]);
        f.dirs.push(PathBuf::from("/opt/target/shared"));
        f.files.push(PathBuf::from("/opt/build/shared.toml"));
        assert_eq!(
            f.classify(Path::new("/opt/target/shared/sub/m.py"), false),
            Some(Change::Source(PathBuf::from("/opt/target/shared/sub/m.py")))
        );
        assert_eq!(
            f.classify(Path::new("/opt/target/shared/target/m.o"), false),
            None
        );
        assert_eq!(
            f.classify(Path::new("/opt/build/shared.toml"), false),
            Some(Change::Source(PathBuf::from("/opt/build/shared.toml")))
        );
    }

    /// Receives changes until `want` of them equal `change`, or 5 s pass.
    #[test]
    fn folders_that_could_not_be_watched_are_watched_when_tried_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("src/new/deeper")).expect("mkdir");
        std::fs::write(root.join("src/new/deeper/f.rs"), "x").expect("write");
        let f = filter(root, &[]);
        let mut st = State {
            w: notify::recommended_watcher(|_: notify::Result<notify::Event>| {}).expect("watcher"),
            by_key: HashMap::new(),
            by_path: BTreeMap::new(),
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        std::fs::create_dir_all(root.join("up")).expect("mkdir");
        let mut unwatched: BTreeMap<PathBuf, Unwatched> = [
            (root.join("src/new"), Unwatched::Tree),
            (root.join("src/gone"), Unwatched::Tree),
            (root.join("up"), Unwatched::Parent),
        ]
        .into();
        retry_unwatched(&mut st, &f, &mut unwatched, &tx);
        // Watched now, below it too; the one gone is given up.
        assert!(unwatched.is_empty(), "{unwatched:?}");
        assert!(st.by_path.contains_key(&root.join("src/new")));
        assert!(st.by_path.contains_key(&root.join("src/new/deeper")));
        // A parent is watched by itself, and is no change.
        assert!(st.by_path.contains_key(&root.join("up")));
        // What was written in it meanwhile was not seen: a change.
        assert_eq!(
            rx.try_recv(),
            Ok(Change::Appeared(PathBuf::from("src/new")))
        );
        assert!(rx.try_recv().is_err());
    }

    fn count(rx: &mut mpsc::UnboundedReceiver<Change>, change: &Change, want: usize) -> usize {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut n = 0;
        while n < want && std::time::Instant::now() < deadline {
            match rx.try_recv() {
                Ok(c) if c == *change => n += 1,
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        n
    }

    /// Receives changes for `within`, all of them.
    fn drain(rx: &mut mpsc::UnboundedReceiver<Change>, within: Duration) -> Vec<Change> {
        let deadline = std::time::Instant::now() + within;
        let mut got = Vec::new();
        while std::time::Instant::now() < deadline {
            match rx.try_recv() {
                Ok(c) => got.push(c),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        got
    }

    #[test]
    fn a_new_folder_is_a_change_once_watched_if_it_brings_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = std::fs::canonicalize(dir.path()).expect("canonical");
        std::fs::create_dir(root.join("src")).expect("mkdir");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let ignore = IgnoreSet::new(&["**/target/**", "**/*.o"]).expect("globs");
        let w = watch(
            &root,
            &[root.join("src")],
            &root.join("baton.toml"),
            ignore,
            &[],
            tx,
        )
        .expect("watch");
        let settle = Duration::from_millis(300);
        // Files written in a folder before its watch began send no event:
        // the change sent after the walk stands for them (the folder is
        // made outside and moved in whole, so they all are).
        std::fs::create_dir_all(root.join("away/new/deep")).expect("mkdir");
        std::fs::write(root.join("away/new/deep/f.rs"), "x").expect("write");
        std::fs::write(root.join("away/new/e.rs"), "x").expect("write");
        std::fs::rename(root.join("away/new"), root.join("src/new")).expect("mv");
        let new = Change::Appeared(PathBuf::from("src/new"));
        assert_eq!(count(&mut rx, &new, 1), 1, "the walk");
        assert_eq!(drain(&mut rx, settle), vec![], "one change only");
        // One file: that file's change (a build's output folder made for
        // its artifact is the artifact's change).
        std::fs::create_dir_all(root.join("away/out")).expect("mkdir");
        std::fs::write(root.join("away/out/app"), "x").expect("write");
        std::fs::rename(root.join("away/out"), root.join("src/out")).expect("mv");
        assert_eq!(
            drain(&mut rx, settle),
            vec![
                Change::NewFolder(PathBuf::from("src/out")),
                Change::Appeared(PathBuf::from("src/out/app"))
            ]
        );
        // A folder that brings nothing, or only ignored files, is no
        // change, but it is watched.
        std::fs::create_dir_all(root.join("away/objs")).expect("mkdir");
        std::fs::write(root.join("away/objs/a.o"), "x").expect("write");
        std::fs::rename(root.join("away/objs"), root.join("src/objs")).expect("mv");
        std::fs::create_dir(root.join("src/empty")).expect("mkdir");
        assert_eq!(
            drain(&mut rx, settle),
            vec![
                Change::NewFolder(PathBuf::from("src/objs")),
                Change::NewFolder(PathBuf::from("src/empty"))
            ]
        );
        std::fs::write(root.join("src/empty/g.rs"), "x").expect("write");
        let g = Change::Appeared(PathBuf::from("src/empty/g.rs"));
        assert_eq!(count(&mut rx, &g, 1), 1);
        // A link back into the tree is not followed: nothing is watched
        // twice, under two paths.
        let folders = w._inner.lock().expect("state").by_key.len();
        std::os::unix::fs::symlink("..", root.join("src/new/up")).expect("ln -s");
        let up = Change::Appeared(PathBuf::from("src/new/up"));
        assert_eq!(count(&mut rx, &up, 1), 1);
        std::fs::create_dir(root.join("src/new/more")).expect("mkdir");
        std::fs::write(root.join("src/new/more/h.rs"), "x").expect("write");
        let more = Change::Appeared(PathBuf::from("src/new/more/h.rs"));
        let walked = Change::Appeared(PathBuf::from("src/new/more"));
        let got = drain(&mut rx, settle);
        assert!(
            got.contains(&more) || got.contains(&walked),
            "the file's event or the walk: {got:?}"
        );
        let st = w._inner.lock().expect("state");
        assert_eq!(st.by_key.len(), folders + 1, "{:?}", st.by_path.keys());
        assert!(
            st.by_path
                .keys()
                .all(|p| !p.starts_with(root.join("src/new/up")))
        );
        drop(st);
        // A folder removed is no change of its own: its files' removals are.
        std::fs::remove_file(root.join("src/empty/g.rs")).expect("rm");
        std::fs::remove_dir(root.join("src/empty")).expect("rmdir");
        assert_eq!(
            drain(&mut rx, settle),
            vec![Change::Source(PathBuf::from("src/empty/g.rs"))]
        );
        // A link to a folder moved in is a change: it may lead elsewhere.
        std::os::unix::fs::symlink(root.join("src/new"), root.join("away/cur")).expect("ln -s");
        std::fs::rename(root.join("away/cur"), root.join("src/cur")).expect("mv -T");
        let cur = Change::Source(PathBuf::from("src/cur"));
        assert_eq!(count(&mut rx, &cur, 1), 1);
        // A file named like a folder-only glob (`**/target/**`) is a source,
        // and moved out of the tree (gone: not known to be a file) it is a
        // change too.
        std::fs::write(root.join("src/target"), "x").expect("write");
        let got = drain(&mut rx, settle);
        assert!(
            got.contains(&Change::Appeared(PathBuf::from("src/target"))),
            "{got:?}"
        );
        std::fs::rename(root.join("src/target"), root.join("away/target")).expect("mv");
        assert_eq!(
            drain(&mut rx, settle),
            vec![Change::Source(PathBuf::from("src/target"))]
        );
    }
}
