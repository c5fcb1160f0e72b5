//! A TCP proxy that adds a fixed one-way delay to every byte, in both directions, to put a
//! network round trip between workers and PostgreSQL.
//!
//! Each direction of a connection is a reader that stamps every chunk it reads with the time it
//! may leave (read time + delay) and queues it, and a writer that sends each chunk at its time,
//! in order. The delay therefore adds latency without limiting throughput: chunks in flight
//! overlap, as on a long link, instead of waiting for one another.

use anyhow::Context;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A running proxy; dropping it (or [`DelayProxy::stop`]) closes the listener and every
/// connection.
pub struct DelayProxy {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl DelayProxy {
    /// Listens on an ephemeral port of 127.0.0.1 and forwards each connection to `upstream`
    /// (host, port), delaying each direction by `one_way`.
    pub async fn start(upstream: (String, u16), one_way: Duration) -> anyhow::Result<DelayProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the delay proxy")?;
        let addr = listener.local_addr().context("the delay proxy's address")?;
        let stop = CancellationToken::new();
        tokio::spawn(accept(listener, upstream, one_way, stop.clone()));
        Ok(DelayProxy { addr, stop })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept(
    listener: TcpListener,
    upstream: (String, u16),
    one_way: Duration,
    stop: CancellationToken,
) {
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let Ok((client, _)) = accepted else {
            continue;
        };
        let upstream = upstream.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            // A connection that cannot reach the server is closed; the client sees the error.
            let Ok(server) = TcpStream::connect((upstream.0.as_str(), upstream.1)).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = async {
                    tokio::join!(
                        pipe(client_read, server_write, one_way),
                        pipe(server_read, client_write, one_way),
                    )
                } => {}
            }
        });
    }
    connections.abort_all();
}

/// One direction: bytes read from `from` are written to `to` `delay` after they were read, in
/// order. End of input is forwarded (as a write shutdown) after the last chunk.
async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration) {
    let (queue, mut due) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if queue
                        .send((Instant::now() + delay, buffer[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        // Dropping the sender ends the writer once it has sent everything queued.
    };
    let writer = async move {
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// `url` (a `postgres://` URL) with its host and port replaced by `addr`; user, password,
/// database and parameters are kept.
pub fn url_via(url: &str, addr: SocketAddr) -> anyhow::Result<String> {
    let scheme_end = url
        .find("://")
        .map(|i| i + 3)
        .context("the delay proxy needs a postgres:// URL")?;
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let userinfo = authority
        .rsplit_once('@')
        .map(|(user, _)| format!("{user}@"))
        .unwrap_or_default();
    Ok(format!(
        "{}{userinfo}{addr}{}",
        &url[..scheme_end],
        &rest[authority_end..]
    ))
}

/// The TCP host and port `url` connects to.
pub fn upstream_of(url: &str) -> anyhow::Result<(String, u16)> {
    let config: tokio_postgres::Config = url.parse().context("parsing the database URL")?;
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        Some(_) => anyhow::bail!("the delay proxy needs a TCP host, not a Unix socket"),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_host_and_port_only() {
        let addr: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert_eq!(
            url_via("postgres://u:p@db:5432/b1?sslmode=disable", addr).unwrap(),
            "postgres://u:p@127.0.0.1:4000/b1?sslmode=disable"
        );
        assert_eq!(
            url_via("postgres://db/b1", addr).unwrap(),
            "postgres://127.0.0.1:4000/b1"
        );
        assert_eq!(
            upstream_of("postgres://u@10.0.0.2:6543/x").unwrap(),
            ("10.0.0.2".to_owned(), 6543)
        );
    }

    #[tokio::test]
    async fn delays_each_direction_without_serialising() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                s.write_all(&buf[..n]).await.unwrap();
            }
        });
        let proxy = DelayProxy::start(
            ("127.0.0.1".to_owned(), echo_addr.port()),
            Duration::from_millis(50),
        )
        .await
        .unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        let started = std::time::Instant::now();
        // Ten writes 5 ms apart: pipelined, they come back ~100 ms after each was sent, not
        // ten round trips later.
        for i in 0..10u8 {
            s.write_all(&[i]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 16];
        while got.len() < 10 {
            let n = s.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        let elapsed = started.elapsed();
        assert_eq!(got, (0..10).collect::<Vec<u8>>());
        assert!(elapsed >= Duration::from_millis(100), "{elapsed:?}");
        assert!(elapsed < Duration::from_millis(400), "{elapsed:?}");
    }
}
