//! Talking to the daemon's control socket by hand, as a client the CLI would never be.

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde_json::Value;

/// Sends `bytes` on a fresh connection, half-closes it, and returns the daemon's response.
pub fn exchange(socket: &Path, bytes: &[u8]) -> Value {
    let mut stream = UnixStream::connect(socket).expect("connect to the control socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // The daemon may answer and close before reading everything (an oversized frame).
    let _ = stream.write_all(bytes);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut header = [0u8; 4];
    stream
        .read_exact(&mut header)
        .unwrap_or_else(|e| panic!("no response to {:?}: {e}", String::from_utf8_lossy(bytes)));
    let mut body = vec![0u8; u32::from_be_bytes(header) as usize];
    stream.read_exact(&mut body).expect("response body");
    serde_json::from_slice(&body).expect("the response is JSON")
}

pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut bytes = u32::try_from(body.len())
        .expect("small")
        .to_be_bytes()
        .to_vec();
    bytes.extend_from_slice(body);
    bytes
}

/// A `list_add` request for the blocklist, framed.
pub fn block_add_frame(cidr: &str) -> Vec<u8> {
    frame(
        format!(
            r#"{{"command":"list_add","arguments":{{"list":"blocklist","cidrs":["{cidr}"],"ttl_seconds":null,"comment":null}}}}"#
        )
        .as_bytes(),
    )
}
