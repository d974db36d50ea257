//! The store-and-forward spool: a durable, bounded on-disk queue of [`Reading`]s between MQTT
//! intake and the server link.
//!
//! # Contract
//! - [`Spool::append`] returns only once the readings are durable (written and fsynced). The
//!   intake acknowledges to the sensor (MQTT PUBACK) **only after `append` returned `Ok`**; on an
//!   error it does not acknowledge and the sensor resends. Every call costs one fsync, so the
//!   intake should append many readings per call (everything that arrived since the last call).
//! - [`Spool::next_batch`] returns the oldest unacknowledged readings. Called again before an ack
//!   it returns the same batch (same `batch_seq`, same readings), so a retransmission after a
//!   reconnect carries the sequence number the server may already have seen.
//! - [`Spool::ack`] is cumulative: the server stored everything up to and including `batch_seq`.
//!   The ack is persisted at once, so a restart resends at most what was in flight.
//!
//! The spool does blocking file I/O: one owner on a blocking thread (`spawn_blocking` or a
//! dedicated thread) serves both intake and link; nothing in it waits or sleeps.
//!
//! # Batch sequence numbers
//! Every appended reading gets a *position*: its index in the stream of all readings ever
//! appended to this spool directory. Positions are never reused — not after acks, drops or
//! restarts — because segment files are named by the position of their first reading. A batch's
//! `batch_seq` is the position one past its last reading. So a `batch_seq` always ends at the
//! same reading, whatever batch boundaries a restarted agent chooses, and the server can treat it
//! as a high-water mark: a batch with `batch_seq <=` the highest one it stored for this device
//! holds nothing new (batches are only formed from the oldest unacknowledged reading, so
//! everything before a stored `batch_seq` was stored, dropped or acknowledged). Sequence numbers
//! grow but are not consecutive. (If the spool directory itself is lost, positions restart at 0;
//! the server must then forget the device's high-water mark.)
//!
//! # On disk
//! ```text
//! <dir>/lock                 locked while a Spool is open (a second agent gets SpoolError::Locked)
//! <dir>/state                acked position, dropped and corrupt counters; CRC; replaced atomically
//! <dir>/<base:020>.seg       segments, named by the position of their first reading
//! segment  = "ATRSPOOL" | u32 version (1) | u64 base | record*
//! record   = u32 len | u32 crc32c(len bytes ++ payload) | payload (len bytes)
//! payload  = u32 count | count * (u16 len, node | u16 len, name | i64 time_ms | f64 value)
//! ```
//! All integers little-endian. One `append` writes one record (more if it overflows a segment),
//! then fsyncs once. A new segment's directory entry is fsynced before it is written to.
//!
//! # Recovery
//! On open, the last segment is scanned: a torn write at its tail (power cut, kill -9 during
//! `append`) fails the length or CRC check and is truncated away — those readings were never
//! acknowledged to the sensor. Sealed segments are not scanned (open stays fast); a corrupt record
//! found later while reading one, or a bad segment header, loses the rest of that segment: the
//! readings are counted in [`SpoolStats::corrupt_readings`] and an error is queued for the caller
//! to log ([`Spool::take_incidents`]). A missing or corrupt state file means everything still on
//! disk is sent again (at-least-once), never that something is skipped.
//!
//! # Bounded
//! The segment files never exceed [`SpoolLimits::max_bytes`] together. When an append would
//! exceed it, the **oldest whole segments are deleted** (newest data is worth more to a building
//! dashboard than hours-old data), and their unacknowledged readings are added to
//! [`SpoolStats::dropped_readings`], which is persisted before the files are removed.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use atrium_proto::{Reading, TelemetryBatch};

/// What [`Spool::next_batch`] hands out: the wire type, ready to send.
pub type Batch = TelemetryBatch;

const SEGMENT_MAGIC: &[u8; 8] = b"ATRSPOOL";
const SEGMENT_VERSION: u32 = 1;
const SEGMENT_HEADER: u64 = 20;
const RECORD_HEADER: u64 = 8;
const STATE_MAGIC: &[u8; 8] = b"ATRSPST1";
const STATE_LEN: usize = 8 + 3 * 8 + 4;
/// Largest `segment_bytes` accepted; also bounds a record, so a corrupt length cannot make the
/// reader allocate more.
pub const MAX_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Smallest `segment_bytes` accepted.
pub const MIN_SEGMENT_BYTES: u64 = 4 * 1024;

/// Size bounds of a spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolLimits {
    /// Most bytes all segment files may hold together (default 64 MiB: about a day and a half of
    /// 10 readings/s). At least twice `segment_bytes`.
    pub max_bytes: u64,
    /// Size at which the active segment is closed and a new one started (default 1 MiB). It is
    /// the unit of dropping: when full, the oldest segment goes. Between 4 KiB and 64 MiB.
    pub segment_bytes: u64,
}

