//! Calls waiting for a place among a route's calls in flight, or its targets'
//! (`routes[].queue_timeout_ms`, HAProxy's `timeout queue`): first come, first served, one
//! wake-up per place given back.
//!
//! Only the call at the head of the queue tries to take a place. A place given back wakes the
//! head alone (with a thousand calls queued, a release costs one wake-up, not a thousand, at the
//! moment the upstream is already the bottleneck); once the head has its place it leaves and
//! wakes the next call, which tries in turn (a second place may be free). A head that finds no
//! place (a reload lowered the limit, the place was on a target ejected since) keeps its turn.
//! While calls are queued, a newcomer joins the back instead of taking a place given back
//! before the head could: a keep-alive client of the thread that gave the place back would
//! otherwise win it every time, and the calls queued would only ever time out.
//!
//! No place given back goes unseen: a release gives the place back, then looks for waiters; a
//! call entering the queue counts itself, then tries. Both in `SeqCst` order, so one of the two
//! sees the other (the entering call finds the place, or the release finds the call and wakes
//! the head).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

/// The calls queued for one kind of place (a route's, or any of its targets'); shared by the
/// pools of a route across reloads, like the counts of calls in flight.
#[derive(Debug, Default)]
pub struct Queue {
    /// Calls in the queue (read without the lock by releases and newcomers).
    waiting: AtomicU32,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    /// In arrival order, so by increasing id; the head's waker is taken when it is woken.
    waiters: VecDeque<(u64, Option<Waker>)>,
}

impl State {
    /// Where the call `id` is in the line: a binary search (ids grow with arrival), so that
    /// calls leaving together (a burst reaching its deadline) cost O(log n) each, not O(n);
    /// they leave from near the head, where removing costs little too.
    fn position(&self, id: u64) -> Option<usize> {
        self.waiters.binary_search_by_key(&id, |(w, _)| *w).ok()
    }
}

impl Queue {
    /// Calls waiting now.
    pub fn len(&self) -> u32 {
        self.waiting.load(Ordering::SeqCst)
    }

    /// No call is waiting: a newcomer may take a free place directly.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A place was given back (after its count was lowered, `SeqCst`): wakes the head.
    pub fn released(&self) {
        if self.is_empty() {
            return;
        }
        let head = self.lock().waiters.front_mut().and_then(|(_, waker)| waker.take());
        if let Some(waker) = head {
            waker.wake();
        }
    }

