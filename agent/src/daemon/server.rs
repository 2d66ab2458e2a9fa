//! The daemon's end of the control socket: bind it with the right owner and mode, check each
//! peer's credentials, read bounded requests, and hand them to the daemon one at a time.
//!
//! No client can hold others up: the accept loop never waits; connections reading a request,
//! commands and captures each have a bounded pool of their own (a capture that waits for ever
//! takes no command's place); every read and write has a time limit; and a request whose client
//! hung up before it was served is withdrawn, never applied.

use std::{
    ffi::CString,
    os::{
        fd::AsRawFd as _,
        unix::fs::{FileTypeExt as _, MetadataExt as _},
    },
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::{UnixListener, UnixStream},
    sync::{Semaphore, mpsc, oneshot},
};
use tracing::{debug, info, warn};

use crate::control::protocol::{
    self, FrameError, MAX_REQUEST_BYTES, Request, Response, WRITE_TIMEOUT,
};
use crate::observe::capture::{CaptureFilter, CaptureHub};

/// Connections reading their request at once; one more is answered "busy" at once.
const MAX_READING: usize = 16;
/// Bytes of requests being read at once, all clients together (a request is at most
/// `MAX_REQUEST_BYTES`): what the daemon can be made to hold in request buffers.
const MAX_BYTES_READING: u32 = 2 * MAX_REQUEST_BYTES;
/// Commands waiting for the daemon (or being served) at once; more wait for a place.
const MAX_COMMANDS: usize = 8;
/// Captures streaming at once; one more is refused (captures never take a command's place).
const MAX_CAPTURES: usize = 4;
/// How long a client may take to send its request, or wait for a command's place.
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
        let pools = Arc::new(Pools {
            reading: Arc::new(Semaphore::new(MAX_READING)),
            bytes: Semaphore::new(MAX_BYTES_READING as usize >> 10),
            commands: Arc::new(Semaphore::new(MAX_COMMANDS)),
            captures: Arc::new(Semaphore::new(MAX_CAPTURES)),
        });
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!(error = %e, "accepting a control connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let jobs = jobs.clone();
            let captures = captures.clone();
            let pools = pools.clone();
            let access = self.access;
            tokio::spawn(async move {
                let response = serve_client(stream, access, jobs, &captures, &pools).await;
                if let Some((mut stream, response)) = response {
                    answer(&mut stream, &response).await;
                }
            });
        }
    }
}

/// The places clients take, each bounded.
struct Pools {
    reading: Arc<Semaphore>,
    /// KiB of requests being read.
    bytes: Semaphore,
    commands: Arc<Semaphore>,
    captures: Arc<Semaphore>,
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

/// Serves one client; returns the answer still to write, if any.
async fn serve_client(
    mut stream: UnixStream,
    access: Access,
    jobs: mpsc::Sender<Job>,
    captures: &CaptureHub,
    pools: &Pools,
) -> Option<(UnixStream, Response)> {
    if let Err(refusal) = access.check(&stream) {
        warn!(reason = refusal, "control connection refused");
        return Some((stream, Response::Error(refusal)));
    }
    let Ok(reading) = pools.reading.clone().try_acquire_owned() else {
        let busy = format!("busy: {MAX_READING} connections are sending requests; try again");
        return Some((stream, Response::Error(busy)));
    };
    let request = tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut stream, pools))
        .await
        .unwrap_or_else(|_| Err(FrameError::Truncated(std::io::ErrorKind::TimedOut.into())));
    drop(reading);
    let request = match request {
        Ok(request) => request,
        Err(FrameError::Closed) => return None,
        Err(e) => {
            debug!(error = %e, "bad control request");
            return Some((stream, Response::Error(format!("bad request: {e}"))));
        }
    };
    if let Request::Capture {
        passed,
        reason,
        count,
        every,
    } = request
    {
        // A capture streams many frames: it is served here, not by the daemon's loop.
        let filter = match CaptureFilter::new(passed, reason.as_deref(), count, every) {
            Ok(filter) => filter,
            Err(message) => {
                return Some((stream, Response::Error(format!("bad capture: {message}"))));
            }
        };
        let Ok(_place) = pools.captures.clone().try_acquire_owned() else {
            let full = format!("{MAX_CAPTURES} captures are running already; try again later");
            return Some((stream, Response::Error(full)));
        };
        captures.serve(&mut stream, filter).await;
        return None;
    }
    let Ok(Ok(_place)) =
        tokio::time::timeout(REQUEST_TIMEOUT, pools.commands.clone().acquire_owned()).await
    else {
        let busy = "busy: the daemon is serving other commands; try again".to_string();
        return Some((stream, Response::Error(busy)));
    };
    if hung_up_already(&stream) {
        info!("a client hung up before its request was served: withdrawn, not applied");
        return None;
    }
    let (reply_to, reply) = oneshot::channel();
    if jobs.send((request, reply_to)).await.is_err() {
        return None;
    }
    tokio::select! {
        response = reply => Some((
            stream,
            response.unwrap_or_else(|_| Response::Error("the daemon is shutting down".into())),
        )),
        // Dropping `reply` withdraws the request, if the daemon has not taken it up yet.
        () = hung_up(&stream) => {
            info!("a client hung up before its request was served: withdrawn");
            None
        }
    }
}

/// Reads a request, taking its bytes from the shared budget while it is read and decoded.
async fn read_request(stream: &mut UnixStream, pools: &Pools) -> Result<Request, FrameError> {
    let length = protocol::read_length(stream, MAX_REQUEST_BYTES).await?;
    let kib = (length >> 10) + 1;
    let _budget = pools
        .bytes
        .acquire_many(kib)
        .await
        .map_err(|_| FrameError::Truncated(std::io::ErrorKind::Interrupted.into()))?;
    protocol::read_body(stream, length).await
}

/// Whether the client has closed its end by now. (A client that only shut down writing after
/// its request still waits for the answer: that is not hanging up.)
fn hung_up_already(stream: &UnixStream) -> bool {
    let mut poll = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd for a socket we own, and no waiting.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready > 0 && poll.revents & (libc::POLLHUP | libc::POLLERR) != 0
}

/// How often a waiting request's client is checked for a hang-up.
const HANG_UP_CHECK: Duration = Duration::from_millis(100);

/// Returns once the client closes its end.
async fn hung_up(stream: &UnixStream) {
    while !hung_up_already(stream) {
        tokio::time::sleep(HANG_UP_CHECK).await;
    }
}

/// Writes the answer, giving a client that does not read it `WRITE_TIMEOUT`.
async fn answer(stream: &mut UnixStream, response: &Response) {
    match tokio::time::timeout(WRITE_TIMEOUT, protocol::write_frame(stream, response)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(error = %e, "could not answer a control client"),
        Err(_) => debug!("a control client did not take its answer in time"),
    }
}