impl Default for SpoolLimits {
    fn default() -> Self {
        SpoolLimits {
            max_bytes: 64 * 1024 * 1024,
            segment_bytes: 1024 * 1024,
        }
    }
}

/// Counters for metrics and the status command.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SpoolStats {
    /// Readings appended and not yet acknowledged (nor dropped).
    pub queued_readings: u64,
    /// Bytes of all segment files (acknowledged readings included until their segment goes).
    pub queued_bytes: u64,
    /// Readings deleted unacknowledged because the spool was full; total, persisted.
    pub dropped_readings: u64,
    /// Readings lost to corrupt segment data; total, persisted.
    pub corrupt_readings: u64,
    /// Segment files on disk.
    pub segments: usize,
    /// Position after the last appended reading (the next reading's position).
    pub appended_seq: u64,
    /// Everything before this position is acknowledged, dropped or lost.
    pub acked_seq: u64,
}

/// Why a spool operation failed, or what went wrong with the files on disk.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// A file operation failed.
    #[error("spool {action} {}: {source}", path.display())]
    Io {
        /// What the spool was doing.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Another process has the spool directory open.
    #[error("spool directory {} is in use by another process", .0.display())]
    Locked(PathBuf),
    /// The limits cannot work.
    #[error("invalid spool limits: {0}")]
    InvalidLimits(String),
    /// A reading too large for a segment (or a node or name over 65535 bytes).
    #[error("reading of node `{node}` does not fit a spool segment")]
    ReadingTooLarge {
        /// The reading's node (truncated for the message).
        node: String,
    },
    /// One append larger than the spool can hold without dropping part of it.
    #[error("append of {bytes} bytes exceeds the spool's limit of {limit} per append")]
    AppendTooLarge {
        /// Encoded size of the append.
        bytes: u64,
        /// `max_bytes - segment_bytes`.
        limit: u64,
    },
    /// An ack for readings that were never appended.
    #[error("ack for batch_seq {seq}, but only {appended} readings were ever appended")]
    AckBeyondEnd {
        /// The acked sequence number.
        seq: u64,
        /// Position after the last appended reading.
        appended: u64,
    },
    /// Incident: part of a segment could not be read; its remaining readings are lost.
    #[error("spool segment {} is corrupt ({detail}); {lost} readings lost", path.display())]
    CorruptSegment {
        /// The segment file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
        /// Unacknowledged readings lost (a lower bound when the count is unknowable).
        lost: u64,
    },
    /// Incident: an incomplete write at the end of the newest segment was cut off on open.
    #[error("spool segment {} had a torn write; {bytes} bytes of unacknowledged data truncated", path.display())]
    TornTail {
        /// The segment file.
        path: PathBuf,
        /// Bytes removed.
        bytes: u64,
    },
    /// Incident: the state file was unreadable; everything still on disk will be sent again.
    #[error("spool state {} is corrupt ({detail}); resending from the oldest segment", path.display())]
    CorruptState {
        /// The state file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SpoolError {
    move |source| SpoolError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// One segment file.
#[derive(Debug)]
struct Segment {
    base: u64,
    /// Position after its last reading: the next segment's base, or `appended` for the active one.
    end: u64,
    bytes: u64,
    path: PathBuf,
}

/// Where the reader is: record at `offset` of segment `base`, whose first reading has position
/// `pos`, of which `skip` were already consumed. It stands for position `pos + skip`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Cursor {
    base: u64,
    offset: u64,
    pos: u64,
    skip: u64,
}

impl Cursor {
    fn start_of(seg: &Segment) -> Cursor {
        Cursor {
            base: seg.base,
            offset: SEGMENT_HEADER,
            pos: seg.base,
            skip: 0,
        }
    }

    fn position(&self) -> u64 {
        self.pos + self.skip
    }
}

/// The durable queue; see the module documentation.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    limits: SpoolLimits,
    _lock: File,
    /// Oldest first; never empty; the last one is the active (appended-to) segment.
    segments: VecDeque<Segment>,
    /// Append handle of the last segment.
    active: File,
    /// A write failed and could not be undone: start a fresh segment before writing again.
    needs_roll: bool,
    /// Position after the last appended reading.
    appended: u64,
    /// Everything before this position is acknowledged, dropped or lost.
    acked: u64,
    dropped: u64,
    corrupt: u64,
    /// Corrupt data before this position has been counted already.
    corrupt_counted_to: u64,
    /// Reader position of `acked`.
    cursor: Cursor,
    /// The batch handed out and not yet acked, with the reader position after it.
    outstanding: Option<(Batch, Cursor)>,
    incidents: Vec<SpoolError>,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, recovering from a crash if there was one.
    pub fn open(dir: &Path, limits: SpoolLimits) -> Result<Spool, SpoolError> {
        if !(MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES).contains(&limits.segment_bytes) {
            return Err(SpoolError::InvalidLimits(format!(
                "segment_bytes {} is outside {MIN_SEGMENT_BYTES}..={MAX_SEGMENT_BYTES}",
                limits.segment_bytes
            )));
        }
        if limits.max_bytes < 2 * limits.segment_bytes {
            return Err(SpoolError::InvalidLimits(format!(
                "max_bytes {} must be at least twice segment_bytes {}",
                limits.max_bytes, limits.segment_bytes
            )));
        }
        fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("open", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(SpoolError::Locked(dir.to_owned())),
            Err(fs::TryLockError::Error(e)) => return Err(io_err("lock", &lock_path)(e)),
        }
        let _ = fs::remove_file(dir.join("state.tmp"));

        let mut incidents = Vec::new();
        let state_path = dir.join("state");
        let state = match fs::read(&state_path) {
            Ok(bytes) => match decode_state(&bytes) {
                Ok(s) => Some(s),
                Err(detail) => {
                    incidents.push(SpoolError::CorruptState {
                        path: state_path.clone(),
                        detail,
                    });
                    None
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("read", &state_path)(e)),
        };
        let (mut acked, dropped, mut corrupt) = state.unwrap_or((0, 0, 0));

        let mut bases = list_segments(dir)?;
        bases.sort_unstable();
        let mut segments = VecDeque::new();
        let mut doomed = Vec::new();
        // Sealed segments hold positions [base, next base); only their headers are read here.
        for pair in bases.windows(2) {
            let (base, next) = (pair[0], pair[1]);
            let path = segment_path(dir, base);
            let bytes = fs::metadata(&path).map_err(io_err("stat", &path))?.len();
            if let Err(detail) = check_header(&path, base)? {
                // Dropped from the list: readers jump from the previous segment to the next one.
                let lost = next.saturating_sub(acked.max(base));
                corrupt += lost;
                incidents.push(SpoolError::CorruptSegment {
                    path: path.clone(),
                    detail,
                    lost,
                });
                doomed.push(path);
            } else {
                segments.push_back(Segment {
                    base,
                    end: next,
                    bytes,
                    path,
                });
            }
        }
        let mut appended = 0;
        if let Some(&base) = bases.last() {
            let path = segment_path(dir, base);
            match recover_last(&path, base, &mut incidents)? {
                Some((count, bytes)) => {
                    appended = base + count;
                    segments.push_back(Segment {
                        base,
                        end: appended,
                        bytes,
                        path,
                    });
                }
                None => {
                    // Unreadable header: how many readings it held is unknowable, so skip an
                    // upper bound of positions rather than risk reusing a batch_seq.
                    let bytes = fs::metadata(&path).map_err(io_err("stat", &path))?.len();
                    appended = base + bytes / MIN_ENCODED_READING + 1;
                    doomed.push(path);
                }
            }
        }
        // Acknowledged beyond what is on disk (the newest segment was lost): skip those positions.
        appended = appended.max(acked);
        // Appends go to a segment ending exactly at `appended`; otherwise start a new one.
        let needs_fresh_segment = segments.back().is_none_or(|s| s.end != appended);
        if let Some(first) = segments.front() {
            acked = acked.max(first.base);
        }
        if state != Some((acked, dropped, corrupt)) {
            save_state(dir, (acked, dropped, corrupt), !doomed.is_empty())?;
        }
        for path in doomed {
            let _ = fs::remove_file(path);
        }

        let active = match segments.back() {
            Some(last) if !needs_fresh_segment => open_append(&last.path)?,
            _ => {
                let file = create_segment(dir, appended)?;
                segments.push_back(Segment {
                    base: appended,
                    end: appended,
                    bytes: SEGMENT_HEADER,
                    path: segment_path(dir, appended),
                });
                file
            }
        };
        let cursor = segments.front().map(Cursor::start_of).unwrap_or(Cursor {
            base: appended,
            offset: SEGMENT_HEADER,
            pos: appended,
            skip: 0,
        });
        let mut spool = Spool {
            dir: dir.to_owned(),
            limits,
            _lock: lock,
            segments,
            active,
            needs_roll: false,
            appended,
            acked,
            dropped,
            corrupt,
            corrupt_counted_to: acked,
            cursor,
            outstanding: None,
            incidents,
        };
        spool.cursor = spool.seek(acked);
        spool.remove_acked_segments()?;
        Ok(spool)
    }

    /// Appends readings durably; returns once they are fsynced (see the module doc).
    ///
    /// On an error nothing must be acknowledged to the sensor. Readings of an append that filled
    /// more than one segment may already be durable in the earlier segment; they are then sent
    /// twice after the sensor's resend (at-least-once).
    pub fn append(&mut self, readings: &[Reading]) -> Result<(), SpoolError> {
        if readings.is_empty() {
            return Ok(());
        }
        let records = encode_records(
            readings,
            self.limits.segment_bytes - SEGMENT_HEADER - RECORD_HEADER,
        )?;
        let bytes: u64 = records.iter().map(|(r, _)| r.len() as u64).sum();
        let limit = self.limits.max_bytes - self.limits.segment_bytes;
        if bytes > limit {
            // It would push its own first readings out: refused, so no sensor is told "stored".
            return Err(SpoolError::AppendTooLarge { bytes, limit });
        }
        if self.needs_roll {
            self.roll()?;
        }
        // What the active segment held at its last fsync, to undo a failed write.
        let mut synced = self
            .active_segment()
            .map_or((SEGMENT_HEADER, self.appended), |s| (s.bytes, s.end));
        let result = self.write_records(&records, &mut synced);
        if result.is_err() {
            self.undo_unsynced(synced);
        }
        result
    }

    /// The oldest unacknowledged readings, at most `max_readings`; the same batch again until it
    /// is acknowledged. `None` when everything is acknowledged.
    pub fn next_batch(&mut self, max_readings: usize) -> Option<Batch> {
        if let Some((batch, _)) = &self.outstanding {
            return Some(batch.clone());
        }
        if max_readings == 0 || self.acked >= self.appended {
            return None;
        }
        let (readings, end) = self.read_from(self.cursor, max_readings);
        if readings.is_empty() {
            return None;
        }
        let batch = Batch {
            batch_seq: end.position(),
            readings,
        };
        self.outstanding = Some((batch.clone(), end));
        Some(batch)
    }

    /// The server stored everything up to and including `batch_seq`; persisted at once.
    ///
    /// Acks for older sequence numbers are ignored; an ack beyond anything appended is refused.
    pub fn ack(&mut self, batch_seq: u64) -> Result<(), SpoolError> {
        if batch_seq <= self.acked {
            return Ok(());
        }
        if batch_seq > self.appended {
            return Err(SpoolError::AckBeyondEnd {
                seq: batch_seq,
                appended: self.appended,
            });
        }
        self.cursor = match self.outstanding.take() {
            Some((batch, end))
                if batch.batch_seq == batch_seq && self.segment_index(end.base).is_some() =>
            {
                end
            }
            _ => self.seek(batch_seq),
        };
        self.acked = batch_seq;
        self.corrupt_counted_to = self.corrupt_counted_to.max(batch_seq);
        save_state(&self.dir, (self.acked, self.dropped, self.corrupt), false)?;
        self.remove_acked_segments()
    }

    /// Counters for metrics.
    pub fn stats(&self) -> SpoolStats {
        SpoolStats {
            queued_readings: self.appended - self.acked,
            queued_bytes: self.bytes_on_disk(),
            dropped_readings: self.dropped,
            corrupt_readings: self.corrupt,
            segments: self.segments.len(),
            appended_seq: self.appended,
            acked_seq: self.acked,
        }
    }

    /// Problems found in the files since the last call (corrupt data, torn writes), for the log.
    pub fn take_incidents(&mut self) -> Vec<SpoolError> {
        std::mem::take(&mut self.incidents)
    }

    fn active_segment(&self) -> Option<&Segment> {
        self.segments.back()
    }

    fn bytes_on_disk(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    fn segment_index(&self, base: u64) -> Option<usize> {
        self.segments.binary_search_by_key(&base, |s| s.base).ok()
    }

    fn write_records(
        &mut self,
        records: &[(Vec<u8>, u64)],
        synced: &mut (u64, u64),
    ) -> Result<(), SpoolError> {
        for (bytes, count) in records {
            let len = bytes.len() as u64;
            let active_bytes = self.active_segment().map_or(0, |s| s.bytes);
            if active_bytes > SEGMENT_HEADER && active_bytes + len > self.limits.segment_bytes {
                self.sync_active()?;
                self.roll()?;
                *synced = (SEGMENT_HEADER, self.appended);
            }
            self.make_room(len)?;
            let path = self.active_path();
            self.active
                .write_all(bytes)
                .map_err(io_err("write", &path))?;
            self.appended += count;
            if let Some(seg) = self.segments.back_mut() {
                seg.bytes += len;
                seg.end = self.appended;
            }
        }
        self.sync_active()
    }

    /// After a failed write: cut the active segment back to what was last fsynced, or if that
    /// fails too, leave it and write the next append to a fresh segment.
    fn undo_unsynced(&mut self, (bytes, end): (u64, u64)) {
        self.appended = end;
        let truncated = self
            .active
            .set_len(bytes)
            .and_then(|()| self.active.sync_all())
            .is_ok();
        if let Some(seg) = self.segments.back_mut() {
            seg.end = end;
            if truncated {
                seg.bytes = bytes;
            }
        }
        self.needs_roll |= !truncated;
    }

    fn active_path(&self) -> PathBuf {
        self.active_segment()
            .map(|s| s.path.clone())
            .unwrap_or_default()
    }

    fn sync_active(&mut self) -> Result<(), SpoolError> {
        let path = self.active_path();
        self.active.sync_data().map_err(io_err("fsync", &path))
    }

    /// Starts a new active segment at `appended`.
    fn roll(&mut self) -> Result<(), SpoolError> {
        let base = self.appended;
        let file = create_segment(&self.dir, base)?;
        if self.segments.back().is_some_and(|s| s.base == base) {
            // The old active segment holds no readings (only a failed write): replaced.
            self.segments.pop_back();
        }
        self.segments.push_back(Segment {
            base,
            end: base,
            bytes: SEGMENT_HEADER,
            path: segment_path(&self.dir, base),
        });
        self.active = file;
        self.needs_roll = false;
        Ok(())
    }

    /// Deletes the oldest segments until `len` more bytes fit in `max_bytes`.
    fn make_room(&mut self, len: u64) -> Result<(), SpoolError> {
        while self.bytes_on_disk() + len > self.limits.max_bytes && self.segments.len() > 1 {
            let Some(oldest) = self.segments.front() else {
                break;
            };
            let (base, end, path) = (oldest.base, oldest.end, oldest.path.clone());
            if end > self.acked {
                self.dropped += end - self.acked.max(base);
                self.acked = end;
                self.corrupt_counted_to = self.corrupt_counted_to.max(end);
                self.outstanding = None;
            }
            // Persisted (with the directory) before the file goes, so the count survives a crash.
            save_state(&self.dir, (self.acked, self.dropped, self.corrupt), true)?;
            fs::remove_file(&path).map_err(io_err("delete", &path))?;
            self.segments.pop_front();
            if self.cursor.base == base {
                self.cursor = self.segments.front().map_or(self.cursor, Cursor::start_of);
            }
        }
        Ok(())
    }

    fn remove_acked_segments(&mut self) -> Result<(), SpoolError> {
        while self.segments.len() > 1 && self.segments.front().is_some_and(|s| s.end <= self.acked)
        {
            if let Some(seg) = self.segments.front() {
                match fs::remove_file(&seg.path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err("delete", &seg.path)(e)),
                }
            }
            self.segments.pop_front();
        }
        Ok(())
    }

    /// Moves a reader from the acked cursor forward to `target`.
    fn seek(&mut self, target: u64) -> Cursor {
        let mut c = self.cursor;
        // Jump straight to the segment holding `target`.
        if let Some(seg) = self.segments.iter().rev().find(|s| s.base <= target)
            && (seg.base > c.base || c.position() > target || self.segment_index(c.base).is_none())
        {
            c = Cursor::start_of(seg);
        }
        while c.position() < target {
            let Some(i) = self.segment_index(c.base) else {
                break;
            };
            let seg = &self.segments[i];
            let next = self.segments.get(i + 1).map(Cursor::start_of);
            let mut reader = match RecordReader::open(&seg.path, c.offset) {
                Ok(r) => r,
                Err(_) => match next {
                    Some(n) => {
                        c = n;
                        continue;
                    }
                    None => break,
                },
            };
            while c.position() < target {
                match reader.next() {
                    Next::Record(readings, len) => {
                        let n = readings.len() as u64;
                        if c.pos + n > target {
                            c.skip = target - c.pos;
                        } else {
                            c = Cursor {
                                offset: c.offset + len,
                                pos: c.pos + n,
                                skip: 0,
                                ..c
                            };
                        }
                    }
                    // Unreadable rest of segment: those readings are acked anyway.
                    Next::End | Next::Bad(_) => break,
                }
            }
            if c.position() < target {
                match next {
                    Some(n) => c = n,
                    None => break,
                }
            }
        }
        c
    }

    /// Reads up to `max` readings from `c`, skipping (and counting) corrupt data.
    fn read_from(&mut self, mut c: Cursor, max: usize) -> (Vec<Reading>, Cursor) {
        let mut out = Vec::new();
        while out.len() < max {
            let i = match self.segment_index(c.base) {
                Some(i) => i,
                None => match self.segments.iter().position(|s| s.base > c.base) {
                    Some(i) => {
                        c = Cursor::start_of(&self.segments[i]);
                        i
                    }
                    None => break,
                },
            };
            let (seg_end, path) = (self.segments[i].end, self.segments[i].path.clone());
            let next = self.segments.get(i + 1).map(Cursor::start_of);
            let mut finished = c.position() >= seg_end;
            if !finished {
                let mut reader = match RecordReader::open(&path, c.offset) {
                    Ok(r) => r,
                    Err(source) => {
                        // Maybe transient (file descriptors exhausted): do not skip anything.
                        self.incidents.push(SpoolError::Io {
                            action: "read",
                            path,
                            source,
                        });
                        break;
                    }
                };
                while out.len() < max && c.position() < seg_end {
                    match reader.next() {
                        Next::Record(readings, len) => {
                            let n = readings.len() as u64;
                            // Records past the segment's end are leftovers of a failed append.
                            let usable = n.min(seg_end - c.pos);
                            let take = usable.saturating_sub(c.skip).min((max - out.len()) as u64);
                            out.extend(
                                readings
                                    .into_iter()
                                    .skip(c.skip as usize)
                                    .take(take as usize),
                            );
                            c.skip += take;
                            if c.skip >= n {
                                c = Cursor {
                                    offset: c.offset + len,
                                    pos: c.pos + n,
                                    skip: 0,
                                    ..c
                                };
                            }
                        }
                        Next::End => {
                            self.count_corrupt(
                                &path,
                                c.position(),
                                seg_end,
                                "segment ends early".into(),
                            );
                            break;
                        }
                        Next::Bad(detail) => {
                            self.count_corrupt(&path, c.position(), seg_end, detail);
                            break;
                        }
                    }
                }
                finished = out.len() < max || c.position() >= seg_end;
            }
            if !finished {
                break;
            }
            match next {
                Some(n) => c = n,
                // The active segment: the cursor stays where new appends will be found.
                None => break,
            }
        }
        (out, c)
    }

    fn count_corrupt(&mut self, path: &Path, from: u64, to: u64, detail: String) {
        if self.active_segment().is_some_and(|s| s.path == path) {
            // Appending behind unreadable data would make the new readings unreachable.
            self.needs_roll = true;
        }
        let from = from.max(self.corrupt_counted_to);
        if to > from {
            self.corrupt += to - from;
            self.corrupt_counted_to = to;
            self.incidents.push(SpoolError::CorruptSegment {
                path: path.to_owned(),
                detail,
                lost: to - from,
            });
        }
    }
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.seg"))
}

fn list_segments(dir: &Path) -> Result<Vec<u64>, SpoolError> {
    let mut bases = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".seg")) else {
            continue;
        };
        if stem.len() == 20
            && stem.bytes().all(|b| b.is_ascii_digit())
            && let Ok(base) = stem.parse()
        {
            bases.push(base);
        }
    }
    Ok(bases)
}

