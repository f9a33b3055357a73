//! Serving HTTP: a router on hyper, with limits no client can get around.
//!
//! A connection must send a request's head within [`Limits::header_read_timeout`] (an idle
//! keep-alive connection is closed after as long), and at most [`Limits::max_connections`]
//! are open at once. Without them, a client opening connections that never finish a request
//! held a file descriptor with each, until the process could open no file: the API stopped
//! answering, checkpoints failed and the queries with them. When every connection is taken, a
//! new one takes the place of the one that has waited longest without a request in progress
//! (one that never sent a whole request head, or idles between requests): 300 connections
//! that sent nothing held every place for the header timeout, and `/livez` waited 10 s behind
//! them, long enough for an orchestrator to restart a healthy process. Once the server starts reading a request's body, the whole body must
//! arrive within [`Limits::body_read_timeout`]: a client trickling a body a byte at a time held
//! its connection (and a request's turn) for as long as it liked. A request still receiving
//! its body is the client's to finish, not the server's: when every place is taken, such a
//! connection gives its place as one without a request does (the one whose body began
//! longest ago first), so that clients trickling bodies on every connection cannot keep
//! `/livez` waiting for the body timeout.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

/// What a client may hold of the server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time to send a request's head (and the longest a keep-alive connection idles).
    pub header_read_timeout: Duration,
    /// Time to receive a request's whole body, from the server's first read of it.
    pub body_read_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
    /// How long open requests may finish once the server is told to stop.
    pub drain: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
            max_connections: 256,
            drain: Duration::from_secs(10),
        }
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then lets open requests finish
/// (for at most [`Limits::drain`]).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let open = Arc::new(std::sync::Mutex::new(OpenConnections::default()));
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, most likely: wait for some to close.
                    warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(tokio::sync::TryAcquireError::Closed) => break,
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                // Until a place frees, the connection waiting longest gives its own.
                let waited = loop {
                    if let Ok(mut open) = open.lock() {
                        open.close_longest_waiting();
                    }
                    tokio::select! {
                        permit = permits.clone().acquire_owned() => break permit.ok(),
                        () = tokio::time::sleep(MIN_WAIT_BEFORE_CLOSING / 2) => {}
                        () = &mut shutdown => break None,
                    }
                };
                match waited {
                    Some(permit) => permit,
                    None => break,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let timeout = limits.body_read_timeout;
        let activity = Arc::new(Activity::new());
        let (started, ended) = (activity.clone(), activity.clone());
        let app = tower::ServiceBuilder::new()
            // A request is in progress until its response's body has been sent (or dropped):
            // a stream of events answered at once and sent for hours is one.
            .map_response(move |response: axum::response::Response| {
                let ended = InProgress(ended.clone());
                response.map(|body| {
                    axum::body::Body::new(UntilSent {
                        body,
                        _ended: ended,
                    })
                })
            })
            .map_request(move |request: axum::http::Request<Incoming>| {
                started.request_started();
                let activity = started.clone();
                request
                    .map(|body| axum::body::Body::new(BodyDeadline::new(body, timeout, activity)))
            })
            .service(app.clone());
        let connection =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
        let connection = graceful.watch(connection);
        let id = activity.id;
        let registry = open.clone();
        // Registered under the lock its end takes to leave: it cannot leave before it is in.
        let Ok(mut connections) = open.lock() else {
            break;
        };
        let task = tokio::spawn(async move {
            // Leaves the registry however the connection ends (a handler's panic too).
            let _leave = Leave { registry, id };
            if let Err(e) = connection.await {
                debug!(error = %e, "connection closed");
            }
            drop(permit);
        });
        connections
            .connections
            .insert(id, (activity, task.abort_handle()));
    }
    drop(listener);
    if tokio::time::timeout(limits.drain, graceful.shutdown())
        .await
        .is_err()
    {
        warn!(
            "requests still open {:?} after the stop: closing them",
            limits.drain
        );
    }
}

/// The open connections, by id, with what they are doing and how to close them.
#[derive(Default)]
struct OpenConnections {
    connections: std::collections::HashMap<u64, (Arc<Activity>, tokio::task::AbortHandle)>,
}

