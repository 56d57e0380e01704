//! The one body idle timeout (#18 point 12): [`Idle`] wraps a body and ends
//! it with [`Stalled`] when it has made its reader wait `idle` for a frame.
//! The gateway wraps both directions of a relayed request in it; the
//! agent's relay ([`crate::proxy`]) and coalesced downloads
//! ([`crate::proxy::coalesce`]) wrap upstream bodies. Before, each of the
//! three kept its own timer, with different rules.
//!
//! Only time spent waiting counts: the deadline starts when a poll finds
//! no frame ready, and a frame clears it. A reader that stops polling (a
//! slow client, a download waiting for its clients) is not a stall of the
//! body. No I/O of its own; fails only with [`Stalled`] or the inner
//! body's error.

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// A body made its reader wait this long for a frame.
#[derive(Debug, thiserror::Error)]
#[error("body stalled: no data for {idle:?}")]
pub struct Stalled {
    pub idle: Duration,
}

/// Whether `e` (or what it wraps) is a [`Stalled`].
pub fn is_stall(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<Stalled>().is_some()
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body with a stall deadline; see the module header.
pub struct Idle<B> {
    inner: Option<B>,
    idle: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// A poll found no frame ready, and none has come since.
    waiting: bool,
    /// Told `true` once the last frame is out (see [`Idle::on_end`]).
    ended: Option<tokio::sync::watch::Sender<bool>>,
}

impl<B> Idle<B> {
    pub fn new(inner: B, idle: Duration) -> Idle<B> {
        Idle {
            inner: Some(inner),
            idle,
            sleep: Box::pin(tokio::time::sleep(idle)),
            waiting: false,
            ended: None,
        }
    }

    /// A body with no frames.
    pub fn empty(idle: Duration) -> Idle<B> {
        Idle {
            inner: None,
            idle,
            sleep: Box::pin(tokio::time::sleep(idle)),
            waiting: false,
            ended: None,
        }
    }
}

impl<B: Body> Idle<B> {
    /// Sends `true` on `tx` once the body has ended: at once for a body
    /// that is empty from the start (hyper never polls those), else after
    /// the frame that ends it.
    pub fn on_end(mut self, tx: tokio::sync::watch::Sender<bool>) -> Idle<B> {
        if self.inner.as_ref().is_none_or(|b| b.is_end_stream()) {
            let _ = tx.send(true);
        }
        self.ended = Some(tx);
        self
    }

    fn signal_end(&self) {
        if let Some(tx) = &self.ended {
            tx.send_if_modified(|sent| !std::mem::replace(sent, true));
        }
    }
}

impl<B> Body for Idle<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let mut inner = Pin::new(inner);
        match inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.waiting = false;
                if inner.is_end_stream() {
                    this.signal_end();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => {
                this.signal_end();
                Poll::Ready(None)
            }
            Poll::Pending => {
                if !this.waiting {
                    this.waiting = true;
                    let deadline = tokio::time::Instant::now() + this.idle;
                    this.sleep.as_mut().reset(deadline);
                }
                if this.sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Some(Err(Box::new(Stalled { idle: this.idle }))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map(|b| b.size_hint())
            .unwrap_or_else(|| SizeHint::with_exact(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    #[tokio::test(start_paused = true)]
    async fn a_body_that_makes_its_reader_wait_stalls_and_a_paused_reader_does_not() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        let stream = tokio_stream_from(rx);
        let mut body = Idle::new(StreamBody::new(stream), Duration::from_secs(5));
        tx.send(Ok(Frame::data(Bytes::from_static(b"a"))))
            .await
            .unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        // The reader pauses longer than the deadline: not a stall.
        tokio::time::sleep(Duration::from_secs(60)).await;
        tx.send(Ok(Frame::data(Bytes::from_static(b"b"))))
            .await
            .unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        // Now the body makes its reader wait: a stall after 5 s.
        let t0 = tokio::time::Instant::now();
        let e = body.frame().await.unwrap().unwrap_err();
        assert!(is_stall(e.as_ref()), "{e}");
        assert_eq!(t0.elapsed(), Duration::from_secs(5));
        drop(tx);
    }

    fn tokio_stream_from<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures::Stream<Item = T> + Unpin {
        Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }
}