fn segment_header(base: u64) -> [u8; SEGMENT_HEADER as usize] {
    let mut h = [0; SEGMENT_HEADER as usize];
    h[..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    h[12..].copy_from_slice(&base.to_le_bytes());
    h
}

/// `Ok(Err(why))` if the header is wrong; `Err` if the file could not be read at all (possibly
/// transient, so not a reason to give up its readings).
fn check_header(path: &Path, base: u64) -> Result<Result<(), String>, SpoolError> {
    let mut h = [0; SEGMENT_HEADER as usize];
    match File::open(path).and_then(|mut f| f.read_exact(&mut h)) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Ok(Err("shorter than its header".into()));
        }
        Err(e) => return Err(io_err("read", path)(e)),
    }
    Ok(if h == segment_header(base) {
        Ok(())
    } else if &h[..8] != SEGMENT_MAGIC {
        Err("not a spool segment".into())
    } else {
        Err("unsupported version or wrong base position in header".into())
    })
}

/// Creates an empty segment durably (file and directory entry).
fn create_segment(dir: &Path, base: u64) -> Result<File, SpoolError> {
    let path = segment_path(dir, base);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(io_err("create", &path))?;
    file.write_all(&segment_header(base))
        .map_err(io_err("write", &path))?;
    file.sync_all().map_err(io_err("fsync", &path))?;
    sync_dir(dir)?;
    open_append(&path)
}

