//! Reading the daemon's Prometheus endpoint from inside the lab.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use crate::{Lab, Side};

/// GET /metrics at `address` from inside the protected namespace; the body, after checking status and type.
pub fn scrape(lab: &Lab, address: &str) -> String {
    let response = lab.netns(Side::Protected).enter(|| {
        let mut stream = TcpStream::connect(address)
            .unwrap_or_else(|e| panic!("cannot connect to the metrics endpoint: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: moat\r\n\r\n")
            .expect("send the request");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .expect("read the response");
        response
    });
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {response}"));
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.to_string()
}
