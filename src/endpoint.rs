//! Where a worker listens, as `batond` sees it: a loopback TCP port, or a
//! Unix stream socket in the generation's folder (`worker.socket`).
//!
//! Either way `batond` binds the socket and hands it over as fd 3
//! (`LISTEN_FDS=1`). A Unix socket skips the TCP stack on the hop between
//! `batond` and its worker: no segments, no acknowledgements and no
//! softirq work per message, which is most of the cost of that hop.
//!
//! [`UnixPath`] reaches a Unix socket at a path of any length; the control
//! socket uses it too.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::{TcpStream, UnixStream};
use tokio_util::either::Either;

use crate::unixconn::UnixConn;

/// The longest path a Unix socket address holds (`sun_path`, less its NUL).
pub const UNIX_PATH_MAX: usize = 107;

/// A connection to a worker.
pub type Stream = Either<TcpStream, UnixConn>;

/// A worker's listening address.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// A loopback TCP port.
    Tcp(SocketAddr),
    /// A Unix stream socket.
    Unix(UnixPath),
}

/// Where a Unix socket is, and how to reach it.
#[derive(Debug, Clone)]
pub struct UnixPath {
    /// The socket file.
    pub path: PathBuf,
    /// What `bind` and `connect` use: `path` itself, or, when `path` is
    /// longer than a socket address holds, the same file reached through
    /// an open handle on its folder (`/proc/self/fd/N/NAME`).
    addr: PathBuf,
    /// That handle, kept open as long as the endpoint is in use.
    _dir: Option<Arc<OwnedFd>>,
}

impl UnixPath {
    /// The socket at `path`, reachable from this process whatever the
    /// length of `path`.
    ///
    /// # Errors
    /// The folder of a long path cannot be opened, or the file name alone
    /// is too long.
    pub fn new(path: &Path) -> io::Result<UnixPath> {
        if path.as_os_str().len() <= UNIX_PATH_MAX {
            return Ok(UnixPath {
                path: path.to_path_buf(),
                addr: path.to_path_buf(),
                _dir: None,
            });
        }
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} names no file in a folder", path.display()),
            ));
        };
        let dir = OwnedFd::from(std::fs::File::open(dir)?);
        let addr = Path::new("/proc/self/fd")
            .join(dir.as_raw_fd().to_string())
            .join(name);
        if addr.as_os_str().len() > UNIX_PATH_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: the file name is too long for a Unix socket address",
                    path.display()
                ),
            ));
        }
        Ok(UnixPath {
            path: path.to_path_buf(),
            addr,
            _dir: Some(Arc::new(dir)),
        })
    }

    /// What to pass to `bind` or `connect` in this process (valid as long as
    /// this value lives).
    pub fn addr(&self) -> &Path {
        &self.addr
    }
}

impl Endpoint {
    /// Binds a fresh loopback port.
    ///
    /// # Errors
    /// The bind error.
    pub fn bind_tcp() -> io::Result<(Endpoint, OwnedFd)> {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
        let addr = listener.local_addr()?;
        Ok((Endpoint::Tcp(addr), listener.into()))
    }