fn open_append(path: &Path) -> Result<File, SpoolError> {
    OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(io_err("open", path))
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// Scans the newest segment, truncating a torn tail. `None` if its header is unusable;
/// otherwise the number of readings and the valid length.
fn recover_last(
    path: &Path,
    base: u64,
    incidents: &mut Vec<SpoolError>,
) -> Result<Option<(u64, u64)>, SpoolError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err("open", path))?;
    let len = file.metadata().map_err(io_err("stat", path))?.len();
    if len < SEGMENT_HEADER {
        // Torn while being created: no reading was ever in it.
        file.set_len(0).map_err(io_err("truncate", path))?;
        let mut f = open_append(path)?;
        f.write_all(&segment_header(base))
            .map_err(io_err("write", path))?;
        f.sync_all().map_err(io_err("fsync", path))?;
        return Ok(Some((0, SEGMENT_HEADER)));
    }
    if let Err(detail) = check_header(path, base)? {
        incidents.push(SpoolError::CorruptSegment {
            path: path.to_owned(),
            detail,
            lost: 0,
        });
        return Ok(None);
    }
    let mut reader = RecordReader::open(path, SEGMENT_HEADER).map_err(io_err("read", path))?;
    let (mut count, mut valid) = (0, SEGMENT_HEADER);
    loop {
        match reader.next() {
            Next::Record(readings, n) => {
                count += readings.len() as u64;
                valid += n;
            }
            Next::End => break,
            Next::Bad(_) => {
                file.set_len(valid).map_err(io_err("truncate", path))?;
                file.sync_all().map_err(io_err("fsync", path))?;
                incidents.push(SpoolError::TornTail {
                    path: path.to_owned(),
                    bytes: len - valid,
                });
                break;
            }
        }
    }
    Ok(Some((count, valid)))
}

