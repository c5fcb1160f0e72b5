//! Network faults: a TCP proxy that can black-hole a connection, and kernel (iptables) rules
//! that drop a connection's packets both ways.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// The server address of a `postgres://user@host:port/db` URL.
pub fn server_addr(url: &str) -> SocketAddr {
    let config: tokio_postgres::Config = url.parse().expect("a database URL");
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        other => panic!("the chaos proxy needs a TCP server address, not {other:?}"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    use std::net::ToSocketAddrs;
    (host.as_str(), port)
        .to_socket_addrs()
        .expect("resolving the server")
        .find(|a| a.is_ipv4())
        .expect("an IPv4 server address")
}

/// The URL with its host and port replaced by `addr`.
pub fn url_via(url: &str, addr: SocketAddr) -> String {
    let scheme_end = url.find("://").map(|i| i + 3).expect("a postgres:// URL");
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let userinfo = authority.rsplit_once('@').map(|(u, _)| format!("{u}@"));
    format!(
        "{}{}{}{}",
        &url[..scheme_end],
        userinfo.unwrap_or_default(),
        addr,
        &rest[authority_end..]
    )
}

/// A TCP proxy that forwards until [`BlackHoleProxy::black_hole`], then forwards nothing in
/// either direction and closes nothing, like a network path that silently drops every
/// packet. New connections are accepted and then ignored. Everything closes when dropped.
pub struct BlackHoleProxy {
    addr: SocketAddr,
    cut: CancellationToken,
    shutdown: CancellationToken,
    upstream: Arc<Mutex<Vec<SocketAddr>>>,
    connections: Arc<AtomicU64>,
}

impl BlackHoleProxy {
    pub async fn start(server: SocketAddr) -> BlackHoleProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the proxy");
        let addr = listener.local_addr().unwrap();
        let cut = CancellationToken::new();
        let shutdown = CancellationToken::new();
        let upstream = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicU64::new(0));
        tokio::spawn({
            let (cut, shutdown, upstream, connections) = (
                cut.clone(),
                shutdown.clone(),
                upstream.clone(),
                connections.clone(),
            );
            async move {
                loop {
                    let accepted = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        accepted = listener.accept() => accepted,
                    };
                    let Ok((down, _)) = accepted else { continue };
                    let (cut, shutdown, upstream) =
                        (cut.clone(), shutdown.clone(), upstream.clone());
                    connections.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(async move {
                        if cut.is_cancelled() {
                            // Accepted, never answered.
                            shutdown.cancelled().await;
                            drop(down);
                            return;
                        }
                        let Ok(up) = tokio::net::TcpStream::connect(server).await else {
                            return;
                        };
                        let _ = up.set_nodelay(true);
                        let _ = down.set_nodelay(true);
                        if let Ok(local) = up.local_addr() {
                            upstream.lock().unwrap().push(local);
                        }
                        let (down_read, down_write) = down.into_split();
                        let (up_read, up_write) = up.into_split();
                        tokio::join!(
                            pump(down_read, up_write, cut.clone(), shutdown.clone()),
                            pump(up_read, down_write, cut, shutdown),
                        );
                    });
                }
            }
        });
        BlackHoleProxy {
            addr,
            cut,
            shutdown,
            upstream,
            connections,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn black_hole(&self) {
        self.cut.cancel();
    }

    /// Local addresses of the proxy's connections to the server.
    pub fn upstream_addrs(&self) -> Vec<SocketAddr> {
        self.upstream.lock().unwrap().clone()
    }

    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

impl Drop for BlackHoleProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    cut: CancellationToken,
    shutdown: CancellationToken,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let read = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = cut.cancelled() => break,
            read = from.read(&mut buf) => read,
        };
        match read {
            Ok(n) if n > 0 && !cut.is_cancelled() => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            Ok(0) if !cut.is_cancelled() => {
                // An orderly close before the cut goes through.
                let _ = to.shutdown().await;
                return;
            }
            _ => break,
        }
    }
    // Black-holed: keep both sockets open and silent until the proxy goes.
    shutdown.cancelled().await;
    drop((from, to));
}

