//! The daemon's end of the control socket: bind it with the right owner and mode, check each
//! peer's credentials, read bounded requests, and hand them to the daemon one at a time.

use std::{
    ffi::CString,
    os::unix::fs::{FileTypeExt as _, MetadataExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::{UnixListener, UnixStream},
    sync::{Semaphore, mpsc, oneshot},
};
use tracing::{debug, warn};

use crate::control::protocol::{self, FrameError, MAX_REQUEST_BYTES, Request, Response};
use crate::observe::capture::{CaptureFilter, CaptureHub};

/// Clients served at once; more wait for a free slot, so that no number of clients can make
/// the daemon hold more than this many requests in memory.
const MAX_CLIENTS: usize = 8;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another moat daemon is serving {0}")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; moat replaces only a stale socket of its own")]
    NotASocket(PathBuf),
    #[error("socket_group {0:?} does not exist")]
    NoGroup(String),
}

/// A request and where its response goes.
pub type Job = (Request, oneshot::Sender<Response>);

/// Who may talk to the daemon: root, and the members of `socket_group` when set.
#[derive(Clone, Copy, Debug)]
struct Access {
    group: Option<libc::gid_t>,
}

impl Access {
    fn check(&self, stream: &UnixStream) -> Result<(), String> {
        let cred = stream
            .peer_cred()
            .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
        if cred.uid() == 0 {
            return Ok(());
        }
        if let Some(group) = self.group {
            let member = cred.gid() == group
                || cred
                    .pid()
                    .is_some_and(|pid| supplementary_groups(pid).contains(&group));
            if member {
                return Ok(());
            }
        }
        Err(format!(
            "permission denied: uid {} is neither root nor in the socket's group",
            cred.uid()
        ))
    }
}

/// The supplementary groups of process `pid`, from /proc.
fn supplementary_groups(pid: i32) -> Vec<libc::gid_t> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("Groups:"))
        .map(|groups| {
            groups
                .split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn group_id(name: &str) -> Result<libc::gid_t, SocketError> {
    let c_name = CString::new(name).map_err(|_| SocketError::NoGroup(name.to_string()))?;
    // SAFETY: `group` is plain C data; all zeroes is a valid value (null pointers, zero id).
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: getgrnam_r writes into the group struct and buffer we own.
    let rc = unsafe {
        libc::getgrnam_r(
            c_name.as_ptr(),
            &mut group,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return Err(SocketError::NoGroup(name.to_string()));
    }
    Ok(group.gr_gid)
}

/// The bound socket; the file is removed when this is dropped.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket bound: only that file is removed at the end.
    inode: (u64, u64),
    access: Access,
}

impl ControlSocket {
    /// Binds `path`: mode 0600 (root only), or 0660 with group `group`. A stale socket left by
    /// a daemon that died is replaced; a live one is an error, and so is anything at `path`
    /// that is not a socket (a file, a directory, a symlink: nothing is followed or deleted).
    pub fn bind(path: &Path, group: Option<&str>) -> Result<Self, SocketError> {
        let io = |source| SocketError::Io {
            path: path.to_path_buf(),
            source,
        };
        let gid = group.map(group_id).transpose()?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(found) if found.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(SocketError::InUse(path.to_path_buf()));
                }
                std::fs::remove_file(path).map_err(io)?;
            }
            Ok(_) => return Err(SocketError::NotASocket(path.to_path_buf())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        // The socket is created with its final mode (the umask masks bind's 0777), so that no
        // chmod has to follow a path someone could have swapped meanwhile.
        let mode: libc::mode_t = if gid.is_some() { 0o660 } else { 0o600 };
        // SAFETY: umask only swaps the process's file mode mask; it cannot fail.
        let previous = unsafe { libc::umask(0o777 & !mode) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above, restoring the mask.
        unsafe { libc::umask(previous) };
        let listener = bound.map_err(io)?;
        if let Some(gid) = gid {
            // lchown: a symlink put in the socket's place is not followed.
            std::os::unix::fs::lchown(path, Some(0), Some(gid)).map_err(io)?;
        }
        let bound = std::fs::symlink_metadata(path).map_err(io)?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            inode: (bound.dev(), bound.ino()),
            access: Access { group: gid },
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts clients for ever, sending their requests to `jobs` (captures to `captures`).
    pub async fn serve(&self, jobs: mpsc::Sender<Job>, captures: Arc<CaptureHub>) {
        let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!(error = %e, "accepting a control connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let jobs = jobs.clone();
            let captures = captures.clone();
            let access = self.access;
            tokio::spawn(async move {
                serve_client(stream, access, jobs, &captures).await;
                drop(slot);
            });
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|found| (found.dev(), found.ino()) == self.inode);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

async fn serve_client(
    mut stream: UnixStream,
    access: Access,
    jobs: mpsc::Sender<Job>,
    captures: &CaptureHub,
) {
    let response = match access.check(&stream) {
        Err(refusal) => {
            warn!(reason = refusal, "control connection refused");
            Response::Error(refusal)
        }
        Ok(()) => {
            let request = tokio::time::timeout(
                REQUEST_TIMEOUT,
                protocol::read_frame::<Request>(&mut stream, MAX_REQUEST_BYTES),
            )
            .await
            .unwrap_or_else(|_| Err(FrameError::Truncated(std::io::ErrorKind::TimedOut.into())));
            match request {
                // A capture streams many frames: it is served here, not by the daemon's loop.
                Ok(Request::Capture {
                    passed,
                    reason,
                    count,
                    every,
                }) => match CaptureFilter::new(passed, reason.as_deref(), count, every) {
                    Ok(filter) => return captures.serve(&mut stream, filter).await,
                    Err(message) => Response::Error(format!("bad capture: {message}")),
                },
                Ok(request) => {
                    let (reply_to, reply) = oneshot::channel();
                    if jobs.send((request, reply_to)).await.is_err() {
                        return;
                    }
                    match reply.await {
                        Ok(response) => response,
                        Err(_) => Response::Error("the daemon is shutting down".into()),
                    }
                }
                Err(FrameError::Closed) => return,
                Err(e) => {
                    debug!(error = %e, "bad control request");
                    Response::Error(format!("bad request: {e}"))
                }
            }
        }
    };
    if let Err(e) = protocol::write_frame(&mut stream, &response).await {
        debug!(error = %e, "could not answer a control client");
    }
}
