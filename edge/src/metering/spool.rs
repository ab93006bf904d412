//! The on-disk spool: where events go when Kafka cannot take them (librdkafka's queue is full,
//! a delivery failed after `message.timeout.ms`, or the producer finds Kafka down or without
//! the event topic), so that no event is lost while Kafka is
//! slow or down. A replay task sends them back, oldest first, once Kafka accepts messages.
//!
//! Layout: a directory of segment files `<seq>.spool`, each a sequence of records
//! `[u32 LE body length][u32 LE CRC-32 of body][body = u16 LE key length, key, payload]`.
//! One writer thread appends (so file I/O never runs on the async runtime), rotates the
//! segment once it is non-empty and 1 s old (or 8 MiB), and fsyncs per [`FsyncPolicy`].
//! Closed segments are replayed ([`SegmentReader`]: a batch of records at a time, not the
//! whole segment in memory) and deleted only after every record in them was acknowledged by
//! Kafka or written to the spool again. The spool is bounded by `spool.max_bytes`; when
//! full, new events are dropped and counted.
//!
//! What a crash can lose: a `kill -9` loses the events still in memory (the edge's queue,
//! librdkafka's queue, this writer's channel; during a Kafka outage only those of the seconds
//! before the producer's probe noticed it), never what the writer has written (the page cache
//! survives the process). A power loss or kernel crash can also lose, with `fsync =
//! "interval"` (default), the records of the last `fsync_interval_ms`; with `"always"`, none.
//! The segment being written stays marked open (`<seq>.open`); the next start closes it and
//! replays it. A clean shutdown closes it with [`Spool::close`].

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// When the writer calls fsync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// After every write batch (each wake-up of the writer thread).
    Always,
    /// At most this long after a write.
    Interval(Duration),
}

/// Spool settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub fsync: FsyncPolicy,
}

const SEGMENT_MAX_BYTES: u64 = 8 << 20;
const SEGMENT_MAX_AGE: Duration = Duration::from_secs(1);
const HEADER: usize = 8;
const MAX_RECORD: usize = 16 << 20;

/// One spooled message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
}

/// Counters shared with metrics.
#[derive(Debug, Default)]
pub struct SpoolStats {
    /// Records written to the spool.
    pub spooled: AtomicU64,
    /// Records dropped because the spool was full or its disk failed.
    pub dropped: AtomicU64,
    /// Bytes in segment files (closed and current).
    pub bytes: AtomicU64,
    /// Bytes of records handed to the writer and not written yet (they count against
    /// `max_bytes` too).
    pub pending: AtomicU64,
    /// Records found corrupt (torn tail after a crash) and skipped.
    pub corrupt: AtomicU64,
    /// True while the last write failed.
    pub failing: std::sync::atomic::AtomicBool,
    /// True once the writer has stopped ([`Spool::close`]): appends are refused and counted.
    pub stopped: std::sync::atomic::AtomicBool,
    /// The configured bound (`spool.max_bytes`).
    pub max_bytes: u64,
}

/// Bytes a record takes in a segment (and counts against `max_bytes`).
/// (A key is cut at `u16::MAX` bytes, as [`encode_record`] does.)
fn record_size(key: &[u8], payload: &[u8]) -> u64 {
    (HEADER + 2 + key.len().min(usize::from(u16::MAX)) + payload.len()) as u64
}

/// How long [`Spool::append`] waits for room in the writer's queue before it drops a record.
pub const APPEND_PATIENCE: Duration = Duration::from_secs(10);

/// Room a spool must have left to count as usable for `/readyz` (a few hundred events).
pub const READY_HEADROOM: u64 = 64 * 1024;

impl SpoolStats {
    /// True when the spool has fewer than [`READY_HEADROOM`] bytes left: events are about to
    /// be (or are being) dropped if Kafka cannot take them.
    pub fn nearly_full(&self) -> bool {
        let used = self.bytes.load(Ordering::Relaxed) + self.pending.load(Ordering::Relaxed);
        used.saturating_add(READY_HEADROOM) > self.max_bytes
    }
}

