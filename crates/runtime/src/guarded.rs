//! A response body that holds something for its call until the body is dropped.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// `inner`, holding `guard` (a permit, a call's place in a count) until it is dropped: the
    /// server drops an answer's body once it has sent the last frame, so the call is over then,
    /// not when its handler returned.
    #[derive(Debug)]
    pub struct GuardedBody<B, G> {
        #[pin]
        inner: B,
        guard: Option<G>,
    }
}

impl<B, G> GuardedBody<B, G> {
    /// `inner`, holding `guard` if there is one.
    pub fn new(inner: B, guard: Option<G>) -> Self {
        Self { inner, guard }
    }
}

impl<B: Default, G> Default for GuardedBody<B, G> {
    fn default() -> Self {
        Self::new(B::default(), None)
    }
}

impl<B: Body, G> Body for GuardedBody<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
