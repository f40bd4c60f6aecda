//! The caller's deadline, read from `grpc-timeout` and enforced on streams.
//!
//! tonic's server bounds only the future that produces the response headers; once a stream has
//! started, nothing ends it at the deadline. [`bounded`] does, and also ends it when the service
//! drains, so every stream finishes with a clear status instead of being cut by the process exit.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use futures::Stream;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::{Status, metadata::MetadataMap};

use crate::Drain;

/// The `grpc-timeout` header, as the gRPC wire spec writes it; a `HeaderName` so the lookup on
/// every call does not parse the name again.
pub const GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

/// Parses a `grpc-timeout` value: at most 8 digits and a unit (`H M S m u n`).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Formats a timeout for `grpc-timeout`, rounding up so the callee never sees more time than left.
pub fn format_grpc_timeout(timeout: Duration) -> String {
    const MAX: u64 = 99_999_999;
    let micros = timeout.as_micros();
    if micros <= u128::from(MAX) {
        return format!("{}u", micros.max(1));
    }
    let millis = micros.div_ceil(1000);
    if millis <= u128::from(MAX) {
        return format!("{millis}m");
    }
    let secs = millis.div_ceil(1000).min(u128::from(MAX));
    format!("{secs}S")
}

/// When this hop must give up on the caller's behalf, if the caller sent a deadline.
///
/// A small margin is kept back: tonic's server runs its own `grpc-timeout` timer from the moment
/// the request arrived and answers `CANCELLED` when it fires, and the caller's clock started
/// earlier still. Giving up slightly before both lets this hop answer `DEADLINE_EXCEEDED`, the
/// code gRPC defines for it, while the caller is still listening.
pub fn deadline(metadata: &MetadataMap) -> Option<Instant> {
    let value = metadata.as_ref().get(&GRPC_TIMEOUT)?.to_str().ok()?;
    parse_grpc_timeout(value).map(|t| Instant::now() + t - margin(t))
}

/// The time left before `deadline`, as a hop passes it on in `grpc-timeout`: rounded down to
/// three significant digits, so the next hop gives up less than 1 % sooner than it could.
///
/// Exact to the nanosecond, every call carried a value of its own, which HPACK sends as a new
/// literal and enters into the connection's header table, where it pushes out older entries
/// such as the hop's ~1 KB token, sent again in full. Rounded, calls with a 10 s timeout made
/// within the same 10 ms send the same value, as an index into the table.
pub fn time_left(deadline: Instant) -> Duration {
    three_digits(deadline.saturating_duration_since(Instant::now()))
}

fn three_digits(t: Duration) -> Duration {
    let nanos = t.as_nanos();
    let mut unit = 1;
    while nanos / unit >= 1000 {
        unit *= 10;
    }
    // Under 585 years, the nanoseconds fit a u64.
    u64::try_from(nanos / unit * unit).map_or(t, Duration::from_nanos)
}

/// 2 % of the timeout, between 1 ms and 20 ms (never the whole timeout).
fn margin(timeout: Duration) -> Duration {
    (timeout / 50)
        .clamp(Duration::from_millis(1), Duration::from_millis(20))
        .min(timeout / 2)
}

pin_project! {
    /// A response stream that ends with `DEADLINE_EXCEEDED` at the caller's deadline, or
    /// `UNAVAILABLE` when the service drains, whichever comes first.
    #[must_use = "streams do nothing unless polled"]
    pub struct Bounded<S> {
        #[pin]
        inner: S,
        #[pin]
        sleep: Option<Sleep>,
        #[pin]
        drained: WaitForCancellationFutureOwned,
        drain: CancellationToken,
        service: &'static str,
        done: bool,
        // Items yielded since the clock and the drain were last looked at.
        unchecked: u8,
    }
}

/// Items an always-ready stream yields between two looks at the clock and the drain. Looking
/// on every item (a clock read and the drain token's mutex) was 2.5–3 % of a relay's CPU per
/// streamed message (perf); 32 messages of a microsecond or so are a deadline missed by tens
/// of microseconds.
const CHECK_EVERY: u8 = 32;

impl<S> std::fmt::Debug for Bounded<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bounded")
            .field("service", &self.service)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

/// Bounds `inner` by `deadline` and by `drain`; `service` names the hop in the status message.
pub fn bounded<S>(
    inner: S,
    deadline: Option<Instant>,
    drain: &Drain,
    service: &'static str,
) -> Bounded<S> {
    Bounded {
        inner,
        sleep: deadline.map(tokio::time::sleep_until),
        drained: drain.token().clone().cancelled_owned(),
        drain: drain.token().clone(),
        service,
        done: false,
        unchecked: 0,
    }
}