enum Next {
    Record(Vec<Reading>, u64),
    End,
    Bad(String),
}

/// Reads records sequentially from one segment file.
struct RecordReader {
    inner: BufReader<File>,
    remaining: u64,
}

impl RecordReader {
    fn open(path: &Path, offset: u64) -> io::Result<RecordReader> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(offset))?;
        Ok(RecordReader {
            inner: BufReader::with_capacity(64 * 1024, file),
            remaining: len.saturating_sub(offset),
        })
    }

    fn next(&mut self) -> Next {
        if self.remaining == 0 {
            return Next::End;
        }
        if self.remaining < RECORD_HEADER {
            return Next::Bad("truncated record header".into());
        }
        let mut header = [0; RECORD_HEADER as usize];
        if let Err(e) = self.inner.read_exact(&mut header) {
            return Next::Bad(format!("read failed: {e}"));
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len < 4
            || u64::from(len) > self.remaining - RECORD_HEADER
            || u64::from(len) > MAX_SEGMENT_BYTES
        {
            return Next::Bad(format!("record length {len} does not fit the file"));
        }
        let mut payload = vec![0; len as usize];
        if let Err(e) = self.inner.read_exact(&mut payload) {
            return Next::Bad(format!("read failed: {e}"));
        }
        if crc32c(&[&header[..4], &payload]) != crc {
            return Next::Bad("checksum mismatch".into());
        }
        match decode_payload(&payload) {
            Ok(readings) => {
                self.remaining -= RECORD_HEADER + u64::from(len);
                Next::Record(readings, RECORD_HEADER + u64::from(len))
            }
            Err(detail) => Next::Bad(detail),
        }
    }
}

