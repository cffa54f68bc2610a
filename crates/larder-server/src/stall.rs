//! Request bodies that stop arriving are dropped: a client that sent a request head and then
//! nothing more (half a body, or nothing after `Expect: 100-continue`, which is what Nix 2.8
//! sends when it retries a PUT after a failure) would otherwise hold its connection, its staging
//! file and its upload's place for as long as it stays silent. `header_timeout` bounds the
//! silence before a request head is complete (`conn.rs`); this bounds the silence in the middle
//! of a body with the same duration: no byte for that long and the request is answered `408`
//! and its connection closed, whatever the handler was doing with the body (nothing of it is
//! stored: every upload is published only after its whole body was verified).
//!
//! Only the silence is bounded, never the total time: a slow upload that keeps sending takes as
//! long as it needs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use crate::error::ApiError;

/// The body of a request that sent nothing for too long.
#[derive(Debug, thiserror::Error)]
#[error("the request body stalled: no data for {}s", .0.as_secs())]
pub struct Stalled(pub Duration);

/// Bound the silence inside a request's body (methods that carry one) to `limit`; part of
/// the server's middleware (`crate::bound`), which leaves reads alone.
pub async fn bound_body_silence(limit: Duration, req: Request, next: Next) -> Response {
    let stalled = Arc::new(AtomicBool::new(false));
    let req = req.map(|body| guard(body, limit, stalled.clone()));
    let resp = next.run(req).await;
    if stalled.load(Ordering::Acquire) {
        return ApiError::BodyStalled(limit).into_response();
    }
    resp
}

/// `body`, failing with [`Stalled`] (and setting `stalled`) when no data arrives for `limit`.
fn guard(body: Body, limit: Duration, stalled: Arc<AtomicBool>) -> Body {
    let stream = futures::stream::unfold(Some(body.into_data_stream()), move |state| {
        let stalled = stalled.clone();
        async move {
            let mut data = state?;
            match tokio::time::timeout(limit, data.next()).await {
                Ok(Some(item)) => Some((item.map_err(axum::BoxError::from), Some(data))),
                Ok(None) => None,
                Err(_) => {
                    stalled.store(true, Ordering::Release);
                    Some((Err(axum::BoxError::from(Stalled(limit))), None))
                }
            }
        }
    });
    Body::from_stream(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_silent_body_fails_and_a_slow_one_does_not() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(1);
        let slow = Body::from_stream(tokio_stream_of(rx));
        let flag = Arc::new(AtomicBool::new(false));
        let mut data = guard(slow, Duration::from_millis(400), flag.clone()).into_data_stream();
        // A byte every 150 ms keeps it alive past the limit...
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            tx.send(Ok(bytes::Bytes::from_static(b"x"))).await.unwrap();
            assert_eq!(data.next().await.unwrap().unwrap().as_ref(), b"x");
        }
        assert!(!flag.load(Ordering::Acquire));
        // ...and 400 ms of nothing ends it.
        let err = data.next().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("stalled: no data for"), "{err}");
        assert!(flag.load(Ordering::Acquire));
        assert!(data.next().await.is_none());
    }

    fn tokio_stream_of<T: Send + 'static>(
        rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures::Stream<Item = T> {
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) })
    }
}
