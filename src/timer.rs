//! A timer kept across the waits of a connection or a body, for deadlines that only
//! move forward.
//!
//! A tokio timer costs a registration in the runtime's timer wheel when first polled
//! and a removal when it is dropped or reset, each under the driver's lock. A timeout
//! made per request (or per frame) pays both every time. [`KeptTimer`] is made once and
//! left where it is while waits end on time: set for an earlier deadline, it fires
//! early at most once and is then moved on to the current one.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::time::{Instant, Sleep};

/// See the module docs. Empty until the first wait that needs it.
#[derive(Default)]
pub struct KeptTimer(Option<Pin<Box<Sleep>>>);

impl KeptTimer {
    /// `Ready` once `due` has passed; `Pending` (the waker registered) before. `due`
    /// may be earlier than the timer's deadline (a shorter timeout since): the timer is
    /// moved back at once.
    pub fn poll_until(&mut self, due: Instant, cx: &mut Context<'_>) -> Poll<()> {
        let timer = self
            .0
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if timer.deadline() > due {
            timer.as_mut().reset(due);
        }
        loop {
            ready!(timer.as_mut().poll(cx));
            if timer.deadline() >= due {
                return Poll::Ready(());
            }
            // Set for an earlier deadline: move it to this one.
            timer.as_mut().reset(due);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn wait(timer: &mut KeptTimer, due: Instant) {
        std::future::poll_fn(|cx| timer.poll_until(due, cx)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn each_wait_ends_at_its_own_deadline_whatever_the_timer_was_set_for() {
        let start = Instant::now();
        let mut timer = KeptTimer::default();
        wait(&mut timer, start + Duration::from_secs(1)).await;
        assert_eq!(Instant::now() - start, Duration::from_secs(1));
        // Later: the timer has fired; it is moved on, not taken as this deadline.
        wait(&mut timer, start + Duration::from_secs(3)).await;
        assert_eq!(Instant::now() - start, Duration::from_secs(3));
        // Earlier than the timer's deadline: moved back.
        let mut ahead = KeptTimer::default();
        let _ = std::future::poll_fn(|cx| {
            Poll::Ready(ahead.poll_until(start + Duration::from_secs(60), cx))
        })
        .await;
        wait(&mut ahead, start + Duration::from_secs(4)).await;
        assert_eq!(Instant::now() - start, Duration::from_secs(4));
    }
}
