//! Busy polling (`busy_poll`, off by default): a worker that has just had
//! something to do keeps asking the kernel for events, for a short window,
//! instead of sleeping in `epoll_wait` until the kernel wakes it.
//!
//! Why: with one request in flight, every hop through the balancer costs two
//! wake-ups of its worker (request in, answer back), and a sleeping CPU,
//! above all a virtual machine's, is slow to wake. A worker still polling
//! when the next event arrives sees it at once. HAProxy's `busy-polling` does
//! the same, all the time; here the spinning stops once the worker has been
//! idle for the window, so an idle balancer sleeps as before and only a
//! worker with traffic keeps its CPU busy.
//!
//! How: a future on the worker's own runtime yields after every poll, so the
//! runtime's scheduler, seeing work deferred, polls its I/O driver with a zero
//! timeout instead of sleeping. The worker's tasks (accept loops, client
//! connections) are wrapped in [`Counted`], which counts their polls in a
//! thread-local: a round in which the count moved did work and restarts the
//! window. (Timing the rounds cannot tell: after the CPU was given to another
//! thread, an empty round runs with cold caches and takes as long as a short
//! piece of work.) After an empty round the thread offers its CPU to any other
//! runnable thread (`sched_yield`), so that spinning takes next to no time
//! from the clients, nodes or other processes sharing the core: measured, it
//! cost nothing in throughput where spinning without it did
//! (docs/performance.md). Once the window has passed without work, or an
//! empty round lasted a millisecond (the CPU is contended), the future waits
//! for the runtime's next real wake-up (the `on_thread_unpark` hook,
//! [`after_unpark`]) and spins again from there.

use std::cell::Cell;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// An empty round longer than this means the thread lost its CPU to another
/// (an empty round takes 1–2 µs): the CPU is contended, so the worker stops
/// spinning and sleeps.
const PREEMPTED: Duration = Duration::from_millis(1);

thread_local! {
    /// The spinning future's waker while it waits for the worker's next wake-up.
    static SLEEPING: Cell<Option<Waker>> = const { Cell::new(None) };
    /// Polls of this thread's [`Counted`] tasks: its work, as the spinning sees it.
    static POLLS: Cell<u64> = const { Cell::new(0) };
}

pin_project_lite::pin_project! {
    /// A worker's task whose polls count as work for busy polling. Costs one
    /// thread-local add per poll, busy polling or not.
    pub struct Counted<F> {
        #[pin]
        task: F,
    }
}

impl<F> Counted<F> {
    pub fn new(task: F) -> Counted<F> {
        Counted { task }
    }
}

impl<F: Future> Future for Counted<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        POLLS.set(POLLS.get().wrapping_add(1));
        self.project().task.poll(cx)
    }
}

/// The workers' `on_thread_unpark` hook: the worker was woken from a real
/// sleep, so it has events, and the spinning resumes.
pub fn after_unpark() {
    if let Some(waker) = SLEEPING.take() {
        waker.wake();
    }
}

/// Spins the current worker's runtime while it has had work within `window`;
/// never returns. Runs on a worker built with [`after_unpark`] as its
/// `on_thread_unpark` hook.
pub async fn spin(window: Duration) {
    let mut spinner = Spinner::new(window, Instant::now(), POLLS.get());
    loop {
        tokio::task::yield_now().await;
        match spinner.after_round(Instant::now(), POLLS.get()) {
            Next::Spin => {}
            Next::OfferCpu => {
                std::thread::yield_now();
                spinner.restart_round(Instant::now());
            }
            Next::Sleep => {
                next_wake_up().await;
                spinner = Spinner::new(window, Instant::now(), POLLS.get());
            }
        }
    }
}

/// What the worker does after a round of polling.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Poll again at once: the round did work.
    Spin,
    /// Let another runnable thread have the CPU, then poll again.
    OfferCpu,
    /// Sleep until the kernel has events for the worker.
    Sleep,
}

/// The spinning's state: when the worker last did work, when the current
/// round began, the work count then.
struct Spinner {
    window: Duration,
    last_work: Instant,
    round_began: Instant,
    polls: u64,
}

impl Spinner {
    fn new(window: Duration, now: Instant, polls: u64) -> Spinner {
        Spinner {
            window,
            last_work: now,
            round_began: now,
            polls,
        }
    }

    /// `polls`: the thread's work count now.
    fn after_round(&mut self, now: Instant, polls: u64) -> Next {
        let round = now.saturating_duration_since(self.round_began);
        self.round_began = now;
        if polls != self.polls {
            self.polls = polls;
            self.last_work = now;
            return Next::Spin;
        }
        if round >= PREEMPTED || now.saturating_duration_since(self.last_work) > self.window {
            Next::Sleep
        } else {
            Next::OfferCpu
        }
    }

    /// The time given away to other threads is no part of the next round.
    fn restart_round(&mut self, now: Instant) {
        self.round_began = now;
    }
}

/// Pending until [`after_unpark`] runs on this thread.
async fn next_wake_up() {
    let mut waiting = false;
    poll_fn(|cx| {
        if waiting {
            return Poll::Ready(());
        }
        waiting = true;
        SLEEPING.set(Some(cx.waker().clone()));
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_micros(50);

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// Drives a spinner through empty rounds of 1 µs from `from`, each
    /// followed by `given_away` for other threads, until it says to sleep;
    /// returns how long after `from` that was.
    fn empty_rounds_until_sleep(spinner: &mut Spinner, from: Instant, given_away: Duration) -> Duration {
        let mut t = from;
        loop {
            t += us(1);
            match spinner.after_round(t, 7) {
                Next::OfferCpu => {
                    t += given_away;
                    spinner.restart_round(t);
                }
                Next::Sleep => return t - from,
                Next::Spin => panic!("no work was done"),
            }
        }
    }

    #[test]
    fn empty_rounds_offer_the_cpu_until_the_window_has_passed_then_sleep() {
        let start = Instant::now();
        let mut spinner = Spinner::new(WINDOW, start, 7);
        assert_eq!(empty_rounds_until_sleep(&mut spinner, start, Duration::ZERO), us(51));
    }

    #[test]
    fn a_round_that_did_work_restarts_the_window() {
        let start = Instant::now();
        let mut spinner = Spinner::new(WINDOW, start, 6);
        let worked = start + us(40);
        assert_eq!(spinner.after_round(worked, 7), Next::Spin);
        assert_eq!(empty_rounds_until_sleep(&mut spinner, worked, Duration::ZERO), us(51));
    }

    #[test]
    fn a_long_round_is_not_work_and_time_given_away_counts_towards_the_window() {
        let start = Instant::now();
        let mut spinner = Spinner::new(WINDOW, start, 7);
        // Rounds of 1 µs, 30 µs given to other threads after each: slow
        // rounds that did no work, so the window still ends.
        assert_eq!(empty_rounds_until_sleep(&mut spinner, start, us(30)), us(63));
    }

    #[test]
    fn a_worker_that_lost_its_cpu_for_a_millisecond_sleeps() {
        let start = Instant::now();
        let mut spinner = Spinner::new(Duration::from_secs(3600), start, 7);
        assert_eq!(spinner.after_round(start + us(999), 7), Next::OfferCpu);
        assert_eq!(spinner.after_round(start + us(999) + PREEMPTED, 7), Next::Sleep);
    }

    #[test]
    fn counted_tasks_count_their_polls() {
        let before = POLLS.get();
        let mut task = std::pin::pin!(Counted::new(std::future::ready(5)));
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(task.as_mut().poll(&mut cx), Poll::Ready(5));
        assert_eq!(POLLS.get(), before + 1);
    }
}
