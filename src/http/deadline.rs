//! The idle deadline of one connection: how long it may go without a request in flight.
//!
//! hyper's own `header_read_timeout` starts only once HTTP/1 parsing has begun, and
//! hyper-util's protocol detection (`auto`) reads the first bytes with no timer at all, so
//! a client that sends one byte, or half an HTTP/2 preface, could hold a connection slot
//! forever. The deadline is kept below hyper, on the socket itself: while no request is in
//! flight, every read fails once `limit` has passed since the connection opened or its last
//! request finished. That one rule covers a silent client, a trickled head, protocol
//! detection, an idle HTTP/1 keep-alive connection and an idle HTTP/2 connection alike.
//! A request is in flight from the moment hyper hands its complete head to the service
//! until the service's future ends ([`InFlight`] is dropped).

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The shared clock of one connection: its requests in flight and since when it is idle.
#[derive(Debug)]
pub struct Deadline {
    limit: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    in_flight: usize,
    idle_since: Instant,
    /// The reader parked while requests were in flight, woken when the last one ends so
    /// that it arms the deadline (an HTTP/2 connection may otherwise not read again soon).
    reader: Option<Waker>,
}

impl Deadline {
    /// A connection that opened now and may stay idle for `limit`.
    pub fn new(limit: Duration) -> Arc<Self> {
        Arc::new(Self {
            limit,
            state: Mutex::new(State {
                in_flight: 0,
                idle_since: Instant::now(),
                reader: None,
            }),
        })
    }

    /// Marks a request in flight until the returned guard is dropped.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.lock().in_flight += 1;
        InFlight(Arc::clone(self))
    }

    /// When reads start failing, or `None` while a request is in flight (then `waker` is
    /// kept, to be woken when the connection becomes idle).
    fn expiry(&self, waker: &Waker) -> Option<Instant> {
        let mut state = self.lock();
        if state.in_flight == 0 {
            return Some(state.idle_since + self.limit);
        }
        match &state.reader {
            Some(kept) if kept.will_wake(waker) => {}
            _ => state.reader = Some(waker.clone()),
        }
        None
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is two counters and a waker: a panic elsewhere cannot leave it torn.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A request in flight on its connection; dropping it ends the request.
#[derive(Debug)]
pub struct InFlight(Arc<Deadline>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let reader = {
            let mut state = self.0.lock();
            state.in_flight = state.in_flight.saturating_sub(1);
            if state.in_flight > 0 {
                return;
            }
            state.idle_since = Instant::now();
            state.reader.take()
        };
        if let Some(reader) = reader {
            reader.wake();
        }
    }
}

/// A socket whose reads fail with `TimedOut` once its [`Deadline`] has passed.
#[derive(Debug)]
pub struct DeadlineIo<T> {
    inner: T,
    deadline: Arc<Deadline>,
    sleep: Pin<Box<Sleep>>,
    armed_for: Option<Instant>,
}

impl<T> DeadlineIo<T> {
    pub fn new(inner: T, deadline: Arc<Deadline>) -> Self {
        Self {
            inner,
            deadline,
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed_for: None,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for DeadlineIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(at) = this.deadline.expiry(cx.waker()) {
            if this.armed_for != Some(at) {
                this.sleep.as_mut().reset(at);
                this.armed_for = Some(at);
            }
            // Checked before every read, not only when none is ready: a client trickling
            // one byte at a time always has a byte ready.
            if this.sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no complete request within the header read timeout",
                )));
            }
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for DeadlineIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    const LIMIT: Duration = Duration::from_millis(200);

    #[tokio::test]
    async fn reads_fail_once_idle_past_the_limit_and_never_while_a_request_runs() {
        let (mut client, server) = tokio::io::duplex(64);
        let deadline = Deadline::new(LIMIT);
        let mut io = DeadlineIo::new(server, Arc::clone(&deadline));
        let mut buf = [0u8; 8];

        // With a request in flight, the limit does not apply: a byte sent well after it
        // is read. (The sleep is the slow client under test, not a synchronisation.)
        let request = deadline.request();
        tokio::time::sleep(LIMIT * 2).await;
        client.write_all(b"x").await.unwrap();
        assert_eq!(io.read(&mut buf).await.unwrap(), 1);

        // Idle again: the clock restarts when the request ends, and a silent client is
        // cut off at the limit.
        drop(request);
        let idle = Instant::now();
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(idle.elapsed() >= LIMIT, "{:?}", idle.elapsed());
        assert!(idle.elapsed() < LIMIT * 3, "{:?}", idle.elapsed());
    }

    #[tokio::test]
    async fn a_trickling_client_is_cut_off_at_the_limit() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut io = DeadlineIo::new(server, Deadline::new(LIMIT));
        let mut buf = [0u8; 1];
        let started = Instant::now();
        loop {
            // Paces the slow client's bytes: always one ready, never a complete head.
            tokio::time::sleep(LIMIT / 4).await;
            client.write_all(b"G").await.unwrap();
            if io.read(&mut buf).await.is_err() {
                break;
            }
            assert!(started.elapsed() < LIMIT * 3, "never cut off");
        }
        assert!(started.elapsed() >= LIMIT);
    }
}