impl<S, T> Stream for Bounded<S>
where
    S: Stream<Item = Result<T, Status>>,
{
    type Item = Result<T, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        // The timer and the drain are polled, which registers this task with them, only when
        // the inner stream has to wait; after a wait, and every `CHECK_EVERY` items while it
        // does not, the clock and the drain are looked at. A stream that is always ready is
        // still ended on time.
        let check = *this.unchecked == 0;
        *this.unchecked = (*this.unchecked + 1) % CHECK_EVERY;
        let expired = check
            && this
                .sleep
                .as_ref()
                .as_pin_ref()
                .is_some_and(|sleep| sleep.deadline() <= Instant::now());
        let end = if expired {
            End::Deadline
        } else if check && this.drain.is_cancelled() {
            End::Drained
        } else {
            match this.inner.poll_next(cx) {
                Poll::Ready(item) => {
                    *this.done = item.is_none();
                    return Poll::Ready(item);
                }
                Poll::Pending => {
                    *this.unchecked = 0;
                    let timed_out = this
                        .sleep
                        .as_mut()
                        .as_pin_mut()
                        .is_some_and(|sleep| sleep.poll(cx).is_ready());
                    if timed_out {
                        End::Deadline
                    } else if this.drained.poll(cx).is_ready() {
                        End::Drained
                    } else {
                        return Poll::Pending;
                    }
                }
            }
        };
        *this.done = true;
        Poll::Ready(Some(Err(match end {
            End::Deadline => {
                Status::deadline_exceeded(format!("{}: deadline exceeded", this.service))
            }
            End::Drained => Status::unavailable(format!(
                "{}: shutting down, stream ended; retry on another instance",
                this.service
            )),
        })))
    }
}

