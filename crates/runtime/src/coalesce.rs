//! Writing the answers of a connection's concurrent unary calls together, in one system call.
//!
//! A hop's connection task writes as soon as a call hands it something. With one worker thread
//! (what the Cloud Run manifests set) the call's task wakes the connection's task, which tokio
//! then runs next, so each call's answer went out in a `writev` of its own: 1.6 per relay call
//! at 64 B. [`CoalescedIo`] makes the first write of each turn of the connection's task wait one
//! pass of the scheduler (the task wakes itself, which puts it at the back of the queue): the
//! calls that became ready meanwhile queue their frames behind it, and one `writev` carries them
//! all. Netty's `FlushConsolidationHandler` does the same for gRPC Java.
//!
//! Waiting is for connections with other calls open, which may be about to answer: one call at a
//! time, a write goes out at once. And streams must not wait. `h2` writes each DATA frame over
//! 256 bytes on its own, so a server stream's ~32 KiB batches would each wait a pass behind every
//! other stream's encoding, and so would its trailers: measured, −17 % messages a second even
//! when only writes under 1 KiB waited (`docs/profiling.md`). So writes wait only while no
//! streaming call is open on the connection. [`OpenCalls`] counts both, from the method's
//! descriptor ([`StreamingPaths`]) on the server side and from the call's shape on a hop's
//! upstream connection.
//!
//! Larger answers need more than waiting: `h2` keeps a DATA frame over 256 bytes apart from its
//! buffer and writes before it encodes the next frame, so 4 KiB answers still left one `writev`
//! each after their pass. In the turn after a pass, [`CoalescedIo`] therefore gathers such writes
//! into a buffer of its own and sends them when `h2` flushes after its last frame (or once 256 KiB
//! are gathered): 2.1 → 0.3 `writev` per relay call at 4 KiB. An answer ends with its trailers,
//! which `h2` buffers; a request ends with its DATA, so a hop's batch of large requests waits
//! for the task's next turn, one pass later, which the flush that kept it asked for.
//!
//! A server learns of its calls late: hyper hands a request to the service stack only when the
//! request's own task first runs, so by the time the first answer is written the calls read with
//! it have not reached [`CountCallsLayer`] yet. A server's [`CoalescedIo`] therefore also counts
//! the calls its client starts as their HEADERS frames are read (`NewStreams`), until the
//! layer takes them over.

use std::{
    collections::HashSet,
    io::IoSlice,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
};

use bytes::{Buf, BytesMut};
use pin_project_lite::pin_project;
use prost::Message;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tower::{Layer, Service};

use crate::guarded::GuardedBody;

/// The calls open on one connection, and how many of them stream; cloning shares the counts.
#[derive(Debug, Clone)]
pub struct OpenCalls(Arc<Counts>);

#[derive(Debug)]
struct Counts {
    all: AtomicUsize,
    streaming: AtomicUsize,
    /// Calls a server has read the start of that have not been opened yet. A stream refused or
    /// reset before its call runs stays counted, so that connection's writes keep waiting a pass
    /// (a misbehaving client slows only its own connection, and never a stream).
    announced: AtomicUsize,
    /// Open calls from which a write waits: one more than the call that may be writing.
    coalesce_from: usize,
    /// Whether the connection is a server's, whose calls are announced by the bytes it reads.
    server: bool,
}

impl OpenCalls {
    /// A server connection's calls. An answer is written once its call has closed (the body
    /// handed over whole), so any call still open, or read and not yet run, may be about to
    /// answer too.
    pub fn server() -> Self {
        Self::coalescing_from(1, true)
    }

    /// A client connection's calls. A request is written while its own call is open, so it
    /// waits only for a second one.
    pub fn client() -> Self {
        Self::coalescing_from(2, false)
    }

    fn coalescing_from(coalesce_from: usize, server: bool) -> Self {
        Self(Arc::new(Counts {
            all: AtomicUsize::new(0),
            streaming: AtomicUsize::new(0),
            announced: AtomicUsize::new(0),
            coalesce_from,
            server,
        }))
    }

