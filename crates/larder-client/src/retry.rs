//! When to try a failed upload again: transient failures (connection trouble, 429, 5xx) are
//! retried after an exponential backoff of 1 s, 2 s, 4 s … (from the maintained `backon`
//! crate), or after the `Retry-After` the server sent, up to `PushOptions::attempts` attempts
//! in all. Every upload request of the push pipeline (a whole NAR, a part, the publication)
//! goes through one [`Retry`]; which failures are transient is the pipeline's call.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// The first wait; each next one doubles.
pub const FIRST_DELAY: Duration = Duration::from_secs(1);

/// The retries left for one request.
pub(crate) struct Retry {
    delays: ExponentialBackoff,
    /// The attempt that just failed (1 for the first).
    attempt: u32,
}

impl Retry {
    /// For a request made at most `attempts` times.
    pub(crate) fn new(attempts: u32) -> Self {
        Self {
            delays: policy(attempts).build(),
            attempt: 1,
        }
    }

    /// After attempt [`Retry::attempt`] failed: how long to wait before the next one, or
    /// `None` when no attempt is left or the failure is not transient. `transient` is `None`
    /// for a failure not worth retrying, else the wait the server asked for, if any.
    pub(crate) fn wait(&mut self, transient: Option<Option<Duration>>) -> Option<Duration> {
        let asked = transient?;
        let delay = self.delays.next()?;
        Some(asked.unwrap_or(delay))
    }

    /// The number of the attempt that failed last; call [`Retry::next`] after sleeping.
    pub(crate) fn attempt(&self) -> u32 {
        self.attempt
    }

    pub(crate) fn next(&mut self) {
        self.attempt += 1;
    }
}

/// Make a request that only reads (the cache's settings, the bulk missing query), so is safe
/// to repeat, up to `attempts` times: again after the same waits as an upload when it failed
/// transiently (`transient` as for [`Retry::wait`]). `retrying` hears of each failure retried,
/// with the attempt that failed and the wait, so the user sees why nothing happens meanwhile.
pub async fn repeat<T, E, Fut>(
    attempts: u32,
    transient: impl Fn(&E) -> Option<Option<Duration>>,
    mut retrying: impl FnMut(&E, u32, Duration),
    mut request: impl FnMut() -> Fut,
) -> Result<T, E>
where
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut retry = Retry::new(attempts);
    loop {
        match request().await {
            Ok(v) => return Ok(v),
            Err(e) => match retry.wait(transient(&e)) {
                Some(wait) => {
                    retrying(&e, retry.attempt(), wait);
                    tokio::time::sleep(wait).await;
                    retry.next();
                }
                None => return Err(e),
            },
        }
    }
}

/// 1 s, 2 s, 4 s, … for `attempts - 1` retries.
fn policy(attempts: u32) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(FIRST_DELAY)
        .with_factor(2.0)
        .with_max_times(attempts.saturating_sub(1) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_from_one_second_for_the_attempts_left() {
        let delays: Vec<Duration> = policy(4).build().collect();
        assert_eq!(
            delays,
            [1, 2, 4].map(Duration::from_secs),
            "4 attempts: 3 waits, as 500 ms << attempt gave"
        );
        assert_eq!(policy(1).build().count(), 0);
    }
}