/// Why a bounded stream ended early.
enum End {
    Deadline,
    Drained,
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("40m"), Some(Duration::from_millis(40)));
        assert_eq!(parse_grpc_timeout("50u"), Some(Duration::from_micros(50)));
        assert_eq!(parse_grpc_timeout("60n"), Some(Duration::from_nanos(60)));
        for bad in ["", "S", "10", "10x", "123456789S", "-1S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }

    #[test]
    fn time_left_keeps_three_digits_and_never_grows() {
        let cases = [
            (Duration::from_nanos(999), Duration::from_nanos(999)),
            (Duration::from_nanos(1_234), Duration::from_nanos(1_230)),
            (
                Duration::from_micros(9_979_964),
                Duration::from_millis(9_970),
            ),
            (Duration::from_secs(100), Duration::from_secs(100)),
            (Duration::from_millis(99_987), Duration::from_millis(99_900)),
            (Duration::ZERO, Duration::ZERO),
        ];
        for (left, sent) in cases {
            assert_eq!(three_digits(left), sent, "{left:?}");
        }
        for nanos in [1_000, 1_999, 10_999_999, 123_456_789_012, u64::MAX] {
            let left = Duration::from_nanos(nanos);
            let sent = three_digits(left);
            assert!(
                sent <= left && left - sent < left / 100,
                "{left:?} → {sent:?}"
            );
        }
        let huge = Duration::from_secs(u64::MAX);
        assert_eq!(
            three_digits(huge),
            huge,
            "beyond u64 nanoseconds, unchanged"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn calls_close_together_pass_on_the_same_timeout() {
        // 9.995 s left: 9.99 s passed on, and still after 3 ms, not after 13.
        let deadline = Instant::now() + Duration::from_millis(9_995);
        let first = tonic_timeout(time_left(deadline));
        assert_eq!(first, "9990000u");
        tokio::time::advance(Duration::from_millis(3)).await;
        assert_eq!(tonic_timeout(time_left(deadline)), first);
        tokio::time::advance(Duration::from_millis(10)).await;
        assert_ne!(tonic_timeout(time_left(deadline)), first);
    }

    /// The `grpc-timeout` value tonic writes for `timeout`.
    fn tonic_timeout(timeout: Duration) -> String {
        let mut request = tonic::Request::new(());
        request.set_timeout(timeout);
        request
            .metadata()
            .get("grpc-timeout")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned()
    }

    #[test]
    fn the_margin_is_small_and_never_eats_the_deadline() {
        assert_eq!(margin(Duration::from_secs(1)), Duration::from_millis(20));
        assert_eq!(margin(Duration::from_millis(100)), Duration::from_millis(2));
        assert_eq!(
            margin(Duration::from_micros(100)),
            Duration::from_micros(50)
        );
        assert_eq!(margin(Duration::from_secs(3600)), Duration::from_millis(20));
    }

    #[test]
    fn formatted_timeouts_round_trip_and_fit_eight_digits() {
        for t in [
            Duration::from_micros(1),
            Duration::from_millis(1500),
            Duration::from_secs(3600 * 24),
        ] {
            let s = format_grpc_timeout(t);
            assert!(s.len() <= 9, "{s}");
            assert!(parse_grpc_timeout(&s).unwrap() >= t.min(Duration::from_secs(99_999_999)));
        }
        assert_eq!(format_grpc_timeout(Duration::ZERO), "1u");
    }

    #[tokio::test(start_paused = true)]
    async fn an_endless_stream_ends_with_deadline_exceeded() {
        let drain = Drain::default();
        let endless = futures::stream::pending::<Result<(), Status>>();
        let deadline = Instant::now() + Duration::from_millis(50);
        let items: Vec<_> = bounded(endless, Some(deadline), &drain, "ping")
            .collect()
            .await;
        assert_eq!(items.len(), 1);
        let status = items[0].as_ref().unwrap_err();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(status.message(), "ping: deadline exceeded");
    }

    /// A stream that is always ready, bounded by a deadline `timeout` from now if any.
    fn flood(
        timeout: Option<Duration>,
        drain: &Drain,
    ) -> Pin<Box<impl Stream<Item = Result<(), Status>>>> {
        let items = futures::stream::repeat_with(|| Ok::<_, Status>(()));
        let deadline = timeout.map(|t| Instant::now() + t);
        Box::pin(bounded(items, deadline, drain, "relay"))
    }

    #[tokio::test(start_paused = true)]
    async fn an_always_ready_stream_still_ends_at_the_deadline() {
        let drain = Drain::default();
        let mut s = flood(Some(Duration::from_millis(5)), &drain);
        tokio::time::advance(Duration::from_millis(10)).await;
        let status = s.next().await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
    }

    #[tokio::test(start_paused = true)]
    async fn an_always_ready_stream_looks_at_the_clock_every_so_many_items() {
        let drain = Drain::default();
        let mut s = flood(Some(Duration::from_millis(5)), &drain);
        for _ in 0..5 {
            s.next().await.unwrap().unwrap();
        }
        tokio::time::advance(Duration::from_millis(10)).await;
        let mut late = 0;
        while s.next().await.unwrap().is_ok() {
            late += 1;
        }
        // The check falls on the 33rd item polled, the 28th after the deadline passed.
        assert_eq!(late, usize::from(CHECK_EVERY) - 5);
        assert!(s.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_waited_looks_at_the_clock_first() {
        let drain = Drain::default();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<(), Status>>();
        let deadline = Instant::now() + Duration::from_millis(5);
        let mut s = Box::pin(bounded(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
            Some(deadline),
            &drain,
            "relay",
        ));
        tx.send(Ok(())).unwrap();
        s.next().await.unwrap().unwrap();
        // Nothing ready: the stream waits, and the timer fires while it does.
        assert!(futures::poll!(s.next()).is_pending());
        tokio::time::advance(Duration::from_millis(10)).await;
        tx.send(Ok(())).unwrap();
        let status = s.next().await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
    }

    #[tokio::test]
    async fn an_always_ready_stream_still_ends_when_the_service_drains() {
        let drain = Drain::default();
        let mut s = flood(None, &drain);
        assert!(s.next().await.unwrap().is_ok());
        drain.start();
        let mut late = 0;
        let status = loop {
            match s.next().await.unwrap() {
                Ok(()) => late += 1,
                Err(status) => break status,
            }
        };
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(
            late,
            usize::from(CHECK_EVERY) - 1,
            "looked at on the 33rd item"
        );
        assert!(s.next().await.is_none());
    }

    #[tokio::test]
    async fn a_drain_ends_the_stream_with_unavailable() {
        let drain = Drain::default();
        let endless = futures::stream::pending::<Result<(), Status>>();
        let mut s = Box::pin(bounded(endless, None, &drain, "relay"));
        drain.start();
        let status = s.next().await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(s.next().await.is_none());
    }
}