/// The appending side, cheap to clone; usable from any thread.
#[derive(Clone, Debug)]
pub struct Spool {
    tx: mpsc::SyncSender<Msg>,
    stats: Arc<SpoolStats>,
    dir: PathBuf,
    /// Held while the writer rotates, so the replayer never reads a segment being written.
    closed: Arc<Mutex<()>>,
}

/// What the writer thread is sent.
#[derive(Debug)]
enum Msg {
    Record(Record),
    /// Close the current segment (flushed, synced, no longer marked open) and stop; then
    /// answer.
    Close(mpsc::Sender<()>),
}

/// Why the spool cannot start.
#[derive(Debug, thiserror::Error)]
#[error("spool directory {dir}: {source}")]
pub struct SpoolError {
    pub dir: String,
    #[source]
    pub source: std::io::Error,
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.spool"))
}

/// Sorted (seq, path) of the segment files in `dir`.
pub fn segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let seq = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".spool"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(seq) = seq {
            out.push((seq, path));
        }
    }
    out.sort();
    Ok(out)
}

pub fn encode_record(key: &[u8], payload: &[u8], out: &mut Vec<u8>) {
    let key_len = u16::try_from(key.len()).unwrap_or(u16::MAX);
    let key = &key[..usize::from(key_len)];
    let body_len = 2 + key.len() + payload.len();
    let start = out.len();
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&key_len.to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out[start + HEADER..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Reads a segment's records. A torn or corrupt tail ends the segment; the count of records
/// lost that way is returned (1 when the tail is unreadable).
pub fn read_segment(path: &Path) -> std::io::Result<(Vec<Record>, u64)> {
    let mut reader = SegmentReader::open(path)?;
    let mut records = Vec::new();
    loop {
        let batch = reader.next_batch(usize::MAX)?;
        records.extend(batch.records);
        if let Some(lost) = batch.end {
            return Ok((records, lost));
        }
    }
}

/// Reads a segment a batch of records at a time, so that replaying it holds one batch in
/// memory rather than the whole segment (up to 8 MiB on disk, more as records).
pub struct SegmentReader {
    file: std::io::BufReader<File>,
}

/// Records read by [`SegmentReader::next_batch`].
#[derive(Debug)]
pub struct Batch {
    pub records: Vec<Record>,
    /// `Some(lost)` once the segment ends: 0 at a clean end, 1 when a torn or corrupt tail
    /// ended it (the record there, and whatever follows, is lost).
    pub end: Option<u64>,
}

impl SegmentReader {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        Ok(Self { file: std::io::BufReader::with_capacity(256 << 10, File::open(path)?) })
    }

    /// The next records, at most `max`. Only a failing read is an error; a short or corrupt
    /// record ends the segment (`end: Some(1)`).
    pub fn next_batch(&mut self, max: usize) -> std::io::Result<Batch> {
        let mut records = Vec::with_capacity(max.min(1024));
        while records.len() < max {
            match self.next_record()? {
                Next::Record(r) => records.push(r),
                Next::End => return Ok(Batch { records, end: Some(0) }),
                Next::Torn => return Ok(Batch { records, end: Some(1) }),
            }
        }
        Ok(Batch { records, end: None })
    }

    fn next_record(&mut self) -> std::io::Result<Next> {
        if self.file.fill_buf()?.is_empty() {
            return Ok(Next::End);
        }
        let mut header = [0u8; HEADER];
        if !read_or_eof(self.file.read_exact(&mut header))? {
            return Ok(Next::Torn);
        }
        let [l0, l1, l2, l3, c0, c1, c2, c3] = header;
        let len = u32::from_le_bytes([l0, l1, l2, l3]) as usize;
        let crc = u32::from_le_bytes([c0, c1, c2, c3]);
        if !(2..=MAX_RECORD).contains(&len) {
            return Ok(Next::Torn);
        }
        let mut body = vec![0u8; len];
        if !read_or_eof(self.file.read_exact(&mut body))? || crc32fast::hash(&body) != crc {
            return Ok(Next::Torn);
        }
        let key_len = usize::from(u16::from_le_bytes([body[0], body[1]]));
        if 2 + key_len > len {
            return Ok(Next::Torn);
        }
        let key = body[2..2 + key_len].to_vec();
        body.drain(..2 + key_len);
        Ok(Next::Record(Record { key, payload: body }))
    }
}

enum Next {
    Record(Record),
    End,
    Torn,
}

/// A `read_exact` result: whether the buffer was filled (false when the file ended first).
fn read_or_eof(read: std::io::Result<()>) -> std::io::Result<bool> {
    match read {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

impl Spool {
    /// Opens (creating) the directory and starts the writer thread. Segments left by a
    /// previous run are kept for replay; the new run writes after them.
    pub fn open(cfg: &SpoolConfig) -> Result<Self, SpoolError> {
        let err = |source| SpoolError { dir: cfg.dir.display().to_string(), source };
        fs::create_dir_all(&cfg.dir).map_err(err)?;
        // One edge per directory: a second one would replay (and delete) the segments the
        // first is writing.
        let lock =
            OpenOptions::new().create(true).truncate(false).write(true).open(cfg.dir.join(".lock")).map_err(err)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(err(std::io::Error::other(
                    "in use by another process (its `.lock` is held); give each edge its own spool.dir",
                )));
            }
            Err(fs::TryLockError::Error(e)) => return Err(err(e)),
        }
        let existing = segments(&cfg.dir).map_err(err)?;
        let stats = Arc::new(SpoolStats { max_bytes: cfg.max_bytes, ..SpoolStats::default() });
        let mut total = 0;
        for (_, p) in &existing {
            total += fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        }
        stats.bytes.store(total, Ordering::Relaxed);
        // Probe that the directory is writable now rather than at the first outage.
        let probe = cfg.dir.join(".probe");
        fs::write(&probe, b"ok").map_err(err)?;
        let _ = fs::remove_file(&probe);
        // A segment still marked open was being written when the previous run ended without
        // closing its spool (a crash, a kill -9): nothing writes it any more, so it is closed
        // now and replayed like the others (a torn last record is cut when it is read).
        for (seq, _) in &existing {
            let marker = cfg.dir.join(format!("{seq:020}.open"));
            if marker.exists() {
                tracing::warn!(segment = seq, "spool segment left open by the previous run; replaying it");
                fs::remove_file(&marker).map_err(err)?;
            }
        }
        let next_seq = existing.last().map_or(0, |(s, _)| s + 1);
        let (tx, rx) = mpsc::sync_channel(16_384);
        let closed = Arc::new(Mutex::new(()));
        let writer = Writer {
            dir: cfg.dir.clone(),
            fsync: cfg.fsync,
            stats: Arc::clone(&stats),
            next_seq,
            current: None,
            closed: Arc::clone(&closed),
            lock: Some(lock),
        };
        std::thread::Builder::new().name("tollgate-spool".into()).spawn(move || writer.run(rx)).map_err(err)?;
        Ok(Self { tx, stats, dir: cfg.dir.clone(), closed })
    }

    /// Hands a record to the writer thread. Returns false (and counts a drop) when the spool
    /// is full (`max_bytes`, counting records not written yet) or its writer is gone.
    ///
    /// Waits while the writer's queue is full (a burst: librdkafka fails its whole queue at
    /// once when it is purged at shutdown or when an outage outlives the message timeout), up
    /// to [`APPEND_PATIENCE`]: so only for callers that may wait, the delivery callback's
    /// thread and blocking tasks, never the request path or an async task.
    pub fn append(&self, key: &[u8], payload: &[u8]) -> bool {
        self.append_within(key, payload, APPEND_PATIENCE)
    }

    /// [`Spool::append`] without waiting, for the request path: a full writer queue is a drop
    /// too (counted, not logged: the caller may be handling thousands of requests a second).
    pub fn try_append(&self, key: &[u8], payload: &[u8]) -> bool {
        self.append_within(key, payload, Duration::ZERO)
    }

    fn append_within(&self, key: &[u8], payload: &[u8], patience: Duration) -> bool {
        let size = record_size(key, payload);
        let pending = self.stats.pending.fetch_add(size, Ordering::Relaxed) + size;
        if self.stats.stopped.load(Ordering::Acquire)
            || self.stats.bytes.load(Ordering::Relaxed) + pending > self.stats.max_bytes
        {
            return self.refused(size);
        }
        let record = Msg::Record(Record { key: key.to_vec(), payload: payload.to_vec() });
        match self.send_until(record, Instant::now() + patience) {
            Ok(()) => true,
            Err(mpsc::TrySendError::Full(_)) => {
                if !patience.is_zero() {
                    tracing::error!("the spool writer took nothing for {patience:?}; event dropped");
                }
                self.refused(size)
            }
            Err(mpsc::TrySendError::Disconnected(_)) => self.refused(size),
        }
    }

    /// Sends `msg` to the writer, waiting for room in its queue until `deadline`.
    fn send_until(&self, mut msg: Msg, deadline: Instant) -> Result<(), mpsc::TrySendError<Msg>> {
        loop {
            match self.tx.try_send(msg) {
                Err(mpsc::TrySendError::Full(back)) if Instant::now() < deadline => {
                    msg = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                sent => return sent,
            }
        }
    }

    /// Writes what the writer was given, closes its segment and stops it, waiting up to
    /// `timeout`; at shutdown, once nothing appends any more (later appends are dropped and
    /// counted). Returns whether the writer confirmed. Blocks: call it off async threads.
    pub fn close(&self, timeout: Duration) -> bool {
        let (done, confirmed) = mpsc::channel();
        let deadline = Instant::now() + timeout;
        self.send_until(Msg::Close(done), deadline).is_ok()
            && confirmed.recv_timeout(deadline.saturating_duration_since(Instant::now())).is_ok()
    }

    fn refused(&self, size: u64) -> bool {
        self.stats.pending.fetch_sub(size, Ordering::Relaxed);
        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        false
    }

    pub fn stats(&self) -> &Arc<SpoolStats> {
        &self.stats
    }

    /// The oldest closed segment (not being written), if any.
    pub fn oldest_closed(&self) -> std::io::Result<Option<(u64, PathBuf)>> {
        let _guard = self.closed.lock().unwrap_or_else(|p| p.into_inner());
        let segs = segments(&self.dir)?;
        // The writer's current segment has a `.open` marker file beside it.
        Ok(segs.into_iter().find(|(seq, _)| !self.dir.join(format!("{seq:020}.open")).exists()))
    }

    /// Deletes a replayed segment.
    pub fn remove(&self, path: &Path) -> std::io::Result<()> {
        let len = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        fs::remove_file(path)?;
        self.stats.bytes.fetch_sub(len.min(self.stats.bytes.load(Ordering::Relaxed)), Ordering::Relaxed);
        Ok(())
    }

    /// True when no record is on disk or waiting for the writer.
    pub fn is_empty(&self) -> bool {
        self.stats.bytes.load(Ordering::Relaxed) == 0 && self.stats.pending.load(Ordering::Relaxed) == 0
    }
}

struct Current {
    seq: u64,
    file: BufWriter<File>,
    opened: Instant,
    bytes: u64,
    dirty_since: Option<Instant>,
}

struct Writer {
    /// The directory's lock, held while the writer runs (released before `close` returns).
    lock: Option<File>,
    dir: PathBuf,
    fsync: FsyncPolicy,
    stats: Arc<SpoolStats>,
    next_seq: u64,
    current: Option<Current>,
    closed: Arc<Mutex<()>>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        let mut buf = Vec::with_capacity(64 << 10);
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(Msg::Close(done)) => return self.finish(&done, &rx),
                Ok(Msg::Record(first)) => {
                    buf.clear();
                    let (mut n, mut closing) = (1, None);
                    encode_record(&first.key, &first.payload, &mut buf);
                    while let Ok(msg) = rx.try_recv() {
                        match msg {
                            Msg::Record(r) => encode_record(&r.key, &r.payload, &mut buf),
                            Msg::Close(done) => {
                                closing = Some(done);
                                break;
                            }
                        }
                        n += 1;
                        if buf.len() > 1 << 20 {
                            break;
                        }
                    }
                    let written = self.write(&buf);
                    self.stats.pending.fetch_sub(buf.len() as u64, Ordering::Relaxed);
                    self.stats.failing.store(written.is_err(), Ordering::Relaxed);
                    if let Err(e) = written {
                        self.stats.dropped.fetch_add(n, Ordering::Relaxed);
                        tracing::error!(error = %e, records = n, "spool write failed; events dropped");
                        self.current = None;
                    } else {
                        self.stats.spooled.fetch_add(n, Ordering::Relaxed);
                    }
                    if let Some(done) = closing {
                        return self.finish(&done, &rx);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.close_current();
                    return;
                }
            }
            self.maintain();
        }
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.current.is_none() {
            let seq = self.next_seq;
            self.next_seq += 1;
            fs::write(self.dir.join(format!("{seq:020}.open")), b"")?;
            let file = OpenOptions::new().create(true).append(true).open(segment_path(&self.dir, seq))?;
            self.current =
                Some(Current { seq, file: BufWriter::new(file), opened: Instant::now(), bytes: 0, dirty_since: None });
        }
        let Some(cur) = self.current.as_mut() else { return Ok(()) };
        cur.file.write_all(bytes)?;
        cur.file.flush()?;
        cur.bytes += bytes.len() as u64;
        cur.dirty_since.get_or_insert_with(Instant::now);
        self.stats.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if self.fsync == FsyncPolicy::Always {
            cur.file.get_ref().sync_data()?;
            cur.dirty_since = None;
        }
        Ok(())
    }

    fn maintain(&mut self) {
        let Some(cur) = self.current.as_mut() else { return };
        if let (FsyncPolicy::Interval(every), Some(since)) = (self.fsync, cur.dirty_since)
            && since.elapsed() >= every
        {
            if let Err(e) = cur.file.get_ref().sync_data() {
                tracing::error!(error = %e, "spool fsync failed");
            }
            cur.dirty_since = None;
        }
        if cur.bytes >= SEGMENT_MAX_BYTES || cur.opened.elapsed() >= SEGMENT_MAX_AGE {
            self.close_current();
        }
    }

    /// Ends the writer on [`Spool::close`]: later appends refused, records that raced the close
    /// into the queue counted as dropped (never lost silently), the segment closed, the
    /// directory unlocked, then the answer.
    fn finish(&mut self, done: &mpsc::Sender<()>, rx: &mpsc::Receiver<Msg>) {
        self.stats.stopped.store(true, Ordering::Release);
        while let Ok(msg) = rx.try_recv() {
            if let Msg::Record(r) = msg {
                let size = record_size(&r.key, &r.payload);
                self.stats.pending.fetch_sub(size, Ordering::Relaxed);
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.close_current();
        self.lock = None;
        let _ = done.send(());
    }

    fn close_current(&mut self) {
        if let Some(mut cur) = self.current.take() {
            let _guard = self.closed.lock().unwrap_or_else(|p| p.into_inner());
            let _ = cur.file.flush();
            if let Err(e) = cur.file.get_ref().sync_data() {
                tracing::error!(error = %e, "spool fsync failed");
            }
            let _ = fs::remove_file(self.dir.join(format!("{:020}.open", cur.seq)));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn tmp() -> PathBuf {
        let d = std::env::temp_dir().join(format!("spool-test-{}", uuid::Uuid::now_v7()));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn records_round_trip_and_a_torn_tail_is_cut() {
        let d = tmp();
        let mut bytes = Vec::new();
        encode_record(b"acme", b"payload-1", &mut bytes);
        encode_record(b"", b"payload-2", &mut bytes);
        let full = bytes.len();
        encode_record(b"globex", b"payload-3", &mut bytes);
        bytes.truncate(bytes.len() - 2);
        let p = segment_path(&d, 0);
        fs::write(&p, &bytes).unwrap();
        let (records, lost) = read_segment(&p).unwrap();
        assert_eq!(
            records,
            vec![
                Record { key: b"acme".to_vec(), payload: b"payload-1".to_vec() },
                Record { key: vec![], payload: b"payload-2".to_vec() },
            ]
        );
        assert_eq!(lost, 1);
        // A flipped byte fails the CRC.
        bytes.truncate(full);
        bytes[12] ^= 1;
        fs::write(&p, &bytes).unwrap();
        assert_eq!(read_segment(&p).unwrap().0.len(), 0);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_segment_is_read_in_batches_in_order_up_to_a_torn_tail() {
        let d = tmp();
        let mut bytes = Vec::new();
        for i in 0..10u32 {
            encode_record(format!("k{i}").as_bytes(), &i.to_le_bytes(), &mut bytes);
        }
        let p = segment_path(&d, 0);
        fs::write(&p, &bytes).unwrap();
        let payloads = |b: &Batch| b.records.iter().map(|r| r.payload[0]).collect::<Vec<_>>();
        let mut reader = SegmentReader::open(&p).unwrap();
        let mut got = Vec::new();
        for (want, end) in [(vec![0, 1, 2, 3], None), (vec![4, 5, 6, 7], None), (vec![8, 9], Some(0))] {
            let batch = reader.next_batch(4).unwrap();
            assert_eq!((payloads(&batch), batch.end), (want, end));
            got.extend(batch.records);
        }
        assert_eq!(got[9], Record { key: b"k9".to_vec(), payload: 9u32.to_le_bytes().to_vec() });
        // A segment of exactly one batch ends in the next (empty) one.
        let mut reader = SegmentReader::open(&p).unwrap();
        assert_eq!(reader.next_batch(10).unwrap().end, None);
        let last = reader.next_batch(10).unwrap();
        assert_eq!((last.records.len(), last.end), (0, Some(0)));
        // Cut inside record 6's body: 0..=5 are read, then the tail counts as one lost.
        let cut = bytes.len() - 4 * (HEADER + 2 + 2 + 4) + 3;
        fs::write(&p, &bytes[..cut]).unwrap();
        let mut reader = SegmentReader::open(&p).unwrap();
        assert_eq!(reader.next_batch(4).unwrap().end, None);
        let batch = reader.next_batch(4).unwrap();
        assert_eq!((payloads(&batch), batch.end), (vec![4, 5], Some(1)));
        // A length field beyond the limit is corruption too, not an allocation of it.
        let mut huge = bytes[..HEADER + 2 + 2 + 4].to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&[0; 4]);
        fs::write(&p, &huge).unwrap();
        let batch = SegmentReader::open(&p).unwrap().next_batch(4).unwrap();
        assert_eq!((payloads(&batch), batch.end), (vec![0], Some(1)));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn appended_records_become_closed_segments_in_order() {
        let d = tmp();
        let spool =
            Spool::open(&SpoolConfig { dir: d.clone(), max_bytes: 1 << 20, fsync: FsyncPolicy::Always }).unwrap();
        for i in 0..100u32 {
            assert!(spool.append(b"k", &i.to_le_bytes()));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let (seq, path) = loop {
            if let Some(s) = spool.oldest_closed().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "no segment closed");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(seq, 0);
        let (records, lost) = read_segment(&path).unwrap();
        assert_eq!(lost, 0);
        let got: Vec<u32> = records.iter().map(|r| u32::from_le_bytes(r.payload[..4].try_into().unwrap())).collect();
        assert_eq!(got, (0..100).collect::<Vec<_>>());
        spool.remove(&path).unwrap();
        assert!(spool.is_empty());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_burst_larger_than_the_writers_queue_is_spooled_whole() {
        // librdkafka fails a whole queue at once (a purge at shutdown, or the message timeout
        // of an outage): 100,000 records in a burst, far more than the writer's queue holds.
        let d = tmp();
        let spool = Spool::open(&SpoolConfig {
            dir: d.clone(),
            max_bytes: 1 << 30,
            fsync: FsyncPolicy::Interval(Duration::from_secs(1)),
        })
        .unwrap();
        let n = 100_000u64;
        for i in 0..n {
            assert!(spool.append(b"consumer", &[i as u8; 300]), "record {i} refused");
        }
        assert_eq!(spool.stats().dropped.load(Ordering::Relaxed), 0);
        let deadline = Instant::now() + Duration::from_secs(30);
        while spool.stats().spooled.load(Ordering::Relaxed) < n {
            assert!(Instant::now() < deadline, "{} of {n} spooled", spool.stats().spooled.load(Ordering::Relaxed));
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(spool.stats().bytes.load(Ordering::Relaxed), n * (HEADER as u64 + 2 + 8 + 300));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_bound_counts_records_not_yet_written() {
        let d = tmp();
        let record = (HEADER + 2 + 1 + 100) as u64;
        let spool = Spool::open(&SpoolConfig {
            dir: d.clone(),
            max_bytes: 10 * record,
            fsync: FsyncPolicy::Interval(Duration::from_secs(1)),
        })
        .unwrap();
        // Appended faster than written: the 11th is refused all the same.
        let taken = (0..11).filter(|_| spool.append(b"k", &[7; 100])).count();
        assert_eq!(taken, 10);
        assert_eq!(spool.stats().dropped.load(Ordering::Relaxed), 1);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn close_ends_the_segment_and_a_segment_left_open_is_replayed_after_a_crash() {
        let d = tmp();
        let cfg =
            SpoolConfig { dir: d.clone(), max_bytes: 1 << 20, fsync: FsyncPolicy::Interval(Duration::from_secs(60)) };
        // What a run killed while writing leaves: its segment still marked open.
        let mut bytes = Vec::new();
        encode_record(b"k", b"one", &mut bytes);
        fs::write(segment_path(&d, 0), &bytes).unwrap();
        fs::write(d.join(format!("{:020}.open", 0)), b"").unwrap();
        // The next run closes it and replays it; its own segment closes on `close`.
        let next = Spool::open(&cfg).unwrap();
        let (seq, path) = next.oldest_closed().unwrap().expect("the crashed run's segment is not replayable");
        assert_eq!(seq, 0);
        assert_eq!(read_segment(&path).unwrap().0, vec![Record { key: b"k".to_vec(), payload: b"one".to_vec() }]);
        next.remove(&path).unwrap();
        // One edge per directory.
        let second = Spool::open(&cfg).unwrap_err().to_string();
        assert!(second.contains(&d.display().to_string()) && second.contains("in use"), "{second}");
        assert!(next.append(b"k", b"two"));
        assert!(next.close(Duration::from_secs(5)));
        assert!(!d.join(format!("{:020}.open", 1)).exists());
        let (seq, path) = next.oldest_closed().unwrap().expect("the closed segment is not replayable");
        assert_eq!(seq, 1);
        assert_eq!(read_segment(&path).unwrap().0, vec![Record { key: b"k".to_vec(), payload: b"two".to_vec() }]);
        // After close, appends are refused and counted, and the directory is free again.
        assert!(!next.append(b"k", b"late"));
        assert_eq!(next.stats().dropped.load(Ordering::Relaxed), 1);
        assert!(Spool::open(&cfg).is_ok());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_full_spool_drops_and_counts() {
        let d = tmp();
        let spool = Spool::open(&SpoolConfig {
            dir: d.clone(),
            max_bytes: 100,
            fsync: FsyncPolicy::Interval(Duration::from_millis(10)),
        })
        .unwrap();
        assert!(spool.append(b"k", &[0; 50]));
        std::thread::sleep(Duration::from_millis(200));
        assert!(!spool.append(b"k", &[0; 50]));
        assert_eq!(spool.stats().dropped.load(Ordering::Relaxed), 1);
        fs::remove_dir_all(&d).unwrap();
    }
}