    /// Reserves a fresh loopback port for a worker that binds it itself:
    /// a socket bound with `SO_REUSEADDR` and never listening, which the
    /// worker's own bind (with `SO_REUSEADDR`) and listen share, while the
    /// kernel picks the port for no other bind to port 0 or connect, and a
    /// plain bind to it fails, as long as it is kept open.
    ///
    /// # Errors
    /// The socket or bind error.
    pub fn reserve_tcp() -> io::Result<(Endpoint, OwnedFd)> {
        use nix::sys::socket::{
            AddressFamily, SockFlag, SockType, SockaddrIn, bind, getsockname, setsockopt, socket,
            sockopt,
        };
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        setsockopt(&fd, sockopt::ReuseAddr, &true)?;
        bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, 0))?;
        let bound: SockaddrIn = getsockname(fd.as_raw_fd())?;
        let addr = SocketAddr::from(([127, 0, 0, 1], bound.port()));
        Ok((Endpoint::Tcp(addr), fd))
    }

    /// Binds a Unix stream socket at `path`, replacing a stale socket file
    /// left there by an earlier run. A path of any length works.
    ///
    /// # Errors
    /// The bind error; a file there that is not a socket is left alone.
    pub fn bind_unix(path: &Path) -> io::Result<(Endpoint, OwnedFd)> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
            _ => {}
        }
        let unix = UnixPath::new(path)?;
        let listener = std::os::unix::net::UnixListener::bind(&unix.addr)?;
        // Only batond connects to it (the worker accepts on the fd).
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok((Endpoint::Unix(unix), listener.into()))
    }

    /// Connects to the worker.
    ///
    /// # Errors
    /// The connect error.
    pub async fn connect(&self) -> io::Result<Stream> {
        match self {
            Endpoint::Tcp(addr) => {
                let s = TcpStream::connect(addr).await?;
                let _ = s.set_nodelay(true);
                Ok(Either::Left(s))
            }
            Endpoint::Unix(u) => Ok(Either::Right(UnixConn::new(
                UnixStream::connect(&u.addr).await?,
            )?)),
        }
    }

    /// The TCP port, for a TCP endpoint.
    pub fn port(&self) -> Option<u16> {
        match self {
            Endpoint::Tcp(a) => Some(a.port()),
            Endpoint::Unix(_) => None,
        }
    }

    /// The socket file, for a Unix endpoint.
    pub fn unix_path(&self) -> Option<&Path> {
        match self {
            Endpoint::Tcp(_) => None,
            Endpoint::Unix(u) => Some(&u.path),
        }
    }

    /// A `Host` header value for requests `batond` makes itself.
    pub fn authority(&self) -> String {
        match self {
            Endpoint::Tcp(a) => a.to_string(),
            Endpoint::Unix(_) => "localhost".to_string(),
        }
    }

    /// Removes a Unix socket's file (nothing to do for TCP).
    pub fn remove_file(&self) {
        if let Some(path) = self.unix_path() {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "{a}"),
            Endpoint::Unix(u) => write!(f, "unix:{}", u.path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn echo_once(fd: OwnedFd, unix: bool) {
        let mut conn: Stream = if unix {
            let l = tokio::net::UnixListener::from_std({
                let l = std::os::unix::net::UnixListener::from(fd);
                l.set_nonblocking(true).expect("nonblocking");
                l
            })
            .expect("register");
            Either::Right(UnixConn::new(l.accept().await.expect("accept").0).expect("watch"))
        } else {
            let l = tokio::net::TcpListener::from_std({
                let l = std::net::TcpListener::from(fd);
                l.set_nonblocking(true).expect("nonblocking");
                l
            })
            .expect("register");
            Either::Left(l.accept().await.expect("accept").0)
        };
        let mut buf = [0u8; 5];
        conn.read_exact(&mut buf).await.expect("read");
        conn.write_all(&buf).await.expect("write");
    }

    #[tokio::test]
    async fn both_kinds_bind_hand_over_and_connect() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.sock");
        // A stale socket file from an earlier run is replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("stale"));
        // A folder deeper than a socket address holds works too.
        let deep = dir.path().join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&deep).expect("deep");
        let long = deep.join("w.sock");
        assert!(long.as_os_str().len() > UNIX_PATH_MAX);
        for (ep, fd) in [
            Endpoint::bind_tcp().expect("tcp"),
            Endpoint::bind_unix(&path).expect("unix"),
            Endpoint::bind_unix(&long).expect("unix, long path"),
        ] {
            let unix = matches!(ep, Endpoint::Unix(_));
            let server = tokio::spawn(echo_once(fd, unix));
            let mut c = ep.connect().await.expect("connect");
            c.write_all(b"hello").await.expect("write");
            let mut back = [0u8; 5];
            c.read_exact(&mut back).await.expect("read");
            assert_eq!(&back, b"hello", "{ep}");
            server.await.expect("server");
            if let Endpoint::Unix(u) = &ep {
                assert!(
                    std::fs::metadata(&u.path)
                        .expect("socket file")
                        .file_type()
                        .is_socket(),
                    "{ep}"
                );
                assert_eq!(ep.to_string(), format!("unix:{}", u.path.display()));
                ep.remove_file();
                assert!(!u.path.exists());
            }
        }
    }

    #[test]
    fn a_regular_file_in_the_way_is_not_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.sock");
        std::fs::write(&path, b"data").expect("write");
        assert!(Endpoint::bind_unix(&path).is_err());
        assert_eq!(std::fs::read(&path).expect("kept"), b"data");
    }
}
