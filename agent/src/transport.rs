//! gRPC over unix sockets, for both ends: the agent and the CSI plugin serve on one, the CSI
//! plugin is a client of the agent's.

use hyper_util::rt::TokioIo;
use std::io;
use std::path::{Path, PathBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// The socket path of a `unix:///path` (or `unix:/path`, or plain `/path`) endpoint.
pub fn unix_socket_path(endpoint: &str) -> Result<PathBuf, String> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    if !path.starts_with('/') {
        return Err(format!(
            "endpoint {endpoint:?} is not a unix socket: write it as unix:///absolute/path.sock"
        ));
    }
    Ok(PathBuf::from(path))
}

/// Binds a unix socket, replacing a stale socket a previous run left (never any other file).
pub fn bind_unix(path: &Path) -> io::Result<UnixListenerStream> {
    use std::os::unix::fs::FileTypeExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
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
    Ok(UnixListenerStream::new(UnixListener::bind(path)?))
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