impl OpenConnections {
    /// Closes the connection that has waited longest without a request in progress (or with
    /// a request still receiving its body), if one has waited at least
    /// [`MIN_WAIT_BEFORE_CLOSING`] (a client that has just connected is sending its request).
    fn close_longest_waiting(&mut self) {
        // Connections without a request first, then those still receiving a body (an
        // upload begun long ago gives its place only when no idle connection can).
        let longest = self
            .connections
            .iter()
            .filter_map(|(id, (activity, _))| {
                activity
                    .waiting_since()
                    .map(|(receiving, t)| (receiving, t, *id))
            })
            .filter(|(_, since, _)| since.elapsed() >= MIN_WAIT_BEFORE_CLOSING)
            .min();
        if let Some((_, since, id)) = longest
            && let Some((activity, abort)) = self.connections.get(&id)
            // A request may have begun since it was chosen.
            && activity.waiting_since().is_some()
        {
            debug!(waited = ?since.elapsed(), "every connection taken: closing the one waiting longest");
            abort.abort();
            self.connections.remove(&id);
        }
    }
}

/// How long a connection without a request in progress keeps its place however many others
/// wait for one.
const MIN_WAIT_BEFORE_CLOSING: Duration = Duration::from_millis(250);

/// What one connection is doing: requests in progress, and since when it has had none;
/// request bodies being received, and since when.
struct Activity {
    id: u64,
    in_progress: std::sync::atomic::AtomicUsize,
    waiting_since: std::sync::Mutex<std::time::Instant>,
    receiving: std::sync::atomic::AtomicUsize,
    receiving_since: std::sync::Mutex<std::time::Instant>,
}

impl Activity {
    fn new() -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Self {
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            in_progress: std::sync::atomic::AtomicUsize::new(0),
            waiting_since: std::sync::Mutex::new(std::time::Instant::now()),
            receiving: std::sync::atomic::AtomicUsize::new(0),
            receiving_since: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }

