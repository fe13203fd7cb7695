//! Per-link network faults between processes on loopback, without root.
//!
//! Every process has its own loopback IP ([`Node::ip`]); a proxy stands in
//! front of each listening address and tells senders apart by source IP.
//! [`Links`] is the fault table every proxy consults on each datagram
//! (UDP, for the QUIC links between replicas) or each chunk and each new
//! connection (TCP, for HTTP between workers and replicas):
//!
//! - `cut` drops everything on a directed link (one-way when only one
//!   direction is cut);
//! - `loss` drops that fraction of datagrams (UDP; on TCP any loss is a cut);
//! - `delay_ms` holds each datagram or chunk that long (datagrams can then
//!   overtake each other: reordering).
//!
//! A TCP connection whose link is cut is held open and silent (a black
//! hole, as a real partition looks), and dropped once the cut heals.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::rng::Rng;

/// A process of the cluster, or the harness's own clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Node {
    Replica(u64),
    Worker(u32),
    Client,
}

impl Node {
    pub fn ip(self) -> Ipv4Addr {
        match self {
            Node::Replica(i) => Ipv4Addr::new(127, 0, 0, 10 + i as u8),
            Node::Worker(w) => Ipv4Addr::new(127, 0, 0, 100 + w as u8),
            Node::Client => Ipv4Addr::LOCALHOST,
        }
    }

    pub fn from_ip(ip: IpAddr) -> Node {
        match ip {
            IpAddr::V4(v4) => match v4.octets() {
                [127, 0, 0, n] if (11..=60).contains(&n) => Node::Replica(u64::from(n - 10)),
                [127, 0, 0, n] if n >= 101 => Node::Worker(u32::from(n - 100)),
                _ => Node::Client,
            },
            IpAddr::V6(_) => Node::Client,
        }
    }
}

/// What happens on one directed link.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rule {
    pub cut: bool,
    pub loss: f64,
    pub delay_ms: u64,
}

#[derive(Debug)]
struct Table {
    rules: HashMap<(Node, Node), Rule>,
    rng: Rng,
}

/// The shared fault table.
#[derive(Clone, Debug)]
pub struct Links(Arc<Mutex<Table>>);

/// What a proxy does with one datagram or chunk.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Verdict {
    Pass(Duration),
    Drop,
}

impl Links {
    pub fn new(seed: u64) -> Links {
        Links(Arc::new(Mutex::new(Table {
            rules: HashMap::new(),
            rng: Rng::new(seed),
        })))
    }

    fn with<T>(&self, f: impl FnOnce(&mut Table) -> T) -> T {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut t)
    }

    pub fn set(&self, from: Node, to: Node, rule: Rule) {
        self.with(|t| {
            if rule == Rule::default() {
                t.rules.remove(&(from, to));
            } else {
                t.rules.insert((from, to), rule);
            }
        });
    }

    /// Cuts both directions between every node of `a` and every node of `b`.
    pub fn partition(&self, a: &[Node], b: &[Node]) {
        for x in a {
            for y in b {
                self.set(
                    *x,
                    *y,
                    Rule {
                        cut: true,
                        ..Rule::default()
                    },
                );
                self.set(
                    *y,
                    *x,
                    Rule {
                        cut: true,
                        ..Rule::default()
                    },
                );
            }
        }
    }

    pub fn heal(&self) {
        self.with(|t| t.rules.clear());
    }

    pub fn rule(&self, from: Node, to: Node) -> Rule {
        self.with(|t| t.rules.get(&(from, to)).copied().unwrap_or_default())
    }

    pub fn verdict(&self, from: Node, to: Node) -> Verdict {
        self.with(|t| {
            let Some(r) = t.rules.get(&(from, to)).copied() else {
                return Verdict::Pass(Duration::ZERO);
            };
            if r.cut || (r.loss > 0.0 && t.rng.unit() < r.loss) {
                Verdict::Drop
            } else {
                Verdict::Pass(Duration::from_millis(r.delay_ms))
            }
        })
    }

    fn blocked(&self, a: Node, b: Node) -> bool {
        self.rule(a, b).cut || self.rule(b, a).cut || self.rule(a, b).loss >= 1.0
    }
}

