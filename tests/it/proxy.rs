//! A TCP proxy for fault injection, placed between the worker (or producer) and RabbitMQ or
//! Postgres. A test can drop every connection at once, refuse new ones for a while, or swallow
//! the server's replies before dropping (so a `COMMIT` reaches the server but its answer does not
//! reach the client).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

struct State {
    upstream: SocketAddr,
    /// New connections are refused (accepted and closed) while false.
    up: AtomicBool,
    /// Connections refused so far.
    refused: AtomicU64,
    /// Connections accepted (not refused) so far.
    accepted: AtomicU64,
    /// Connections accepted and not ended yet (see [`OpenGuard`]).
    open: AtomicU64,
    /// Server-to-client bytes are dropped while true.
    swallow_replies: AtomicBool,
    /// Swallowed server reads that held a `COMMIT` command tag, over every connection.
    commits_swallowed: AtomicU64,
    /// Simple queries `SELECT 1` clients sent (a readiness ping), over every connection.
    pings: AtomicU64,
    /// Cancelling it drops every connection opened under it.
    generation: Mutex<CancellationToken>,
    /// Cancelled by [`Proxy::freeze_open_connections`] for the connections open then.
    freeze: Mutex<CancellationToken>,
    /// Cancelled by [`Proxy::hold_open_connections`] for the connections open then.
    hold: Mutex<CancellationToken>,
    /// Cancelled by [`Proxy::release_held`].
    released: CancellationToken,
}

/// Share it with `Arc` where a fault hook needs it.
pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<State>,
    shutdown: CancellationToken,
}

impl Proxy {
    pub async fn start(upstream: &str) -> Self {
        let upstream: SocketAddr = upstream.parse().expect("upstream address");
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(State {
            upstream,
            up: AtomicBool::new(true),
            refused: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            open: AtomicU64::new(0),
            swallow_replies: AtomicBool::new(false),
            commits_swallowed: AtomicU64::new(0),
            pings: AtomicU64::new(0),
            generation: Mutex::new(CancellationToken::new()),
            freeze: Mutex::new(CancellationToken::new()),
            hold: Mutex::new(CancellationToken::new()),
            released: CancellationToken::new(),
        });
        let shutdown = CancellationToken::new();
        let accept_state = state.clone();
        let accept_shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(pair) => pair,
                        Err(_) => continue,
                    },
                    _ = accept_shutdown.cancelled() => return,
                };
                // `up` read under the generation lock that a cut holds while it flips it: a
                // connection accepted during a cut is refused or dropped with the rest (and
                // counted open under that lock: a cut's count includes it).
                let (token, open) = {
                    let generation = accept_state.generation.lock().unwrap();
                    if !accept_state.up.load(Ordering::SeqCst) {
                        drop(client);
                        accept_state.refused.fetch_add(1, Ordering::SeqCst);
                        continue;
                    }
                    accept_state.accepted.fetch_add(1, Ordering::SeqCst);
                    (
                        generation.child_token(),
                        OpenGuard::new(accept_state.clone()),
                    )
                };
                let freeze = accept_state.freeze.lock().unwrap().clone();
                let hold = accept_state.hold.lock().unwrap().clone();
                tokio::spawn(async move {
                    let state = open.0.clone();
                    serve(client, state, token, freeze, hold).await;
                    drop(open);
                });
            }
        });
        Self {
            addr,
            state,
            shutdown,
        }
    }

    /// Drops every open connection at once; new connections are still accepted. Returns how
    /// many connections were open (accepted and not ended) when it dropped them.
    pub fn drop_connections(&self) -> u64 {
        self.next_generation(None)
    }

    /// Drops every connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.next_generation(Some(false));
    }

    /// How many connections were accepted (not refused) so far.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// Cancels the connections open now and starts a new generation, setting `up` (if given)
    /// under the same lock the accept loop reads it under.
    /// Returns how many connections were open then.
    fn next_generation(&self, up: Option<bool>) -> u64 {
        let mut generation = self.state.generation.lock().unwrap();
        if let Some(up) = up {
            self.state.up.store(up, Ordering::SeqCst);
        }
        let open = self.state.open.load(Ordering::SeqCst);
        generation.cancel();
        *generation = CancellationToken::new();
        open
    }

    pub fn restore(&self) {
        self.state.swallow_replies.store(false, Ordering::SeqCst);
        self.state.up.store(true, Ordering::SeqCst);
    }

    /// The connections open now go silent both ways and stay open (a host that vanished without
    /// a reset: the client's data sits unanswered until TCP gives up); new connections work.
    pub fn freeze_open_connections(&self) {
        let mut freeze = self.state.freeze.lock().unwrap();
        freeze.cancel();
        *freeze = CancellationToken::new();
    }

    /// The connections open now keep what their clients send until [`Proxy::release_held`],
    /// even once the client has closed: then it reaches the server, whose side stays open
    /// until a cut (a request overtaken by one sent later on another connection, such as a
    /// cancel request). New connections work.
    pub fn hold_open_connections(&self) {
        let mut hold = self.state.hold.lock().unwrap();
        hold.cancel();
        *hold = CancellationToken::new();
    }

    /// Forwards what [`Proxy::hold_open_connections`] held, and what follows.
    pub fn release_held(&self) {
        self.state.released.cancel();
    }

    /// How many connections were refused while cut: a client's attempts.
    pub fn refused(&self) -> u64 {
        self.state.refused.load(Ordering::SeqCst)
    }

    /// How many swallowed replies held Postgres's `COMMIT` command tag: the server has carried
    /// out a `COMMIT` whose answer the client will never see.
    pub fn commits_swallowed(&self) -> u64 {
        self.state.commits_swallowed.load(Ordering::SeqCst)
    }

    /// How many simple queries `SELECT 1` (readiness pings) clients sent through the proxy.
    pub fn pings(&self) -> u64 {
        self.state.pings.load(Ordering::SeqCst)
    }

    /// Stops forwarding the server's replies (requests still flow) until the next cut: what the
    /// client sends now is processed by the server, but the client never learns the outcome.
    pub fn swallow_replies(&self) {
        self.state.swallow_replies.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.state.generation.lock().unwrap().cancel();
    }
}