    /// Counts a call until the returned guard is dropped; on a server, it is one of the calls
    /// announced before.
    pub fn open(&self, streaming: bool) -> OpenCall {
        if self.0.server {
            // A call whose start was not read (another transport) was never announced.
            let _ = self
                .0
                .announced
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
        self.0.all.fetch_add(1, Ordering::Relaxed);
        if streaming {
            self.0.streaming.fetch_add(1, Ordering::Relaxed);
        }
        OpenCall {
            counts: self.0.clone(),
            streaming,
        }
    }

    /// How many calls are open, and how many of those stream.
    pub fn counts(&self) -> (usize, usize) {
        (
            self.0.all.load(Ordering::Relaxed),
            self.0.streaming.load(Ordering::Relaxed),
        )
    }

    /// Whether a write should wait for other calls' frames: another call is open or about to
    /// be, and none streams.
    pub fn coalesce(&self) -> bool {
        self.0.streaming.load(Ordering::Relaxed) == 0
            && self.0.all.load(Ordering::Relaxed) + self.0.announced.load(Ordering::Relaxed)
                >= self.0.coalesce_from
    }
}

/// One open call, counted in its connection's [`OpenCalls`] while it lives.
#[derive(Debug)]
pub struct OpenCall {
    counts: Arc<Counts>,
    streaming: bool,
}

impl Drop for OpenCall {
    fn drop(&mut self) {
        self.counts.all.fetch_sub(1, Ordering::Relaxed);
        if self.streaming {
            self.counts.streaming.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Where a connection's task is between writing and waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    /// The connection read all there was and wrote nothing since: its next write waits.
    Idle,
    /// A write waited its pass; it goes out when the task asks again.
    Waited,
    /// The turn after a pass: writes that end in a DATA frame `h2` holds apart are gathered,
    /// as more frames follow them.
    Gathering,
    /// This turn of the task has written: what follows (the rest of a large answer, frames that
    /// `h2` writes separately) goes out at once.
    Writing,
}

/// Bytes gathered at most before they are written, whatever follows.
const GATHER_MAX: usize = 256 << 10;

pin_project! {
    /// A connection's byte stream whose first write of a turn waits one scheduler pass while
    /// [`OpenCalls::coalesce`] says so (see the module's doc).
    #[derive(Debug)]
    pub struct CoalescedIo<T> {
        #[pin]
        io: T,
        calls: OpenCalls,
        turn: Turn,
        // A server's: the calls its client starts.
        streams: Option<NewStreams>,
        // Written by `h2`, not yet to `io`; in order before anything written after.
        gathered: BytesMut,
        // Whether the last write gathered ended in a frame held apart, so more follow.
        more_follow: bool,
    }
}

impl<T> CoalescedIo<T> {
    /// `io`, whose calls `calls` counts.
    pub fn new(io: T, calls: OpenCalls) -> Self {
        let streams = calls.0.server.then(NewStreams::expecting_preface);
        Self {
            io,
            calls,
            turn: Turn::Idle,
            streams,
            gathered: BytesMut::new(),
            more_follow: false,
        }
    }
}

/// The calls a client starts, found in the bytes a server reads: every HEADERS frame on a
/// stream numbered above all before it opens one (RFC 9113, 5.1.1). Only the frame headers are
/// looked at; `h2` checks the rest.
#[derive(Debug)]
struct NewStreams {
    /// Bytes of the client's connection preface still to come.
    preface: usize,
    head: [u8; FRAME_HEAD],
    head_len: usize,
    /// Bytes of the current frame's payload still to come.
    payload: usize,
    last_stream: u32,
}

/// What an HTTP/2 client sends first (RFC 9113, 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEAD: usize = 9;
const HEADERS: u8 = 0x1;

impl NewStreams {
    /// A connection's scanner, which first skips the client's connection preface.
    fn expecting_preface() -> Self {
        Self {
            preface: PREFACE.len(),
            head: [0; FRAME_HEAD],
            head_len: 0,
            payload: 0,
            last_stream: 0,
        }
    }

    /// How many calls `bytes`, the next ones read, start.
    fn count(&mut self, mut bytes: &[u8]) -> usize {
        let skip = self.preface.min(bytes.len());
        self.preface -= skip;
        bytes = &bytes[skip..];
        let mut started = 0;
        while !bytes.is_empty() {
            if self.payload > 0 {
                let skip = self.payload.min(bytes.len());
                self.payload -= skip;
                bytes = &bytes[skip..];
                continue;
            }
            let take = (FRAME_HEAD - self.head_len).min(bytes.len());
            self.head[self.head_len..self.head_len + take].copy_from_slice(&bytes[..take]);
            self.head_len += take;
            bytes = &bytes[take..];
            if self.head_len < FRAME_HEAD {
                break;
            }
            self.head_len = 0;
            let [l0, l1, l2, kind, _flags, s0, s1, s2, s3] = self.head;
            self.payload = u32::from_be_bytes([0, l0, l1, l2]) as usize;
            let stream = u32::from_be_bytes([s0 & 0x7f, s1, s2, s3]);
            if kind == HEADERS && stream > self.last_stream {
                self.last_stream = stream;
                started += 1;
            }
        }
        started
    }
}

impl<T: AsyncWrite> CoalescedIo<T> {
    /// Writes `bufs` with `write`, except that the first write of a turn of the connection's
    /// task waits one pass first if the open calls say so, and that in the turn after the
    /// pass, writes that end in a frame `h2` held apart are gathered (see the module's doc). A
    /// write the socket could not take yet does not wait again when it is retried.
    fn poll_coalesced(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
        write: impl FnOnce(Pin<&mut T>, &mut Context<'_>) -> Poll<std::io::Result<usize>>,
    ) -> Poll<std::io::Result<usize>> {
        let mut this = self.project();
        if *this.turn == Turn::Idle && this.calls.coalesce() {
            *this.turn = Turn::Waited;
            // Waking itself puts the task at the back of the scheduler's queue.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if *this.turn == Turn::Waited {
            *this.turn = Turn::Gathering;
        }
        if *this.turn == Turn::Gathering && this.gathered.len() < GATHER_MAX {
            // `h2` passes a DATA frame it holds apart as a slice of its own after its buffer's.
            let held_apart = bufs.iter().filter(|b| !b.is_empty()).count() > 1;
            if held_apart || !this.gathered.is_empty() {
                let len = bufs.iter().map(|b| b.len()).sum();
                this.gathered.reserve(len);
                for buf in bufs {
                    this.gathered.extend_from_slice(buf);
                }
                *this.more_follow = held_apart;
                return Poll::Ready(Ok(len));
            }
        }
        ready!(drain(this.io.as_mut(), this.gathered, this.turn, cx))?;
        let written = ready!(write(this.io, cx));
        *this.turn = Turn::Writing;
        Poll::Ready(written)
    }
}

/// Writes out all of `gathered`, which ends a gathering turn, and lets go of its memory once it
/// is empty: an idle connection holds no buffer.
fn drain<T: AsyncWrite>(
    mut io: Pin<&mut T>,
    gathered: &mut BytesMut,
    turn: &mut Turn,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<()>> {
    while !gathered.is_empty() {
        match ready!(io.as_mut().poll_write(cx, gathered))? {
            0 => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
            n => gathered.advance(n),
        }
    }
    if gathered.capacity() > 0 {
        *gathered = BytesMut::new();
    }
    if *turn == Turn::Gathering {
        *turn = Turn::Writing;
    }
    Poll::Ready(Ok(()))
}

impl<T: AsyncRead + AsyncWrite> AsyncRead for CoalescedIo<T> {
    /// `h2` reads until there is nothing more before it writes, on every turn of its task: a read
    /// that finds nothing after the task has written starts a new turn. What a flush left
    /// gathered goes out first (a socket that cannot take it yet wakes the task when it can).
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let mut this = self.project();
        if let Poll::Ready(drained) = drain(this.io.as_mut(), this.gathered, this.turn, cx) {
            drained?;
        }
        let before = buf.filled().len();
        let read = this.io.poll_read(cx, buf);
        if let (Some(streams), Poll::Ready(Ok(()))) = (this.streams, &read) {
            let started = streams.count(&buf.filled()[before..]);
            if started > 0 {
                this.calls.0.announced.fetch_add(started, Ordering::Relaxed);
            }
        }
        if read.is_pending() && *this.turn == Turn::Writing {
            *this.turn = Turn::Idle;
        }
        read
    }
}

impl<T: AsyncWrite> AsyncWrite for CoalescedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.poll_coalesced(cx, &[IoSlice::new(buf)], |io, cx| io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.poll_coalesced(cx, bufs, |io, cx| io.poll_write_vectored(cx, bufs))
    }

    /// Always, so that `h2` hands over its buffer and the frame it holds apart in one call;
    /// an `io` that is not vectored writes the first slice, as `AsyncWrite`'s default does.
    fn is_write_vectored(&self) -> bool {
        true
    }

    /// A flush right after a frame held apart is not `h2`'s last of the turn (it flushes before
    /// it encodes the next frame): the bytes stay gathered, and the task is woken so that they
    /// go out on its next turn at the latest if no other frame came.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let mut this = self.project();
        if *this.turn == Turn::Gathering && *this.more_follow && this.gathered.len() < GATHER_MAX {
            cx.waker().wake_by_ref();
            return Poll::Ready(Ok(()));
        }
        ready!(drain(this.io.as_mut(), this.gathered, this.turn, cx))?;
        this.io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let mut this = self.project();
        ready!(drain(this.io.as_mut(), this.gathered, this.turn, cx))?;
        this.io.poll_shutdown(cx)
    }
}

/// What tonic puts into each request's extensions for a [`CoalescedIo`] connection, until
/// [`CountCallsLayer`] swaps it for the plain [`TcpConnectInfo`] handlers look for.
#[derive(Debug, Clone)]
pub struct CoalescedConnectInfo {
    tcp: TcpConnectInfo,
    calls: OpenCalls,
}

impl Connected for CoalescedIo<TcpStream> {
    type ConnectInfo = CoalescedConnectInfo;

