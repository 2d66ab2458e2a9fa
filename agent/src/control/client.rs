//! The CLI's end of the control socket.

use std::path::Path;

use anyhow::{Context as _, anyhow, bail};
use tokio::net::UnixStream;

use super::protocol::{self, MAX_RESPONSE_BYTES, Reply, Request, Response};

/// Sends one request and returns the daemon's reply, or its error as an error.
pub fn call(socket: &Path, request: &Request) -> anyhow::Result<Reply> {
    let mut reply = None;
    stream(socket, request, |r| {
        reply = Some(r);
        Ok(false)
    })?;
    reply.ok_or_else(|| anyhow!("the daemon sent no reply"))
}

/// How a stream of replies ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// `on_reply` asked for no more.
    Done,
    /// SIGINT (Ctrl-C) came first.
    Interrupted,
}

/// Sends one request and hands each reply to `on_reply` until it returns `false` (a capture
/// is answered with many); an error from the daemon ends it as an error.
pub fn stream(
    socket: &Path,
    request: &Request,
    on_reply: impl FnMut(Reply) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    exchange(socket, request, on_reply, false).map(|_| ())
}

/// As [`stream`], but SIGINT ends the stream instead of the process, so that the caller can
/// keep what it received.
pub fn stream_until_interrupted(
    socket: &Path,
    request: &Request,
    on_reply: impl FnMut(Reply) -> anyhow::Result<bool>,
) -> anyhow::Result<StreamEnd> {
    exchange(socket, request, on_reply, true)
}

fn exchange(
    socket: &Path,
    request: &Request,
    mut on_reply: impl FnMut(Reply) -> anyhow::Result<bool>,
    interruptible: bool,
) -> anyhow::Result<StreamEnd> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let mut stream = UnixStream::connect(socket).await.with_context(|| {
            format!(
                "cannot reach the moat daemon at {} (is `moat run` running, and may this user \
                 use its socket?)",
                socket.display()
            )
        })?;
        // A daemon that refuses the peer answers without reading the request: its answer
        // says more than the broken pipe the write then meets.
        let sent = protocol::write_frame(&mut stream, request).await;
        let interrupt = async {
            if !interruptible || tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::pin!(interrupt);
        loop {
            let frame = tokio::select! {
                frame = protocol::read_frame(&mut stream, MAX_RESPONSE_BYTES) => frame,
                () = &mut interrupt => return Ok(StreamEnd::Interrupted),
            };
            let response: Response = match frame {
                Ok(response) => response,
                Err(e) => {
                    sent.context("sending the request")?;
                    return Err(e).context("reading the daemon's response");
                }
            };
            match response {
                Response::Ok(reply) => {
                    if !on_reply(reply)? {
                        return Ok(StreamEnd::Done);
                    }
                }
                Response::Error(message) => bail!("{message}"),
            }
        }
    })
}