/// Smallest encoded reading: two empty strings, time and value.
const MIN_ENCODED_READING: u64 = 2 + 2 + 8 + 8;

/// Encodes readings into records (header included) of at most `max_payload` payload bytes each.
fn encode_records(
    readings: &[Reading],
    max_payload: u64,
) -> Result<Vec<(Vec<u8>, u64)>, SpoolError> {
    let mut records = Vec::new();
    let mut payload = vec![0; 4];
    let mut count = 0u64;
    for r in readings {
        let start = payload.len();
        let too_large = || SpoolError::ReadingTooLarge {
            node: r.node.chars().take(64).collect(),
        };
        for s in [&r.node, &r.name] {
            let len = u16::try_from(s.len()).map_err(|_| too_large())?;
            payload.extend_from_slice(&len.to_le_bytes());
            payload.extend_from_slice(s.as_bytes());
        }
        payload.extend_from_slice(&r.time_ms.to_le_bytes());
        payload.extend_from_slice(&r.value.to_le_bytes());
        if payload.len() as u64 > max_payload {
            if count == 0 {
                return Err(too_large());
            }
            let tail = payload.split_off(start);
            records.push(seal_record(payload, count));
            payload = vec![0; 4];
            payload.extend_from_slice(&tail);
            count = 0;
        }
        count += 1;
    }
    if count > 0 {
        records.push(seal_record(payload, count));
    }
    Ok(records)
}