    fn connect_info(&self) -> CoalescedConnectInfo {
        CoalescedConnectInfo {
            tcp: self.io.connect_info(),
            calls: self.calls.clone(),
        }
    }
}

/// The paths (`/package.Service/Method`) of the streaming methods in some encoded
/// `FileDescriptorSet`s: what the server's descriptors say, not a list kept by hand.
#[derive(Debug, Clone, Default)]
pub struct StreamingPaths(Arc<HashSet<Box<str>>>);

impl StreamingPaths {
    /// The streaming methods of every service in `sets`.
    pub fn from_descriptor_sets<'a>(
        sets: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Self, prost::DecodeError> {
        let mut paths = HashSet::new();
        for set in sets {
            for file in prost_types::FileDescriptorSet::decode(set)?.file {
                let package = file.package();
                for service in &file.service {
                    let service_name = match package {
                        "" => service.name().to_owned(),
                        package => format!("{package}.{}", service.name()),
                    };
                    for method in &service.method {
                        if method.client_streaming() || method.server_streaming() {
                            paths.insert(format!("/{service_name}/{}", method.name()).into());
                        }
                    }
                }
            }
        }
        Ok(Self(Arc::new(paths)))
    }

    fn contains(&self, path: &str) -> bool {
        self.0.contains(path)
    }
}

/// Counts each call in its connection's [`OpenCalls`] until its answer ends.
#[derive(Debug, Clone)]
pub struct CountCallsLayer {
    paths: StreamingPaths,
}

impl CountCallsLayer {
    /// Calls to any of `paths` count as streaming.
    pub fn new(paths: StreamingPaths) -> Self {
        Self { paths }
    }
}

impl<S> Layer<S> for CountCallsLayer {
    type Service = CountCalls<S>;