/// A UDP proxy in front of replica `target` (its QUIC socket at `upstream`).
/// Returns the address it listens on.
pub async fn udp(
    links: Links,
    target: Node,
    listen: SocketAddr,
    upstream: SocketAddr,
) -> std::io::Result<SocketAddr> {
    let front = Arc::new(UdpSocket::bind(listen).await?);
    let addr = front.local_addr()?;
    tokio::spawn(async move {
        let mut backs: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
        let mut buf = vec![0u8; 65_536];
        loop {
            let Ok((n, src)) = front.recv_from(&mut buf).await else {
                return;
            };
            let from = Node::from_ip(src.ip());
            let back = match backs.get(&src) {
                Some(b) => b.clone(),
                None => {
                    // The upstream socket keeps the sender's IP, so the
                    // target sees each peer at an address of its own.
                    let bind = SocketAddr::new(src.ip(), 0);
                    let Ok(sock) = UdpSocket::bind(bind).await else {
                        continue;
                    };
                    let sock = Arc::new(sock);
                    backs.insert(src, sock.clone());
                    let (front, sock2, links) = (front.clone(), sock.clone(), links.clone());
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65_536];
                        loop {
                            match sock2.recv(&mut buf).await {
                                Ok(n) => {
                                    if let Verdict::Pass(d) = links.verdict(target, from) {
                                        forward(front.clone(), buf[..n].to_vec(), Some(src), d)
                                            .await;
                                    }
                                }
                                // A connected UDP socket reports the ICMP
                                // "port unreachable" of a target that is down
                                // (not started yet, killed) as an error on the
                                // next recv; the target may come back on the
                                // same port, so keep listening.
                                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                            }
                        }
                    });
                    if sock.connect(upstream).await.is_err() {
                        continue;
                    }
                    sock
                }
            };
            if let Verdict::Pass(d) = links.verdict(from, target) {
                forward(back, buf[..n].to_vec(), None, d).await;
            }
        }
    });
    Ok(addr)
}

async fn forward(sock: Arc<UdpSocket>, data: Vec<u8>, to: Option<SocketAddr>, delay: Duration) {
    let send = async move {
        let _ = match to {
            Some(to) => sock.send_to(&data, to).await,
            None => sock.send(&data).await,
        };
    };
    if delay.is_zero() {
        // No delay: send in arrival order.
        send.await;
    } else {
        // Delayed datagrams travel on their own and may overtake others.
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            send.await;
        });
    }
}

/// A TCP proxy in front of `target` listening at `listen`, forwarding to
/// `upstream`. Returns the address it listens on.
pub async fn tcp(
    links: Links,
    target: Node,
    listen: SocketAddr,
    upstream: SocketAddr,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((conn, src)) = listener.accept().await else {
                return;
            };
            let from = Node::from_ip(src.ip());
            tokio::spawn(tcp_conn(links.clone(), from, target, conn, upstream));
        }
    });
    Ok(addr)
}

async fn tcp_conn(links: Links, from: Node, to: Node, conn: TcpStream, upstream: SocketAddr) {
    // A cut link is a black hole: hold the connection, say nothing, and
    // drop it once the cut heals (the client reconnects).
    if links.blocked(from, to) {
        while links.blocked(from, to) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        return;
    }
    let Ok(Ok(up)) =
        tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(upstream)).await
    else {
        return;
    };
    let _ = conn.set_nodelay(true);
    let _ = up.set_nodelay(true);
    let (cr, cw) = conn.into_split();
    let (ur, uw) = up.into_split();
    let a = tokio::spawn(pipe(links.clone(), from, to, cr, uw));
    let b = tokio::spawn(pipe(links.clone(), to, from, ur, cw));
    // Whichever side ends (or meets a cut) ends the connection.
    tokio::select! {
        _ = a => {},
        _ = b => {},
    }
}