    /// Waits in line until, at the head, `take` gives a place; [`NoPlace::TimedOut`] when
    /// `deadline` passed first, [`NoPlace::Full`] at once when `max_len` calls were waiting
    /// already. `take` runs under the queue's lock (it must not block: atomics only).
    pub async fn wait<T>(
        &self,
        deadline: tokio::time::Instant,
        max_len: Option<u32>,
        mut take: impl FnMut() -> Option<T>,
    ) -> Result<T, NoPlace> {
        let mut turn = Turn { queue: self, id: None, max_len };
        let got = tokio::time::timeout_at(deadline, std::future::poll_fn(|cx| turn.poll(cx, &mut take))).await;
        got.unwrap_or(Err(NoPlace::TimedOut))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why a call waited in vain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoPlace {
    /// The queue had its longest allowed line: refused without waiting.
    Full,
    /// No place came in time.
    TimedOut,
}

/// One call's place in the line; leaving it early (deadline, client gone) passes the turn on.
struct Turn<'a> {
    queue: &'a Queue,
    /// Set while in the line.
    id: Option<u64>,
    max_len: Option<u32>,
}

impl Turn<'_> {
    fn poll<T>(&mut self, cx: &mut Context<'_>, take: &mut impl FnMut() -> Option<T>) -> Poll<Result<T, NoPlace>> {
        let mut state = self.queue.lock();
        let id = match self.id {
            Some(id) => id,
            None if self.max_len.is_some_and(|max| state.waiters.len() >= max as usize) => {
                return Poll::Ready(Err(NoPlace::Full));
            }
            None => {
                let id = state.next_id;
                state.next_id += 1;
                state.waiters.push_back((id, None));
                self.queue.waiting.fetch_add(1, Ordering::SeqCst);
                self.id = Some(id);
                id
            }
        };
        let at_head = state.waiters.front().is_some_and(|(head, _)| *head == id);
        if at_head && let Some(place) = take() {
            state.waiters.pop_front();
            self.queue.waiting.fetch_sub(1, Ordering::SeqCst);
            self.id = None;
            // Another place may be free: the next call tries.
            let next = state.waiters.front_mut().and_then(|(_, waker)| waker.take());
            drop(state);
            if let Some(waker) = next {
                waker.wake();
            }
            return Poll::Ready(Ok(place));
        }
        if let Some((_, waker)) = state.position(id).and_then(|at| state.waiters.get_mut(at)) {
            match waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *waker = Some(cx.waker().clone()),
            }
        }
        Poll::Pending
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let Some(id) = self.id else { return };
        let mut state = self.queue.lock();
        let Some(at) = state.position(id) else { return };
        state.waiters.remove(at);
        self.queue.waiting.fetch_sub(1, Ordering::SeqCst);
        // The head may have been woken for a place it will not take now.
        let next = if at == 0 { state.waiters.front_mut().and_then(|(_, waker)| waker.take()) } else { None };
        drop(state);
        if let Some(waker) = next {
            waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;

    /// `places` free places of a limit, given back through the queue like `InFlight` does.
    struct Places {
        free: AtomicU32,
        queue: Queue,
        tries: AtomicUsize,
    }

    impl Places {
        fn new(free: u32) -> Arc<Self> {
            Arc::new(Self { free: AtomicU32::new(free), queue: Queue::default(), tries: AtomicUsize::new(0) })
        }

        fn take(&self) -> Option<()> {
            self.tries.fetch_add(1, Ordering::SeqCst);
            self.free.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).ok().map(drop)
        }

        fn give_back(&self) {
            self.free.fetch_add(1, Ordering::SeqCst);
            self.queue.released();
        }

        /// Queues a call that records its arrival index when it gets a place.
        fn spawn_waiter(
            self: &Arc<Self>,
            i: usize,
            served: &Arc<Mutex<Vec<usize>>>,
            within: Duration,
        ) -> tokio::task::JoinHandle<bool> {
            let (places, served) = (Arc::clone(self), Arc::clone(served));
            tokio::spawn(async move {
                let got = places.queue.wait(tokio::time::Instant::now() + within, None, || places.take()).await;
                if got.is_ok() {
                    served.lock().unwrap().push(i);
                }
                got.is_ok()
            })
        }
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn calls_get_places_in_arrival_order_with_one_try_per_place() {
        let places = Places::new(0);
        let served = Arc::new(Mutex::new(Vec::new()));
        let n = 50;
        let waiters: Vec<_> = (0..n).map(|i| places.spawn_waiter(i, &served, Duration::from_secs(10))).collect();
        settle().await;
        assert_eq!(places.queue.len(), 50);
        let tries_queued = places.tries.load(Ordering::SeqCst);
        assert_eq!(tries_queued, 1, "only the head tries while no place is free");
        for _ in 0..n {
            places.give_back();
            settle().await;
        }
        for w in waiters {
            assert!(w.await.unwrap());
        }
        assert_eq!(*served.lock().unwrap(), (0..n).collect::<Vec<_>>());
        // Each place given back: the head's successful try, then the next head's try that
        // finds nothing (not 50 tries per place, as waking every waiter would cost).
        let tries = places.tries.load(Ordering::SeqCst) - tries_queued;
        assert!(tries <= 2 * n, "{tries} tries for {n} places");
        assert!(places.queue.is_empty());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn places_given_back_at_once_serve_as_many_calls() {
        let places = Places::new(0);
        let served = Arc::new(Mutex::new(Vec::new()));
        let waiters: Vec<_> = (0..4).map(|i| places.spawn_waiter(i, &served, Duration::from_secs(10))).collect();
        settle().await;
        // Three places come back before any waiter runs: three calls go, in order.
        for _ in 0..3 {
            places.give_back();
        }
        settle().await;
        assert_eq!(*served.lock().unwrap(), [0, 1, 2]);
        assert_eq!(places.queue.len(), 1);
        places.give_back();
        for w in waiters {
            assert!(w.await.unwrap());
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_head_that_leaves_passes_its_turn_on() {
        let places = Places::new(0);
        let served = Arc::new(Mutex::new(Vec::new()));
        let first = places.spawn_waiter(0, &served, Duration::from_secs(10));
        settle().await;
        let second = places.spawn_waiter(1, &served, Duration::from_secs(10));
        let third = places.spawn_waiter(2, &served, Duration::from_millis(50));
        settle().await;
        // The place comes back and the head is woken, but its client goes away before it
        // runs: the place goes to the next call.
        places.give_back();
        first.abort();
        assert!(first.await.unwrap_err().is_cancelled());
        settle().await;
        assert_eq!(*served.lock().unwrap(), [1]);
        assert!(second.await.unwrap());
        // The third gives up at its deadline and leaves the line.
        assert!(!third.await.unwrap());
        assert!(places.queue.is_empty());
        // A head that finds no place keeps its turn ahead of later calls.
        let head = places.spawn_waiter(3, &served, Duration::from_secs(10));
        settle().await;
        let later = places.spawn_waiter(4, &served, Duration::from_secs(10));
        settle().await;
        places.queue.released(); // woken, but no place was given back
        settle().await;
        places.give_back();
        settle().await;
        places.give_back();
        assert!(head.await.unwrap() && later.await.unwrap());
        assert_eq!(*served.lock().unwrap(), [1, 3, 4]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn calls_leaving_from_anywhere_in_the_line_keep_the_others_in_order() {
        let places = Places::new(0);
        let served = Arc::new(Mutex::new(Vec::new()));
        let n = 300;
        let mut waiters: Vec<_> =
            (0..n).map(|i| Some(places.spawn_waiter(i, &served, Duration::from_secs(10)))).collect();
        settle().await;
        // Every third call's client goes away, from the head, the middle and the back.
        for w in waiters.iter_mut().step_by(3) {
            let w = w.take().unwrap();
            w.abort();
            assert!(w.await.unwrap_err().is_cancelled());
        }
        assert_eq!(places.queue.len(), 200);
        for _ in 0..200 {
            places.give_back();
            settle().await;
        }
        for w in waiters.into_iter().flatten() {
            assert!(w.await.unwrap());
        }
        let kept: Vec<usize> = (0..n).filter(|i| i % 3 != 0).collect();
        assert_eq!(*served.lock().unwrap(), kept);
        assert!(places.queue.is_empty());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_queue_refuses_at_once() {
        let places = Places::new(0);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let places = Arc::clone(&places);
                tokio::spawn(async move { places.queue.wait(deadline, Some(2), || places.take()).await })
            })
            .collect();
        settle().await;
        let start = std::time::Instant::now();
        assert_eq!(places.queue.wait(deadline, Some(2), || places.take()).await, Err(NoPlace::Full));
        assert!(start.elapsed() < Duration::from_secs(1));
        assert_eq!(places.queue.len(), 2, "the refused call did not join the line");
        places.give_back();
        settle().await;
        // One left the line: room for one more.
        let third = tokio::spawn({
            let places = Arc::clone(&places);
            async move { places.queue.wait(deadline, Some(2), || places.take()).await }
        });
        settle().await;
        assert_eq!(places.queue.len(), 2);
        places.give_back();
        places.give_back();
        for w in waiters.into_iter().chain([third]) {
            assert_eq!(w.await.unwrap(), Ok(()));
        }
    }

    #[test]
    fn no_place_given_back_goes_unseen_between_threads() {
        // One place, handed back and forth between two threads' calls that queue for it.
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let places = Places::new(1);
            let served = Arc::new(AtomicUsize::new(0));
            let workers: Vec<_> = (0..8)
                .map(|_| {
                    let (places, served) = (Arc::clone(&places), Arc::clone(&served));
                    tokio::spawn(async move {
                        for _ in 0..500 {
                            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                            let fast = places.queue.is_empty().then(|| places.take()).flatten();
                            if fast.is_none() {
                                places.queue.wait(deadline, None, || places.take()).await.unwrap();
                            }
                            served.fetch_add(1, Ordering::SeqCst);
                            tokio::task::yield_now().await;
                            places.give_back();
                        }
                    })
                })
                .collect();
            for w in workers {
                w.await.unwrap();
            }
            assert_eq!(served.load(Ordering::SeqCst), 4000);
            assert_eq!(places.free.load(Ordering::SeqCst), 1);
            assert!(places.queue.is_empty());
        });
    }
}