    fn layer(&self, inner: S) -> CountCalls<S> {
        CountCalls {
            inner,
            paths: self.paths.clone(),
        }
    }
}

/// See [`CountCallsLayer`].
#[derive(Debug, Clone)]
pub struct CountCalls<S> {
    inner: S,
    paths: StreamingPaths,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for CountCalls<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<Counted<ResBody>>;
    type Error = S::Error;
    type Future = CountCallsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let streaming = self.paths.contains(request.uri().path());
        let extensions = request.extensions_mut();
        let call = extensions.remove::<CoalescedConnectInfo>().map(|info| {
            extensions.insert(info.tcp);
            info.calls.open(streaming)
        });
        CountCallsFuture {
            inner: self.inner.call(request),
            call,
        }
    }
}

pin_project! {
    /// A call's answer; the call stays counted until its body is dropped.
    pub struct CountCallsFuture<F> {
        #[pin]
        inner: F,
        call: Option<OpenCall>,
    }
}

impl<F, B, E> Future for CountCallsFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<Counted<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let call = this.call.take();
        Poll::Ready(Ok(response.map(|body| Counted::new(body, call))))
    }
}

/// An answer's body, holding its call's place in the count while it is sent.
pub type Counted<B> = GuardedBody<B, OpenCall>;

#[cfg(test)]
mod tests {
    use std::{
        convert::Infallible,
        sync::Mutex,
        task::{Wake, Waker},
    };

