//! The edge's queue for places (`routes[].queue_timeout_ms`, `tollgate_edge::queue::Queue`):
//! the CPU time it costs to hand a place to a line of N waiting calls. Places come back one at
//! a time, 1 ms apart (as calls to the upstream end; time for the line to settle between
//! them), and the CPU time of all the program's threads is divided by the places handed over.
//! Baselines in the same run: tokio's fair `Semaphore` (one wake-up per permit, the standard
//! fair queue) and waking every waiter for each place (`Notify::notify_waiters`, each waiter
//! trying again: the edge's queue before this one), whose cost grows with the line. Also the
//! CPU time per call of joining a line of N (spawning its task, queueing it: the line is
//! found by a binary search of its ids), against the Semaphore's.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tollgate_edge::queue::Queue;

use crate::common::median;

/// Places handed over per measurement.
const HANDED: usize = 200;
const GAP: Duration = Duration::from_millis(1);

#[derive(Clone, Copy)]
enum Kind {
    Edge,
    Semaphore,
    WakeAll,
}

/// The places, and the line of calls waiting for them.
struct Line {
    free: Arc<AtomicU32>,
    queue: Arc<Queue>,
    semaphore: Arc<Semaphore>,
    freed: Arc<Notify>,
    calls: Vec<JoinHandle<()>>,
}

/// On the program's runtime (one worker thread per CPU).
pub async fn run(runs: usize) -> anyhow::Result<()> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "queue: CPU µs (all threads) per place handed to a line of N waiting calls, places 1 ms apart, \
         {threads} threads, median of {runs} runs"
    );
    println!(
        "| waiting calls | idle (no line) | edge queue | tokio Semaphore | wake every waiter | edge / Semaphore | wake every waiter / edge |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut joined = Vec::new();
    for n in [10, 100, 1_000, 10_000] {
        let (mut idle, mut ours, mut sem, mut all) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut join_ours, mut join_sem) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            idle.push(idle_cpu_us().await);
            let (per_place, per_join) = measure(Kind::Edge, n).await;
            ours.push(per_place);
            join_ours.push(per_join);
            let (per_place, per_join) = measure(Kind::Semaphore, n).await;
            sem.push(per_place);
            join_sem.push(per_join);
            all.push(measure(Kind::WakeAll, n).await.0);
        }
        let (idle, ours, sem, all) = (median(&mut idle), median(&mut ours), median(&mut sem), median(&mut all));
        println!("| {n} | {idle:.1} | {ours:.1} | {sem:.1} | {all:.1} | {:.2}× | {:.1}× |", ours / sem, all / ours);
        joined.push((n, median(&mut join_ours), median(&mut join_sem)));
    }
    println!();
    println!("queue: CPU µs (all threads) per call joining a line of N (its task spawned and first polled)");
    println!("| calls in line | edge queue | tokio Semaphore | edge / Semaphore |");
    println!("| ---: | ---: | ---: | ---: |");
    for (n, ours, sem) in joined {
        println!("| {n} | {ours:.2} | {sem:.2} | {:.2}× |", ours / sem);
    }
    Ok(())
}

/// CPU µs per place for `kind` with `n` calls waiting, and per call joining the line.
async fn measure(kind: Kind, n: usize) -> (f64, f64) {
    let (served, mut taken) = unbounded_channel();
    let start = cpu_ns();
    let line = Line::queue(kind, n, &served).await;
    let per_join = cpu_ns().saturating_sub(start) as f64 / n as f64 / 1000.0;
    let start = cpu_ns();
    for _ in 0..HANDED {
        line.give_back(kind);
        let _ = taken.recv().await;
        tokio::time::sleep(GAP).await;
    }
    let per = cpu_ns().saturating_sub(start) as f64 / HANDED as f64 / 1000.0;
    line.close(&mut taken).await;
    (per, per_join)
}

/// The same loop's CPU with nobody waiting: the driver's sleeps and the runtime's own.
async fn idle_cpu_us() -> f64 {
    let start = cpu_ns();
    for _ in 0..HANDED {
        tokio::task::yield_now().await;
        tokio::time::sleep(GAP).await;
    }
    cpu_ns().saturating_sub(start) as f64 / HANDED as f64 / 1000.0
}

impl Line {
    async fn queue(kind: Kind, n: usize, served: &UnboundedSender<()>) -> Self {
        let mut line = Self {
            free: Arc::default(),
            queue: Arc::default(),
            semaphore: Arc::new(Semaphore::new(0)),
            freed: Arc::default(),
            calls: Vec::with_capacity(n),
        };
        for _ in 0..n {
            let served = served.clone();
            let (free, queue, semaphore, freed) =
                (Arc::clone(&line.free), Arc::clone(&line.queue), Arc::clone(&line.semaphore), Arc::clone(&line.freed));
            let take = move || free.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |f| f.checked_sub(1)).ok();
            // A call that got its place queues again (the next call of a steady stream), so
            // the line stays N long.
            line.calls.push(tokio::spawn(async move {
                loop {
                    match kind {
                        Kind::Edge => {
                            let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
                            queue.wait(deadline, None, &take).await.expect("a place");
                        }
                        Kind::Semaphore => semaphore.acquire().await.expect("open").forget(),
                        Kind::WakeAll => loop {
                            let notified = freed.notified();
                            tokio::pin!(notified);
                            notified.as_mut().enable();
                            if take().is_some() {
                                break;
                            }
                            notified.await;
                        },
                    }
                    let _ = served.send(());
                }
            }));
        }
        // Every call in line (the semaphore and `Notify` do not say how many wait).
        while line.queue.len() < n as u32 && matches!(kind, Kind::Edge) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(50 + n as u64 / 20)).await;
        line
    }

    /// One place back, as the end of a call to the upstream gives it.
    fn give_back(&self, kind: Kind) {
        match kind {
            Kind::Edge => {
                self.free.fetch_add(1, Ordering::SeqCst);
                self.queue.released();
            }
            Kind::Semaphore => self.semaphore.add_permits(1),
            Kind::WakeAll => {
                self.free.fetch_add(1, Ordering::SeqCst);
                self.freed.notify_waiters();
            }
        }
    }

    /// The calls still waiting leave the line.
    async fn close(self, taken: &mut UnboundedReceiver<()>) {
        for call in &self.calls {
            call.abort();
        }
        for call in self.calls {
            let _ = call.await;
        }
        while taken.try_recv().is_ok() {}
    }
}

/// CPU time of all the program's threads, ns (`/proc/self/task/*/schedstat`).
fn cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0 };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}
