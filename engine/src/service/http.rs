//! Serving HTTP: a router on hyper, with limits no client can get around.
//!
//! A connection must send a request's head within [`Limits::header_read_timeout`] (an idle
//! keep-alive connection is closed after as long), and at most [`Limits::max_connections`]
//! are open at once (more wait in the listen backlog until one closes). Without them, a
//! client opening connections that never finish a request held a file descriptor with each,
//! until the process could open no file: the API stopped answering, checkpoints failed and
//! the queries with them.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
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
    /// Connections open at once.
    pub max_connections: usize,
    /// How long open requests may finish once the server is told to stop.
    pub drain: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
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
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
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
        let _ = stream.set_nodelay(true);
        let connection =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(error = %e, "connection closed");
            }
            drop(permit);
        });
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// Reads what the server sends until it closes the connection.
    async fn until_closed(stream: &mut TcpStream) -> String {
        let mut out = Vec::new();
        let _ = stream.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Connections that never finish a request's head are closed, and however many a client
    /// opens, the server goes on answering others (it once kept every one open, until it
    /// ran out of file descriptors).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unfinished_requests_are_closed_and_cannot_starve_the_server() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let app = Router::new().route("/livez", axum::routing::get(|| async { "ok" }));
        let limits = Limits {
            header_read_timeout: Duration::from_millis(300),
            max_connections: 4,
            drain: Duration::from_secs(1),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, app, limits, async {
            let _ = stopped.await;
        }));

        let mut slow = Vec::new();
        for _ in 0..40 {
            let mut s = TcpStream::connect(address).await.expect("connect");
            s.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
                .await
                .expect("write");
            slow.push(s);
        }
        let answered = tokio::time::timeout(Duration::from_secs(30), async {
            let mut s = TcpStream::connect(address).await.expect("connect");
            s.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .expect("write");
            until_closed(&mut s).await
        })
        .await
        .expect("a request behind 40 unfinished ones is answered");
        assert!(
            answered.starts_with("HTTP/1.1 200") && answered.ends_with("ok"),
            "{answered}"
        );
        for mut s in slow {
            let closed = tokio::time::timeout(Duration::from_secs(30), until_closed(&mut s))
                .await
                .expect("an unfinished request is closed");
            assert!(!closed.contains("200"), "{closed}");
        }
        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server stops")
            .expect("server task");
    }
}