    use http_body_util::Empty;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tonic::codegen::Bytes;
    use tower::ServiceExt;

    use super::*;

    /// Counts how often the task was woken.
    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }

        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    struct Conn {
        io: CoalescedIo<DuplexStream>,
        peer: DuplexStream,
        wakes: Arc<Wakes>,
        waker: Waker,
    }

    impl Conn {
        fn new(calls: OpenCalls) -> Self {
            Self::with_room(calls, 1 << 10)
        }

        /// A connection whose peer can hold `room` bytes unread.
        fn with_room(calls: OpenCalls, room: usize) -> Self {
            let (io, peer) = tokio::io::duplex(room);
            let wakes = Arc::new(Wakes::default());
            Self {
                io: CoalescedIo::new(io, calls),
                peer,
                waker: Waker::from(wakes.clone()),
                wakes,
            }
        }

        /// Runs `poll` in the task's context: what it returned, and whether it woke the task.
        fn polled<R>(
            &mut self,
            poll: impl FnOnce(Pin<&mut CoalescedIo<DuplexStream>>, &mut Context<'_>) -> R,
        ) -> (R, bool) {
            let before = self.wakes.0.load(Ordering::Relaxed);
            let polled = poll(
                Pin::new(&mut self.io),
                &mut Context::from_waker(&self.waker),
            );
            (polled, self.wakes.0.load(Ordering::Relaxed) > before)
        }

        /// One `poll_write` of `bytes`: whether it wrote, and whether it woke the task.
        fn write(&mut self, bytes: &[u8]) -> (bool, bool) {
            let (polled, woke) = self.polled(|io, cx| io.poll_write(cx, bytes));
            (wrote_all(polled, bytes.len()), woke)
        }

        /// One `poll_write_vectored` of `bufs`, as `h2` writes its buffer and a DATA frame it
        /// held apart: whether it wrote (or gathered) all, and whether it woke the task.
        fn write_vectored(&mut self, bufs: &[&[u8]]) -> (bool, bool) {
            let slices: Vec<_> = bufs.iter().map(|b| IoSlice::new(b)).collect();
            let (polled, woke) = self.polled(|io, cx| io.poll_write_vectored(cx, &slices));
            (wrote_all(polled, bufs.iter().map(|b| b.len()).sum()), woke)
        }

        /// One `poll_flush`, which must complete: whether it woke the task.
        fn flush(&mut self) -> bool {
            let (polled, woke) = self.polled(|io, cx| io.poll_flush(cx));
            assert!(matches!(polled, Poll::Ready(Ok(()))));
            woke
        }

        /// What the peer has received so far.
        fn received(&mut self) -> Vec<u8> {
            let mut received = Vec::new();
            let mut buf = [0; 4096];
            loop {
                let mut read = ReadBuf::new(&mut buf);
                let polled = Pin::new(&mut self.peer)
                    .poll_read(&mut Context::from_waker(Waker::noop()), &mut read);
                match polled {
                    Poll::Ready(Ok(())) if !read.filled().is_empty() => {
                        received.extend_from_slice(read.filled());
                    }
                    _ => return received,
                }
            }
        }

        /// Reads with nothing to read, as `h2` does before it writes.
        fn read_nothing(&mut self) {
            let mut buf = [0; 8];
            let mut buf = ReadBuf::new(&mut buf);
            let (polled, _) = self.polled(|io, cx| io.poll_read(cx, &mut buf));
            assert!(polled.is_pending());
        }
    }

    /// Whether a write took all `len` bytes; `false` if it waits.
    fn wrote_all(polled: Poll<std::io::Result<usize>>, len: usize) -> bool {
        match polled {
            Poll::Ready(n) => {
                assert_eq!(n.unwrap(), len);
                true
            }
            Poll::Pending => false,
        }
    }

    const WAITED: (bool, bool) = (false, true);
    const WROTE: (bool, bool) = (true, false);

    #[tokio::test]
    async fn the_first_write_of_a_turn_waits_one_pass_and_the_rest_of_the_turn_does_not() {
        let calls = OpenCalls::client();
        let _open = [calls.open(false), calls.open(false)];
        let mut conn = Conn::new(calls);
        assert_eq!(
            conn.write(b"ab"),
            WAITED,
            "the first write waits and wakes the task"
        );
        assert_eq!(conn.write(b"ab"), WROTE, "asked again, it goes out");
        assert_eq!(
            conn.write(b"cd"),
            WROTE,
            "the rest of the turn goes out at once"
        );
        conn.read_nothing();
        assert_eq!(
            conn.write(b"ef"),
            WAITED,
            "a read that found nothing starts a new turn"
        );
        conn.read_nothing();
        assert_eq!(
            conn.write(b"ef"),
            WROTE,
            "a write that waited does not wait twice"
        );
        let mut received = [0; 6];
        conn.peer.read_exact(&mut received).await.unwrap();
        assert_eq!(&received, b"abcdef");
    }

    #[test]
    fn writes_go_out_at_once_without_another_call_open_or_with_a_streaming_one() {
        let calls = OpenCalls::client();
        let mut conn = Conn::new(calls.clone());
        assert_eq!(conn.write(b"a"), WROTE, "no call open: nothing to wait for");
        conn.read_nothing();
        let first = calls.open(false);
        assert_eq!(
            conn.write(b"a"),
            WROTE,
            "a client's one call is the one writing"
        );
        conn.read_nothing();
        let stream = calls.open(true);
        let third = calls.open(false);
        assert_eq!(calls.counts(), (3, 1));
        assert_eq!(conn.write(b"b"), WROTE, "a stream is open");
        conn.read_nothing();
        drop(stream);
        assert_eq!(calls.counts(), (2, 0));
        assert_eq!(
            conn.write(b"c"),
            WAITED,
            "two unary calls and no stream: wait"
        );
        drop((first, third));
        assert_eq!(calls.counts(), (0, 0));

        let calls = OpenCalls::server();
        let mut conn = Conn::new(calls.clone());
        assert_eq!(
            conn.write(b"d"),
            WROTE,
            "a server's answered calls have closed"
        );
        conn.read_nothing();
        let _other = calls.open(false);
        assert_eq!(
            conn.write(b"e"),
            WAITED,
            "another call may be about to answer"
        );
    }

    /// A connection of a client with two unary calls open, after its first write's pass.
    fn after_a_pass(room: usize) -> (Conn, [OpenCall; 2]) {
        let calls = OpenCalls::client();
        let open = [calls.open(false), calls.open(false)];
        let mut conn = Conn::with_room(calls, room);
        assert_eq!(conn.write(b""), WAITED);
        (conn, open)
    }

    #[test]
    fn after_a_pass_writes_ending_in_a_frame_held_apart_are_gathered_until_the_last_flush() {
        let (mut conn, _open) = after_a_pass(1 << 10);
        assert_eq!(conn.write_vectored(&[b"head1", b"data1"]), WROTE);
        assert!(
            conn.flush(),
            "a flush after a frame held apart wakes the task"
        );
        assert_eq!(
            conn.received(),
            b"",
            "and keeps the bytes: more frames follow"
        );
        assert_eq!(conn.write_vectored(&[b"tail1head2", b"data2"]), WROTE);
        assert!(conn.flush());
        assert_eq!(
            conn.write(b"tail2"),
            WROTE,
            "a write after gathered bytes joins them"
        );
        assert!(!conn.flush(), "the last flush wakes nothing");
        assert_eq!(
            conn.received(),
            b"head1data1tail1head2data2tail2",
            "and sends all, in order"
        );
        conn.read_nothing();
        assert_eq!(conn.write(b"next"), WAITED, "the next turn waits again");
    }

    #[tokio::test]
    async fn what_a_flush_left_gathered_goes_out_with_the_next_read_or_at_shutdown() {
        let (mut conn, _open) = after_a_pass(1 << 10);
        assert_eq!(conn.write_vectored(&[b"head", b"data"]), WROTE);
        assert!(conn.flush());
        conn.read_nothing();
        assert_eq!(
            conn.received(),
            b"headdata",
            "the woken task's read sent them"
        );

        let (mut conn, _open) = after_a_pass(1 << 10);
        assert_eq!(conn.write_vectored(&[b"head", b"data"]), WROTE);
        assert!(conn.flush());
        conn.io.shutdown().await.unwrap();
        assert_eq!(conn.received(), b"headdata", "shutting down sent them");
    }

    #[test]
    fn single_writes_go_out_at_once_and_gathering_stops_at_its_limit() {
        let (mut conn, _open) = after_a_pass(1 << 10);
        assert_eq!(conn.write(b"frames"), WROTE);
        assert_eq!(
            conn.received(),
            b"frames",
            "h2's buffer alone is already all it has"
        );

        let (mut conn, _open) = after_a_pass(2 * GATHER_MAX);
        let big = vec![7; GATHER_MAX];
        assert_eq!(conn.write_vectored(&[b"head", &big]), WROTE);
        assert!(!conn.flush(), "a full buffer is written, not kept");
        assert_eq!(conn.received().len(), GATHER_MAX + 4);
    }

    /// An HTTP/2 frame: 9-byte head, then `payload`.
    fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut frame = u32::try_from(payload.len()).unwrap().to_be_bytes()[1..].to_vec();
        frame.extend([kind, 0]);
        frame.extend(stream.to_be_bytes());
        frame.extend(payload);
        frame
    }

    const DATA: u8 = 0x0;
    const SETTINGS: u8 = 0x4;
    const CONTINUATION: u8 = 0x9;

    /// A client's first bytes: the preface, SETTINGS, and HEADERS opening streams 1 and 3.
    fn client_start() -> Vec<u8> {
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(SETTINGS, 0, &[0; 6]));
        bytes.extend(frame(HEADERS, 1, &frame(HEADERS, 7, &[])));
        bytes.extend(frame(CONTINUATION, 1, &[]));
        bytes.extend(frame(HEADERS, 3, &[]));
        bytes
    }

    fn announced(calls: &OpenCalls) -> usize {
        calls.0.announced.load(Ordering::Relaxed)
    }

    #[test]
    fn the_calls_a_client_starts_are_its_headers_on_new_streams() {
        let mut bytes = client_start();
        bytes.extend(frame(DATA, 3, &frame(HEADERS, 9, &[1; 40])));
        bytes.extend(frame(HEADERS, 1, &[]));
        bytes.extend(frame(HEADERS, 5, &[2; 300]));
        let expected = 3; // streams 1, 3, 5; not 7 or 9 inside payloads, not 1's trailers
        assert_eq!(NewStreams::expecting_preface().count(&bytes), expected);
        for size in [1, 2, 9, 10, 17] {
            let mut streams = NewStreams::expecting_preface();
            let found: usize = bytes.chunks(size).map(|c| streams.count(c)).sum();
            assert_eq!(found, expected, "read {size} bytes at a time");
        }
    }

    #[tokio::test]
    async fn a_server_waits_for_the_calls_it_has_read_the_start_of() {
        let calls = OpenCalls::server();
        let mut conn = Conn::new(calls.clone());
        conn.peer.write_all(&client_start()).await.unwrap();
        let mut buf = [0; 256];
        let n = conn.io.read(&mut buf).await.unwrap();
        assert_eq!(n, client_start().len());
        assert_eq!(announced(&calls), 2);
        conn.read_nothing();
        assert_eq!(
            conn.write(b"a"),
            WAITED,
            "calls read and not yet run may be about to answer"
        );
        assert_eq!(conn.write(b"a"), WROTE);
        let first = calls.open(false);
        assert_eq!((announced(&calls), calls.counts()), (1, (1, 0)));
        drop((first, calls.open(false)));
        assert_eq!((announced(&calls), calls.counts()), (0, (0, 0)));
        conn.read_nothing();
        assert_eq!(conn.write(b"b"), WROTE, "every call read has answered");
        drop(calls.open(false));
        assert_eq!(
            announced(&calls),
            0,
            "a call not read here was not announced"
        );

        let client = OpenCalls::client();
        let mut conn = Conn::new(client.clone());
        conn.peer.write_all(&client_start()).await.unwrap();
        let n = conn.io.read(&mut buf).await.unwrap();
        assert_eq!(n, client_start().len());
        assert_eq!(announced(&client), 0, "a client's calls are its own");
    }

    fn reflected_paths() -> StreamingPaths {
        StreamingPaths::from_descriptor_sets([
            runmesh_proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        ])
        .unwrap()
    }

    #[test]
    fn the_streaming_paths_are_the_methods_the_descriptors_say_stream() {
        let paths = reflected_paths();
        for streaming in [
            "/runmesh.ping.v1.PingService/SendStream",
            "/runmesh.ping.v1.PingService/Collect",
            "/runmesh.ping.v1.PingService/Chat",
            "/grpc.health.v1.Health/Watch",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        ] {
            assert!(paths.contains(streaming), "{streaming}");
        }
        for unary in [
            "/runmesh.ping.v1.PingService/Send",
            "/grpc.health.v1.Health/Check",
            "/runmesh.ping.v1.PingService/Nope",
            "/runmesh.ping.v1.PingService/SendStream/",
        ] {
            assert!(!paths.contains(unary), "{unary}");
        }
        assert_eq!(paths.0.len(), 5);
        let err = StreamingPaths::from_descriptor_sets([&b"\xff"[..]]).unwrap_err();
        assert!(!err.to_string().is_empty());
    }

    #[tokio::test]
    async fn a_call_is_counted_until_its_answer_is_dropped() {
        let tcp = TcpConnectInfo {
            local_addr: Some(([127, 0, 0, 1], 8080).into()),
            remote_addr: Some(([127, 0, 0, 1], 40000).into()),
        };
        let seen = Arc::new(Mutex::new(Vec::new()));
        let inner = tower::service_fn({
            let seen = seen.clone();
            move |request: http::Request<()>| {
                let extensions = request.extensions();
                seen.lock().unwrap().push((
                    extensions
                        .get::<TcpConnectInfo>()
                        .and_then(|i| i.remote_addr),
                    extensions.get::<CoalescedConnectInfo>().is_some(),
                ));
                async { Ok::<_, Infallible>(http::Response::new(Empty::<Bytes>::new())) }
            }
        });
        let service = CountCallsLayer::new(reflected_paths()).layer(inner);
        let calls = OpenCalls::server();
        let call = |path: &str| {
            let mut request = http::Request::post(path).body(()).unwrap();
            request.extensions_mut().insert(CoalescedConnectInfo {
                tcp: tcp.clone(),
                calls: calls.clone(),
            });
            service.clone().oneshot(request)
        };

        let unary = call("/runmesh.ping.v1.PingService/Send").await.unwrap();
        assert_eq!(
            calls.counts(),
            (1, 0),
            "a unary call counts while it answers"
        );
        let stream = call("/runmesh.ping.v1.PingService/Chat").await.unwrap();
        assert_eq!(calls.counts(), (2, 1), "a streaming call counts as one");
        drop(unary);
        drop(stream);
        assert_eq!(
            calls.counts(),
            (0, 0),
            "neither counts once its answer is gone"
        );
        assert_eq!(
            *seen.lock().unwrap(),
            [(tcp.remote_addr, false); 2],
            "the service sees the TcpConnectInfo tonic's own connections have"
        );

        let without_info = http::Request::post("/runmesh.ping.v1.PingService/Send")
            .body(())
            .unwrap();
        service.clone().oneshot(without_info).await.unwrap();
        assert_eq!(
            seen.lock().unwrap()[2],
            (None, false),
            "other I/O passes as it is"
        );
    }
}