async fn pipe(
    links: Links,
    from: Node,
    to: Node,
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if links.blocked(from, to) {
            // Hold the bytes until the cut heals, then drop the connection:
            // TCP cannot lose bytes, so a cut mid-stream kills the stream.
            while links.blocked(from, to) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            return;
        }
        let d = Duration::from_millis(links.rule(from, to).delay_ms);
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_round_trip_through_their_ips() {
        for n in [
            Node::Replica(1),
            Node::Replica(5),
            Node::Worker(1),
            Node::Worker(3),
            Node::Client,
        ] {
            assert_eq!(Node::from_ip(IpAddr::V4(n.ip())), n);
        }
    }

    #[test]
    fn rules_are_directed_and_heal() {
        let l = Links::new(1);
        let (a, b) = (Node::Replica(1), Node::Replica(2));
        l.set(
            a,
            b,
            Rule {
                cut: true,
                ..Rule::default()
            },
        );
        assert_eq!(l.verdict(a, b), Verdict::Drop);
        assert_eq!(l.verdict(b, a), Verdict::Pass(Duration::ZERO));
        l.set(
            b,
            a,
            Rule {
                delay_ms: 30,
                ..Rule::default()
            },
        );
        assert_eq!(l.verdict(b, a), Verdict::Pass(Duration::from_millis(30)));
        l.heal();
        assert_eq!(l.verdict(a, b), Verdict::Pass(Duration::ZERO));
        l.set(
            a,
            b,
            Rule {
                loss: 0.5,
                ..Rule::default()
            },
        );
        let dropped = (0..1000)
            .filter(|_| l.verdict(a, b) == Verdict::Drop)
            .count();
        assert!((350..650).contains(&dropped), "{dropped}");
    }

    #[tokio::test]
    async fn udp_proxy_forwards_and_cuts_by_source() {
        let links = Links::new(2);
        let server = UdpSocket::bind("127.0.0.11:0").await.expect("server");
        let upstream = server.local_addr().expect("addr");
        let front = udp(
            links.clone(),
            Node::Replica(1),
            "127.0.0.11:0".parse().expect("addr"),
            upstream,
        )
        .await
        .expect("proxy");
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = server.recv_from(&mut buf).await {
                let _ = server.send_to(&buf[..n], from).await;
            }
        });
        let c2 = UdpSocket::bind("127.0.0.12:0").await.expect("c2");
        let c3 = UdpSocket::bind("127.0.0.13:0").await.expect("c3");
        async fn echo_via(s: &UdpSocket, front: SocketAddr) -> bool {
            s.send_to(b"ping", front).await.expect("send");
            let mut buf = [0u8; 16];
            tokio::time::timeout(Duration::from_millis(300), s.recv(&mut buf))
                .await
                .is_ok()
        }
        let echo = |s| echo_via(s, front);
        assert!(echo(&c2).await && echo(&c3).await);
        // Cut only replica 2 -> replica 1: 2 hears nothing, 3 still does.
        links.set(
            Node::Replica(2),
            Node::Replica(1),
            Rule {
                cut: true,
                ..Rule::default()
            },
        );
        assert!(!echo(&c2).await);
        assert!(echo(&c3).await);
        // Cut only the way back to 3: its ping arrives, the echo is lost.
        links.heal();
        links.set(
            Node::Replica(1),
            Node::Replica(3),
            Rule {
                cut: true,
                ..Rule::default()
            },
        );
        assert!(!echo(&c3).await);
        assert!(echo(&c2).await);
    }

    #[tokio::test]
    async fn tcp_proxy_black_holes_a_cut_link() {
        let links = Links::new(3);
        let server = TcpListener::bind("127.0.0.1:0").await.expect("server");
        let upstream = server.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = server.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let front = tcp(
            links.clone(),
            Node::Replica(1),
            "127.0.0.11:0".parse().expect("addr"),
            upstream,
        )
        .await
        .expect("proxy");
        let roundtrip = |ip: &'static str| async move {
            let sock = tokio::net::TcpSocket::new_v4().expect("socket");
            sock.bind(format!("{ip}:0").parse().expect("bind"))
                .expect("bind");
            let mut s = sock.connect(front).await.expect("connect");
            s.write_all(b"hi").await.expect("write");
            let mut buf = [0u8; 2];
            matches!(
                tokio::time::timeout(Duration::from_millis(300), s.read_exact(&mut buf)).await,
                Ok(Ok(_))
            )
        };
        assert!(roundtrip("127.0.0.101").await);
        links.partition(&[Node::Worker(1)], &[Node::Replica(1)]);
        assert!(!roundtrip("127.0.0.101").await);
        assert!(roundtrip("127.0.0.102").await);
        links.heal();
        assert!(roundtrip("127.0.0.101").await);
    }
}
