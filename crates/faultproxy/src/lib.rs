//! A TCP proxy for one directed link (e.g. region A's processes reaching
//! region C's coordinators) with controls for the faults a WAN has:
//!
//! - **latency**: every byte is delivered `latency` after it was read, in
//!   order, in both directions (so a round trip costs twice the setting);
//! - **partition**: existing connections are cut at once, and new ones are
//!   accepted but blackholed — nothing is forwarded, as when packets are
//!   dropped — until the link heals, when they are closed.
//!
//! It never interprets the bytes, and it only ever connects to its target.

use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Controls shared by every connection of one link.
#[derive(Debug)]
pub struct LinkControl {
    partitioned: AtomicBool,
    latency_us: AtomicU64,
    /// Bumped on every partition and heal: connections from an older
    /// generation close.
    generation: watch::Sender<u64>,
}

impl LinkControl {
    fn new() -> Arc<Self> {
        Arc::new(LinkControl {
            partitioned: AtomicBool::new(false),
            latency_us: AtomicU64::new(0),
            generation: watch::channel(0).0,
        })
    }

    /// Cuts the link: open connections close, new ones hang.
    pub fn partition(&self) {
        if !self.partitioned.swap(true, Ordering::SeqCst) {
            self.generation.send_modify(|g| *g += 1);
        }
    }

    /// Restores the link; connections blackholed meanwhile are closed so
    /// their clients reconnect.
    pub fn heal(&self) {
        if self.partitioned.swap(false, Ordering::SeqCst) {
            self.generation.send_modify(|g| *g += 1);
        }
    }

    pub fn is_partitioned(&self) -> bool {
        self.partitioned.load(Ordering::SeqCst)
    }

    /// One-way delay added to every byte.
    pub fn set_latency(&self, latency: Duration) {
        self.latency_us
            .store(latency.as_micros() as u64, Ordering::SeqCst);
    }

    pub fn latency(&self) -> Duration {
        Duration::from_micros(self.latency_us.load(Ordering::SeqCst))
    }
}

/// A running proxy; dropping it stops accepting (open connections end when
/// their peers close or the link is partitioned).
pub struct FaultProxy {
    addr: SocketAddr,
    control: Arc<LinkControl>,
    accept: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on `listen` (port 0 for a free one) and forwards to `target`.
    pub async fn start(listen: &str, target: String) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let control = LinkControl::new();
        let accept = tokio::spawn(accept_loop(listener, target, control.clone()));
        Ok(FaultProxy {
            addr,
            control,
            accept,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn control(&self) -> &Arc<LinkControl> {
        &self.control
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, target: String, control: Arc<LinkControl>) {
    loop {
        let (client, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(err) => {
                tracing::warn!(error = %err, "fault proxy accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = client.set_nodelay(true);
        tokio::spawn(serve(client, target.clone(), control.clone()));
    }
}

async fn serve(client: TcpStream, target: String, control: Arc<LinkControl>) {
    let mut generation = control.generation.subscribe();
    generation.mark_unchanged();
    if control.is_partitioned() {
        // Blackhole: hold the connection silently until the link heals.
        let _ = generation.changed().await;
        return;
    }
    let upstream = match TcpStream::connect(&target).await {
        Ok(upstream) => upstream,
        Err(_) => return,
    };
    let _ = upstream.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let forward = pump(client_read, upstream_write, control.clone());
    let backward = pump(upstream_read, client_write, control.clone());
    tokio::select! {
        _ = async { tokio::join!(forward, backward) } => {},
        _ = generation.changed() => {}, // partitioned (or healed): cut
    }
}

/// Copies one direction, delaying each chunk by the link's latency while
/// keeping chunks in order and reading ahead (a pipe, not stop-and-wait).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    control: Arc<LinkControl>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Bytes)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let due = Instant::now() + control.latency();
                    if tx.send((due, Bytes::copy_from_slice(&buf[..n]))).is_err() {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = socket.read(&mut buf).await {
                        if n == 0 || socket.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn round_trip(addr: SocketAddr) -> std::io::Result<Duration> {
        let mut socket = TcpStream::connect(addr).await?;
        let started = Instant::now();
        socket.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        socket.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"ping");
        Ok(started.elapsed())
    }

    #[tokio::test]
    async fn forwards_and_adds_latency_both_ways() {
        let proxy = FaultProxy::start("127.0.0.1:0", echo_server().await.to_string())
            .await
            .unwrap();
        assert!(round_trip(proxy.addr()).await.unwrap() < Duration::from_millis(50));
        proxy.control().set_latency(Duration::from_millis(40));
        let rtt = round_trip(proxy.addr()).await.unwrap();
        assert!(rtt >= Duration::from_millis(80), "{rtt:?}");
    }

    #[tokio::test]
    async fn partition_cuts_and_blackholes_until_heal() {
        let proxy = FaultProxy::start("127.0.0.1:0", echo_server().await.to_string())
            .await
            .unwrap();
        let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
        open.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        open.read_exact(&mut one).await.unwrap();

        proxy.control().partition();
        // The open connection is cut.
        let cut = tokio::time::timeout(Duration::from_secs(2), open.read(&mut one))
            .await
            .unwrap();
        assert!(matches!(cut, Ok(0) | Err(_)));
        // A new one connects but nothing comes back.
        let blackholed =
            tokio::time::timeout(Duration::from_millis(300), round_trip(proxy.addr())).await;
        assert!(blackholed.is_err(), "no answer through a partition");

        proxy.control().heal();
        round_trip(proxy.addr()).await.unwrap();
    }
}