    fn body_started(&self) {
        if let Ok(mut since) = self.receiving_since.lock() {
            *since = std::time::Instant::now();
        }
        self.receiving
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn body_ended(&self) {
        self.receiving
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn request_started(&self) {
        self.in_progress
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn request_ended(&self) {
        if let Ok(mut since) = self.waiting_since.lock() {
            *since = std::time::Instant::now();
        }
        self.in_progress
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Since when it has waited on its client: had no request in progress (`false`), or had
    /// every request in progress still receiving its body (`true`); `None` while the server
    /// works on one.
    fn waiting_since(&self) -> Option<(bool, std::time::Instant)> {
        let in_progress = self.in_progress.load(std::sync::atomic::Ordering::SeqCst);
        if in_progress == 0 {
            return self.waiting_since.lock().ok().map(|t| (false, *t));
        }
        if self.receiving.load(std::sync::atomic::Ordering::SeqCst) >= in_progress {
            return self.receiving_since.lock().ok().map(|t| (true, *t));
        }
        None
    }
}

/// Removes a connection from the registry when its task ends, however it ends.
struct Leave {
    registry: Arc<std::sync::Mutex<OpenConnections>>,
    id: u64,
}

impl Drop for Leave {
    fn drop(&mut self) {
        if let Ok(mut open) = self.registry.lock() {
            open.connections.remove(&self.id);
        }
    }
}

/// A request in progress on a connection, ended when dropped.
struct InProgress(Arc<Activity>);

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

/// A response body that keeps its request in progress until it is sent or dropped.
struct UntilSent {
    body: axum::body::Body,
    _ended: InProgress,
}

impl Body for UntilSent {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A request body that fails once [`Limits::body_read_timeout`] has passed since it was
/// first read and it has not ended: the handler then answers with the error, and the
/// connection closes.
struct BodyDeadline {
    inner: Incoming,
    timeout: Duration,
    /// Started at the first read: a request waiting for its turn before it reads its body is
    /// not the client's delay.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Its connection's activity: the body is being received from its first read that does
    /// not end it until it ends, fails or is dropped.
    activity: Arc<Activity>,
    receiving: bool,
}

impl BodyDeadline {
    fn new(inner: Incoming, timeout: Duration, activity: Arc<Activity>) -> Self {
        Self {
            inner,
            timeout,
            deadline: None,
            activity,
            receiving: false,
        }
    }

    fn received(&mut self) {
        if std::mem::take(&mut self.receiving) {
            self.activity.body_ended();
        }
    }
}

impl Drop for BodyDeadline {
    fn drop(&mut self) {
        self.received();
    }
}

impl Body for BodyDeadline {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            if !matches!(frame, Some(Ok(_))) || this.inner.is_end_stream() {
                this.received();
            } else if this.deadline.is_none() && !this.receiving {
                // A body in several frames: the client's from the first on.
                this.receiving = true;
                this.activity.body_started();
            }
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if !this.receiving && this.deadline.is_none() {
            this.receiving = true;
            this.activity.body_started();
        }
        let timeout = this.timeout;
        let deadline = this
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => {
                this.received();
                Poll::Ready(Some(Err(format!(
                    "the request body did not arrive within {timeout:?}"
                )
                .into())))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// [`serve`] on a task of its own, until [`Serving::stop`].
    struct Serving {
        stop: tokio::sync::oneshot::Sender<()>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Serving {
        fn start(listener: TcpListener, app: Router, limits: Limits) -> Self {
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(serve(listener, app, limits, async {
                let _ = stopped.await;
            }));
            Self { stop, task }
        }

        /// Stops it; it must end within 10 s.
        async fn stop(self) {
            let _ = self.stop.send(());
            tokio::time::timeout(Duration::from_secs(10), self.task)
                .await
                .expect("the server stops")
                .expect("server task");
        }
    }

    /// Reads what the server sends until it closes the connection.
    async fn until_closed(stream: &mut TcpStream) -> String {
        let mut out = Vec::new();
        let _ = stream.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Asks `/livez` on a connection of its own; it must answer `ok`.
    async fn live(address: std::net::SocketAddr) {
        let mut s = TcpStream::connect(address).await.expect("connect");
        s.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let answered = until_closed(&mut s).await;
        assert!(
            answered.starts_with("HTTP/1.1 200") && answered.ends_with("ok"),
            "{answered}"
        );
    }

    /// Connections that never finish a request's head are closed, and however many a client
    /// opens, the server goes on answering others (it once kept every one open, until it
    /// ran out of file descriptors).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unfinished_requests_are_closed_and_cannot_starve_the_server() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let app = Router::new()
            .route("/livez", axum::routing::get(|| async { "ok" }))
            .route(
                "/echo",
                axum::routing::post(|body: Bytes| async move { format!("{} bytes", body.len()) }),
            );
        let limits = Limits {
            header_read_timeout: Duration::from_millis(300),
            body_read_timeout: Duration::from_millis(500),
            max_connections: 4,
            drain: Duration::from_secs(1),
        };
        let server = Serving::start(listener, app, limits);

        let mut slow = Vec::new();
        for _ in 0..40 {
            let mut s = TcpStream::connect(address).await.expect("connect");
            s.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
                .await
                .expect("write");
            slow.push(s);
        }
        tokio::time::timeout(Duration::from_secs(30), live(address))
            .await
            .expect("a request behind 40 unfinished ones is answered");
        // Bodies trickled: each request is answered with the reason once the body's time is
        // up, and its connection closed; a whole body is read as before. (Fewer than the
        // places: with every place taken, the one whose body began first would give its
        // place to a newcomer, `trickled_bodies_give_their_place_to_a_request`.)
        let mut trickled = Vec::new();
        for _ in 0..3 {
            let mut s = TcpStream::connect(address).await.expect("connect");
            s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123")
                .await
                .expect("write");
            trickled.push(s);
        }
        for mut s in trickled {
            let answer = tokio::time::timeout(Duration::from_secs(30), async {
                for _ in 0..100 {
                    if s.write_all(b"5").await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                until_closed(&mut s).await
            })
            .await
            .expect("a trickled body is cut off");
            assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        }
        let mut s = TcpStream::connect(address).await.expect("connect");
        s.write_all(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 4\r\n\r\nabcd",
        )
        .await
        .expect("write");
        let answered = until_closed(&mut s).await;
        assert!(answered.ends_with("4 bytes"), "{answered}");
        for mut s in slow {
            let closed = tokio::time::timeout(Duration::from_secs(30), until_closed(&mut s))
                .await
                .expect("an unfinished request is closed");
            assert!(!closed.contains("200"), "{closed}");
        }
        server.stop().await;
    }

    /// Requests whose bodies trickle in a byte at a time on every connection cannot keep a
    /// request out for the body timeout: a request still receiving its body is the
    /// client's to finish, and its connection gives its place as a silent one does (the
    /// place was held until the body timeout, `/livez` waiting behind).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn trickled_bodies_give_their_place_to_a_request() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let app = Router::new()
            .route("/livez", axum::routing::get(|| async { "ok" }))
            .route(
                "/echo",
                axum::routing::post(|body: String| async move { body }),
            );
        // Both timeouts far beyond the test's: only giving a trickling body's place can make
        // room.
        let limits = Limits {
            header_read_timeout: Duration::from_secs(600),
            body_read_timeout: Duration::from_secs(600),
            max_connections: 4,
            drain: Duration::from_secs(1),
        };
        let server = Serving::start(listener, app, limits);
        // A whole body is answered.
        let mut whole = TcpStream::connect(address).await.expect("connect");
        whole
            .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello")
            .await
            .expect("write");
        let answered = until_closed(&mut whole).await;
        assert!(answered.ends_with("hello"), "{answered}");
        // Every place taken by a body of 100 bytes sent one at a time.
        let mut trickling = Vec::new();
        for _ in 0..4 {
            let mut s = TcpStream::connect(address).await.expect("connect");
            s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nx")
                .await
                .expect("write");
            trickling.push(s);
        }
        let (done, mut stop_trickling) = tokio::sync::watch::channel(false);
        let trickler = tokio::spawn(async move {
            loop {
                for s in &mut trickling {
                    let _ = s.write_all(b"x").await;
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stop_trickling.wait_for(|d| *d) => return trickling,
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        tokio::time::timeout(Duration::from_secs(60), live(address))
            .await
            .expect("a request behind 4 trickling bodies is answered");
        let _ = done.send(true);
        let mut trickling = trickler.await.expect("trickler");
        // One of them gave its place: closed without an answer.
        let (closed, _, _) = tokio::time::timeout(
            Duration::from_secs(60),
            futures::future::select_all(trickling.iter_mut().map(|s| Box::pin(until_closed(s)))),
        )
        .await
        .expect("a trickling connection is closed");
        assert!(closed.is_empty(), "{closed}");
        drop(trickling);
        server.stop().await;
    }

    /// Connections that send nothing cannot keep a request out for the header timeout:
    /// when every place is taken, the one that has waited longest without a request in
    /// progress is closed for the newcomer (300 such connections held `/livez` for 10 s). A
    /// request in progress keeps its place.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn silent_connections_give_their_place_to_a_request() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (release, released) = tokio::sync::watch::channel(false);
        let streamed = released.clone();
        let app = Router::new()
            .route("/livez", axum::routing::get(|| async { "ok" }))
            .route(
                "/slow",
                axum::routing::get(move || {
                    let mut released = released.clone();
                    async move {
                        let _ = released.wait_for(|r| *r).await;
                        "done"
                    }
                }),
            )
            // Answered at once, its body sent until released (as the dashboard's events).
            .route(
                "/stream",
                axum::routing::get(move || {
                    let mut released = streamed.clone();
                    let body = futures::StreamExt::chain(
                        futures::stream::once(async { Ok::<_, std::io::Error>("first ") }),
                        futures::stream::once(async move {
                            let _ = released.wait_for(|r| *r).await;
                            Ok("last")
                        }),
                    );
                    async move { axum::body::Body::from_stream(body) }
                }),
            );
        // The header timeout far beyond the test's: only the closing of a silent connection
        // can make room.
        let limits = Limits {
            header_read_timeout: Duration::from_secs(600),
            body_read_timeout: Duration::from_secs(600),
            max_connections: 4,
            drain: Duration::from_secs(1),
        };
        let server = Serving::start(listener, app, limits);
        // A request in progress, then silent connections filling the other places and more.
        let mut slow = TcpStream::connect(address).await.expect("connect");
        slow.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut stream = TcpStream::connect(address).await.expect("connect");
        stream
            .write_all(b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut silent = Vec::new();
        for _ in 0..30 {
            silent.push(TcpStream::connect(address).await.expect("connect"));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        tokio::time::timeout(Duration::from_secs(60), live(address))
            .await
            .expect("a request behind 30 silent connections is answered");
        // The requests in progress kept their places: answered, and streamed, to the end.
        let _ = release.send(true);
        let done = tokio::time::timeout(Duration::from_secs(60), until_closed(&mut slow))
            .await
            .expect("the slow request ends");
        assert!(done.ends_with("done"), "{done}");
        let streamed = tokio::time::timeout(Duration::from_secs(60), until_closed(&mut stream))
            .await
            .expect("the stream ends");
        assert!(
            streamed.contains("first") && streamed.contains("last"),
            "{streamed}"
        );
        drop(silent);
        server.stop().await;
    }
}