fn seal_record(mut payload: Vec<u8>, count: u64) -> (Vec<u8>, u64) {
    // `count` fits: a payload of at most 64 MiB holds fewer than 2^32 readings.
    payload[..4].copy_from_slice(&(count as u32).to_le_bytes());
    let len = (payload.len() as u32).to_le_bytes();
    let mut record = Vec::with_capacity(RECORD_HEADER as usize + payload.len());
    record.extend_from_slice(&len);
    record.extend_from_slice(&crc32c(&[&len, &payload]).to_le_bytes());
    record.extend_from_slice(&payload);
    (record, count)
}

fn decode_payload(p: &[u8]) -> Result<Vec<Reading>, String> {
    fn take<'a>(p: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if p.len() < n {
            return Err("record payload truncated".into());
        }
        let (head, tail) = p.split_at(n);
        *p = tail;
        Ok(head)
    }
    fn u64_le(b: &[u8]) -> [u8; 8] {
        let mut a = [0; 8];
        a.copy_from_slice(b);
        a
    }
    fn string(p: &mut &[u8]) -> Result<String, String> {
        let len = take(p, 2)?;
        let len = u16::from_le_bytes([len[0], len[1]]) as usize;
        String::from_utf8(take(p, len)?.to_vec()).map_err(|_| "string is not UTF-8".to_owned())
    }
    let mut p = p;
    let count = take(&mut p, 4)?;
    let count = u32::from_le_bytes([count[0], count[1], count[2], count[3]]) as usize;
    if count == 0 || count > p.len() / MIN_ENCODED_READING as usize {
        return Err(format!("record claims {count} readings"));
    }
    let mut readings = Vec::with_capacity(count);
    for _ in 0..count {
        let node = string(&mut p)?;
        let name = string(&mut p)?;
        let time_ms = i64::from_le_bytes(u64_le(take(&mut p, 8)?));
        let value = f64::from_le_bytes(u64_le(take(&mut p, 8)?));
        readings.push(Reading {
            node,
            name,
            time_ms,
            value,
        });
    }
    if !p.is_empty() {
        return Err(format!("{} bytes after the last reading", p.len()));
    }
    Ok(readings)
}

