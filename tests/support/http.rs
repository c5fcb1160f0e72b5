//! The HTTP endpoint of a `steward` process (/metrics, /healthz, /readyz, /leader). Included
//! (`#[path]`) by the suites that read it, so that the others do not compile it.

use crate::support::Steward;
use std::time::Duration;

impl Steward {
    /// The HTTP endpoint's address, from the startup log.
    pub fn http_addr(&self) -> String {
        let line = self.wait_for(
            "serving /metrics, /healthz, /readyz and /leader",
            Duration::from_secs(30),
        );
        line.field("addr")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    }

    /// GET `path` from the HTTP endpoint: (status code, body).
    #[allow(dead_code)] // not used by e2e_prometheus
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(&self.http_addr(), path)
    }
}

/// A minimal HTTP/1.0 GET, enough for the endpoints under test.
#[allow(dead_code)] // used directly only by e2e_prometheus
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connecting to the HTTP endpoint");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}
