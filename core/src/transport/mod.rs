//! gRPC over unix sockets, for both ends: the agent and the CSI plugin serve on one, the CSI
//! plugin is a client of the agent's. Servers accept any `:authority` ([`AuthorityFix`]).

mod authority;

pub use authority::AuthorityFix;
use hyper_util::rt::TokioIo;
use std::io;
use std::path::{Path, PathBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// The socket path of a `unix:///path` (or `unix:/path`, or plain `/path`) endpoint.
pub fn unix_socket_path(endpoint: &str) -> Result<PathBuf, crate::repo::InvalidInput> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    if !path.starts_with('/') {
        return Err(crate::repo::InvalidInput {
            what: "endpoint",
            value: crate::repo::clip_to(endpoint, 300),
            reason: "is not a unix socket: write it as unix:///absolute/path.sock",
        });
    }
    Ok(PathBuf::from(path))
}

/// Binds a unix socket readable and writable by its owner alone (0600), whatever the umask:
/// the socket is made under a temporary name, its mode set, then renamed into place, so no
/// client ever sees it open to others. A stale socket a previous run left is replaced; a socket
/// another process still serves, or any other file, is an error.
pub fn bind_unix(
    path: &Path,
) -> io::Result<impl tokio_stream::Stream<Item = io::Result<AuthorityFix<UnixStream>>>> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    use tokio_stream::StreamExt;
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir)?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "{} is served by another running process; stop it first, or choose another --listen/--endpoint path",
                        path.display()
                    ),
                ));
            }
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; remove it or choose another --listen/--endpoint path",
                    path.display()
                ),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&temp);
    let listener = UnixListener::bind(&temp)?;
    let placed = std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&temp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&temp);
        return Err(e);
    }
    // Any `:authority` a client sends is accepted (see [`AuthorityFix`]).
    Ok(UnixListenerStream::new(listener).map(|c| c.map(AuthorityFix::new)))
}

/// A channel to a gRPC server on a unix socket. Connects lazily, and reconnects after the
/// server restarts, so a client may start before its server.
pub fn connect_unix(path: &Path) -> Channel {
    let path = path.to_path_buf();
    Endpoint::from_static("http://localhost").connect_with_connector_lazy(tower::service_fn(
        move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            unix_socket_path("unix:///csi/csi.sock").unwrap(),
            PathBuf::from("/csi/csi.sock")
        );
        assert_eq!(
            unix_socket_path("unix:/a.sock").unwrap(),
            PathBuf::from("/a.sock")
        );
        assert_eq!(
            unix_socket_path("/a.sock").unwrap(),
            PathBuf::from("/a.sock")
        );
        assert!(unix_socket_path("tcp://1.2.3.4:5").is_err());
        assert!(unix_socket_path("unix://relative.sock").is_err());
    }

    #[tokio::test]
    async fn sockets_are_owner_only_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        let bound = bind_unix(&sock);
        nix::sys::stat::umask(old);
        let _listener = bound.unwrap();
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }

    #[tokio::test]
    async fn a_live_socket_is_never_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let _live = bind_unix(&sock).unwrap();
        let Err(err) = bind_unix(&sock) else {
            panic!("a live socket was taken over")
        };
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        assert!(err.to_string().contains("another running process"), "{err}");
    }

    #[tokio::test]
    async fn bind_replaces_stale_socket_but_not_files() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        drop(bind_unix(&sock).unwrap());
        assert!(sock.exists(), "a dropped listener leaves its socket file");
        drop(bind_unix(&sock).unwrap());
        let file = dir.path().join("f");
        std::fs::write(&file, b"keep").unwrap();
        assert!(bind_unix(&file).is_err());
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    }
}