fn encode_state((acked, dropped, corrupt): (u64, u64, u64)) -> [u8; STATE_LEN] {
    let mut s = [0; STATE_LEN];
    s[..8].copy_from_slice(STATE_MAGIC);
    s[8..16].copy_from_slice(&acked.to_le_bytes());
    s[16..24].copy_from_slice(&dropped.to_le_bytes());
    s[24..32].copy_from_slice(&corrupt.to_le_bytes());
    let crc = crc32c(&[&s[..32]]);
    s[32..].copy_from_slice(&crc.to_le_bytes());
    s
}

fn decode_state(s: &[u8]) -> Result<(u64, u64, u64), String> {
    if s.len() != STATE_LEN || &s[..8] != STATE_MAGIC {
        return Err(format!("{} bytes, not a spool state", s.len()));
    }
    if crc32c(&[&s[..32]]).to_le_bytes() != s[32..] {
        return Err("checksum mismatch".into());
    }
    let word = |i: usize| {
        let mut a = [0; 8];
        a.copy_from_slice(&s[i..i + 8]);
        u64::from_le_bytes(a)
    };
    Ok((word(8), word(16), word(24)))
}

/// Replaces the state file atomically (write, fsync, rename); `sync_dir` also makes the rename
/// itself durable (needed when files are deleted right after).
fn save_state(dir: &Path, state: (u64, u64, u64), sync_dir_after: bool) -> Result<(), SpoolError> {
    let tmp = dir.join("state.tmp");
    let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
    f.write_all(&encode_state(state))
        .map_err(io_err("write", &tmp))?;
    f.sync_all().map_err(io_err("fsync", &tmp))?;
    let path = dir.join("state");
    fs::rename(&tmp, &path).map_err(io_err("rename", &path))?;
    if sync_dir_after {
        sync_dir(dir)?;
    }
    Ok(())
}

/// CRC-32C (Castagnoli) lookup table.
const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0x82F6_3B78 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// CRC-32C over the concatenation of `parts`.
fn crc32c(parts: &[&[u8]]) -> u32 {
    let mut c = !0u32;
    for part in parts {
        for &b in *part {
            c = CRC_TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
        }
    }
    !c
}

#[cfg(test)]
#[path = "spool/tests.rs"]
mod tests;