/// One accepted connection, counted open from its acceptance until this guard drops (when
/// the connection's task ends, however it ends).
struct OpenGuard(Arc<State>);

impl OpenGuard {
    fn new(state: Arc<State>) -> Self {
        state.open.fetch_add(1, Ordering::SeqCst);
        Self(state)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve(
    client: TcpStream,
    state: Arc<State>,
    token: CancellationToken,
    freeze: CancellationToken,
    hold: CancellationToken,
) {
    let Ok(server) = TcpStream::connect(state.upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let requests = async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut held = Vec::new();
        let mut client_gone = false;
        loop {
            if hold.is_cancelled() && !state.released.is_cancelled() {
                // Held: keep what the client sends (and its going) until the release.
                tokio::select! {
                    // A reset counts as gone too: the client may close with replies unread.
                    read = client_read.read(&mut buf), if !client_gone => match read {
                        Ok(0) | Err(_) => client_gone = true,
                        Ok(n) => held.extend_from_slice(&buf[..n]),
                    },
                    _ = state.released.cancelled() => {}
                }
                continue;
            }
            if !held.is_empty() {
                server_write.write_all(&std::mem::take(&mut held)).await?;
            }
            if client_gone {
                // The server's side stays open: it runs what it was sent, unaware.
                std::future::pending::<()>().await;
            }
            let n = client_read.read(&mut buf).await?;
            if hold.is_cancelled() && !state.released.is_cancelled() {
                // Held while this read waited: these bytes are the first held.
                match n {
                    0 => client_gone = true,
                    n => held.extend_from_slice(&buf[..n]),
                }
                continue;
            }
            if n == 0 || !may_forward(&token, &freeze).await {
                return Ok::<(), std::io::Error>(());
            }
            // A read may split one; the worker's pings are small and far apart.
            let pings = buf[..n].windows(9).filter(|w| w == b"SELECT 1\0").count();
            state.pings.fetch_add(pings as u64, Ordering::SeqCst);
            server_write.write_all(&buf[..n]).await?;
        }
    };
    let replies = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = server_read.read(&mut buf).await?;
            if n == 0 || !may_forward(&token, &freeze).await {
                return Ok::<(), std::io::Error>(());
            }
            if !state.swallow_replies.load(Ordering::SeqCst) {
                client_write.write_all(&buf[..n]).await?;
            } else if buf[..n].windows(7).any(|w| w == b"COMMIT\0") {
                // A CommandComplete tag (a read may split one; then the next commit counts).
                state.commits_swallowed.fetch_add(1, Ordering::SeqCst);
            }
        }
    };
    // Either side closing, an error, or a cut ends both directions; dropping the halves closes
    // the sockets. The cut is polled first: a task woken by the cut may find bytes the client
    // wrote after it, and they must not be forwarded (a fault test cuts, then lets the worker
    // ack, and counts on that ack being lost).
    tokio::select! {
        biased;
        _ = token.cancelled() => {}
        // Frozen: nothing is forwarded any more, and the sockets stay open until a cut.
        _ = freeze.cancelled() => token.cancelled().await,
        _ = requests => {}
        _ = replies => {}
    }
}

/// Whether bytes just read may be forwarded. Not after a cut, even one made while they were
/// read (they are dropped, as the cut's would be); never while frozen (pending: the select's
/// freeze branch takes over).
async fn may_forward(token: &CancellationToken, freeze: &CancellationToken) -> bool {
    if freeze.is_cancelled() && !token.is_cancelled() {
        std::future::pending::<()>().await;
    }
    !token.is_cancelled()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// What a client writes after `cut` returned never reaches the server, however soon it
    /// writes: the fault tests cut and then let the worker ack or commit, and count on that ack
    /// or commit being lost (a multi-threaded runtime may not have run the forwarding task yet).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nothing_written_after_a_cut_is_forwarded() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let proxy = Proxy::start(&upstream.local_addr().expect("addr").to_string()).await;
        for round in 0..200 {
            let mut client = TcpStream::connect(proxy.addr).await.expect("connect");
            let (mut server, _) = upstream.accept().await.expect("accept");
            // The connection forwards before the cut.
            client.write_all(b"before").await.expect("write");
            let mut before = [0u8; 6];
            server.read_exact(&mut before).await.expect("read before");
            proxy.cut();
            // The client's write may succeed locally; it must not be forwarded.
            let _ = client.write_all(b"after").await;
            let mut rest = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(5), server.read_to_end(&mut rest))
                .await
                .expect("the proxy closes the server side after a cut");
            assert!(
                rest.is_empty(),
                "round {round}: {:?} was forwarded after the cut ({read:?})",
                String::from_utf8_lossy(&rest)
            );
            proxy.restore();
        }
    }
}