/// Firewall rules (iptables) that drop every packet of some connections between this host and
/// the server, so that the server's TCP keepalive probes go unanswered as on a real network
/// partition. A user-space proxy alone cannot do that: its kernel still acknowledges them.
/// Rules are tagged with this process's id and removed on drop; stale ones of dead processes
/// are removed by [`KernelBlackHole::available`].
pub struct KernelBlackHole {
    rules: Vec<Vec<String>>,
}

impl KernelBlackHole {
    fn tag() -> String {
        format!("steward-chaos-{}", std::process::id())
    }

    /// True when iptables can be used (root with CAP_NET_ADMIN).
    pub fn available() -> bool {
        let works = |chain: &str| {
            std::process::Command::new("iptables")
                .args(["-w", "-S", chain])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        };
        let (Some(output), Some(input)) = (works("OUTPUT"), works("INPUT")) else {
            return false;
        };
        // Rules left behind by a chaos run that was killed.
        for line in output.lines().chain(input.lines()) {
            let Some(pid) = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("steward-chaos-"))
            else {
                continue;
            };
            if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            if let Some(spec) = line.strip_prefix("-A ") {
                let mut args = vec!["-w".to_owned(), "-D".to_owned()];
                args.extend(spec.split_whitespace().map(str::to_owned));
                let _ = std::process::Command::new("iptables").args(&args).status();
            }
        }
        // Can rules actually be added here?
        let probe = [
            "-w",
            "-I",
            "OUTPUT",
            "-p",
            "tcp",
            "--dport",
            "9",
            "-m",
            "comment",
            "--comment",
        ];
        let added = std::process::Command::new("iptables")
            .args(probe)
            .args([Self::tag().as_str(), "-j", "DROP"])
            .status()
            .is_ok_and(|s| s.success());
        if added {
            let _ = std::process::Command::new("iptables")
                .args([
                    "-w",
                    "-D",
                    "OUTPUT",
                    "-p",
                    "tcp",
                    "--dport",
                    "9",
                    "-m",
                    "comment",
                    "--comment",
                ])
                .args([Self::tag().as_str(), "-j", "DROP"])
                .status();
        }
        added
    }

    /// Drops both directions of each connection between a local address in `locals` and the
    /// server.
    pub fn drop_connections(server: SocketAddr, locals: &[SocketAddr]) -> KernelBlackHole {
        let tag = Self::tag();
        let mut rules = Vec::new();
        for local in locals {
            let (lip, lport) = (local.ip().to_string(), local.port().to_string());
            let (sip, sport) = (server.ip().to_string(), server.port().to_string());
            let spec = |chain: &str, src: (&str, &str), dst: (&str, &str)| -> Vec<String> {
                [
                    chain,
                    "-p",
                    "tcp",
                    "-s",
                    src.0,
                    "--sport",
                    src.1,
                    "-d",
                    dst.0,
                    "--dport",
                    dst.1,
                    "-m",
                    "comment",
                    "--comment",
                    &tag,
                    "-j",
                    "DROP",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect()
            };
            // Packets this host sends to the server (data, ACKs, keepalive answers) ...
            rules.push(spec("OUTPUT", (&lip, &lport), (&sip, &sport)));
            // ... and packets the server sends to this host (its keepalive probes).
            rules.push(spec("INPUT", (&sip, &sport), (&lip, &lport)));
        }
        for rule in &rules {
            let status = std::process::Command::new("iptables")
                .args(["-w", "-I"])
                .args(rule)
                .status()
                .expect("running iptables");
            assert!(status.success(), "iptables -I {rule:?} failed");
        }
        KernelBlackHole { rules }
    }
}

impl Drop for KernelBlackHole {
    fn drop(&mut self) {
        for rule in &self.rules {
            let _ = std::process::Command::new("iptables")
                .args(["-w", "-D"])
                .args(rule)
                .status();
        }
    }
}
