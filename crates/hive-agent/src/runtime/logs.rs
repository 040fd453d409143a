//! Container logs in the CRI format, one line per record:
//! `2026-11-26T15:00:00.123456789Z stdout F message`, `P` marking a line split because it was
//! longer than [`MAX_LINE`]. Files are size-capped and rotated (`container.log`,
//! `container.log.1`, …), so a chatty container cannot fill the disk.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Longest line written whole; longer ones are split into partial records.
pub const MAX_LINE: usize = 16 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Appends records to a log file, rotating it past `max_bytes` and keeping `keep` old files.
/// The file (and its directory) is made at the first record, not before.
#[derive(Debug)]
pub struct LogWriter {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    max_bytes: u64,
    keep: usize,
}

impl LogWriter {
    /// A writer to `path`, which touches nothing until its first record.
    pub fn new(path: &Path, max_bytes: u64, keep: usize) -> Self {
        Self {
            path: path.to_owned(),
            file: None,
            size: 0,
            max_bytes: max_bytes.max(4096),
            keep,
        }
    }

    /// The file, opened for appending (and its directory made) if it is not yet.
    fn file(&mut self) -> io::Result<&mut File> {
        if self.file.is_none() {
            if let Some(dir) = self.path.parent() {
                fs::create_dir_all(dir)?;
            }
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            self.size = file.metadata()?.len();
            self.file = Some(file);
        }
        Ok(self.file.as_mut().expect("opened above"))
    }

    pub fn write(&mut self, stream: Stream, partial: bool, content: &[u8]) -> io::Result<()> {
        let ts = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
        let mut rec = Vec::with_capacity(ts.len() + content.len() + 12);
        rec.extend_from_slice(ts.as_bytes());
        rec.push(b' ');
        rec.extend_from_slice(stream.as_str().as_bytes());
        rec.extend_from_slice(if partial { b" P " } else { b" F " });
        rec.extend_from_slice(content);
        rec.push(b'\n');
        self.file()?;
        if self.size + rec.len() as u64 > self.max_bytes && self.size > 0 {
            self.rotate()?;
        }
        self.file()?.write_all(&rec)?;
        self.size += rec.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        for n in (1..self.keep).rev() {
            let from = rotated(&self.path, n);
            if from.exists() {
                fs::rename(&from, rotated(&self.path, n + 1))?;
            }
        }
        if self.keep > 0 {
            fs::rename(&self.path, rotated(&self.path, 1))?;
        } else {
            fs::remove_file(&self.path)?;
        }
        // The next record opens the new file.
        self.file = None;
        self.size = 0;
        Ok(())
    }
}

pub fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// Copies `reader` into `writer` line by line until end of file.
pub fn copy(
    mut reader: impl Read,
    stream: Stream,
    writer: &Arc<Mutex<LogWriter>>,
) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut line: Vec<u8> = Vec::with_capacity(MAX_LINE);
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
        for &b in &buf[..n] {
            if b == b'\n' {
                w.write(stream, false, &line)?;
                line.clear();
            } else {
                line.push(b);
                if line.len() == MAX_LINE {
                    w.write(stream, true, &line)?;
                    line.clear();
                }
            }
        }
    }
    if !line.is_empty() {
        writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write(stream, true, &line)?;
    }
    Ok(())
}

/// One parsed record. Content is the bytes the container wrote (not always UTF-8).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub time: &'a [u8],
    pub stream: &'a [u8],
    pub partial: bool,
    pub content: &'a [u8],
}

pub fn parse(line: &[u8]) -> Option<Record<'_>> {
    let mut it = line.splitn(4, |&b| b == b' ');
    let time = it.next()?;
    let stream = it.next()?;
    let tag = it.next()?;
    let content = it.next().unwrap_or(b"");
    Some(Record {
        time,
        stream,
        partial: tag == b"P",
        content,
    })
}

/// What a reader of the logs asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadOptions {
    /// After what exists, keep reading what the container writes until it has exited.
    pub follow: bool,
    /// Only the last N lines of what exists.
    pub tail: Option<u64>,
    /// Prefix each line with the time it was written.
    pub timestamps: bool,
}

/// How often a follower looks for new output.
const FOLLOW_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Turns records back into the text the container wrote.
#[derive(Debug)]
struct Text {
    timestamps: bool,
    line_start: bool,
    out: Vec<u8>,
}

impl Text {
    fn push(&mut self, rec: &Record<'_>) {
        if self.line_start && self.timestamps {
            self.out.extend_from_slice(rec.time);
            self.out.push(b' ');
        }
        self.out.extend_from_slice(rec.content);
        self.line_start = !rec.partial;
        if self.line_start {
            self.out.push(b'\n');
        }
    }
}

/// Reads the log at `path` (its rotated files first) as plain text and hands it to `sink` in
/// chunks; `sink` returns false to stop. With `follow`, keeps reading new output (across
/// rotations) until `exited()` says the container is gone and everything it wrote was read.
pub fn read(
    path: &Path,
    opts: &ReadOptions,
    exited: impl Fn() -> bool,
    mut sink: impl FnMut(Vec<u8>) -> bool,
) -> io::Result<()> {
    let mut text = Text {
        timestamps: opts.timestamps,
        line_start: true,
        out: Vec::with_capacity(64 * 1024),
    };
    let mut files: Vec<PathBuf> = (1..=16)
        .map(|n| rotated(path, n))
        .filter(|p| p.exists())
        .collect();
    files.reverse();
    // The live file is opened before the old ones are read, so a rotation meanwhile is
    // noticed by its inode instead of skipping a file.
    let mut live = match File::open(path) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let mut pending = Vec::new();
    match opts.tail {
        Some(n) => {
            // Whole lines only: records up to and including a full one make a line.
            let mut lines: std::collections::VecDeque<Vec<u8>> = Default::default();
            let mut cur: Vec<u8> = Vec::new();
            let mut each = |raw: &[u8]| {
                cur.extend_from_slice(raw);
                cur.push(b'\n');
                if parse(raw).is_some_and(|r| !r.partial) {
                    lines.push_back(std::mem::take(&mut cur));
                    if lines.len() as u64 > n {
                        lines.pop_front();
                    }
                }
            };
            for f in &files {
                if let Ok(file) = File::open(f) {
                    records(file, &mut pending, &mut each)?;
                }
            }
            if let Some(file) = live.as_mut() {
                records(&mut *file, &mut pending, &mut each)?;
            }
            // An unfinished last line counts as a line.
            if !cur.is_empty() && n > 0 {
                lines.push_back(cur);
                if lines.len() as u64 > n {
                    lines.pop_front();
                }
            }
            for l in lines {
                for raw in l.split(|&b| b == b'\n').filter(|r| !r.is_empty()) {
                    if let Some(r) = parse(raw) {
                        text.push(&r);
                    }
                }
                if text.out.len() >= 64 * 1024 && !sink(std::mem::take(&mut text.out)) {
                    return Ok(());
                }
            }
        }
        None => {
            for f in &files {
                if let Ok(file) = File::open(f)
                    && !emit(file, &mut pending, &mut text, &mut sink)?
                {
                    return Ok(());
                }
            }
            if let Some(file) = live.as_mut()
                && !emit(&mut *file, &mut pending, &mut text, &mut sink)?
            {
                return Ok(());
            }
        }
    }
    if !text.out.is_empty() && !sink(std::mem::take(&mut text.out)) {
        return Ok(());
    }
    if !opts.follow {
        return Ok(());
    }
    loop {
        // Seen exited before the last read: everything it wrote has been read.
        let done = exited();
        if let Some(file) = live.as_mut()
            && !emit(&mut *file, &mut pending, &mut text, &mut sink)?
        {
            return Ok(());
        }
        // Rotated (or created): finish the old file, then go on with the new one.
        let now = File::open(path).ok();
        let moved = match (&live, &now) {
            (Some(a), Some(b)) => !same_file(a, b),
            (None, Some(_)) => true,
            _ => false,
        };
        if moved {
            if let Some(file) = live.as_mut()
                && !emit(&mut *file, &mut pending, &mut text, &mut sink)?
            {
                return Ok(());
            }
            pending.clear();
            // Files rotated after ours, between two looks, are read whole, oldest first.
            let mut newer = Vec::new();
            for n in 1..=16 {
                let Ok(f) = File::open(rotated(path, n)) else {
                    break;
                };
                if live.as_ref().is_some_and(|l| same_file(l, &f)) {
                    break;
                }
                newer.push(f);
            }
            if live.is_some() {
                for f in newer.into_iter().rev() {
                    if !emit(f, &mut pending, &mut text, &mut sink)? {
                        return Ok(());
                    }
                    pending.clear();
                }
            }
            live = now;
            continue;
        }
        if done {
            return Ok(());
        }
        std::thread::sleep(FOLLOW_POLL);
    }
}

fn same_file(a: &File, b: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (a.metadata(), b.metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Calls `each` with every complete record line that `reader` has now; an incomplete last
/// line waits in `pending` for the rest.
fn records(
    mut reader: impl Read,
    pending: &mut Vec<u8>,
    each: &mut impl FnMut(&[u8]),
) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut rest = &buf[..n];
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            if pending.is_empty() {
                each(&rest[..i]);
            } else {
                pending.extend_from_slice(&rest[..i]);
                each(pending);
                pending.clear();
            }
            rest = &rest[i + 1..];
        }
        pending.extend_from_slice(rest);
    }
}

/// Formats what `reader` has now into `text`, flushing full chunks to `sink`.
fn emit(
    reader: impl Read,
    pending: &mut Vec<u8>,
    text: &mut Text,
    sink: &mut impl FnMut(Vec<u8>) -> bool,
) -> io::Result<bool> {
    let mut open = true;
    records(reader, pending, &mut |raw| {
        if let Some(r) = parse(raw) {
            text.push(&r);
        }
        if open && text.out.len() >= 64 * 1024 {
            open = sink(std::mem::take(&mut text.out));
        }
    })?;
    if open && !text.out.is_empty() {
        open = sink(std::mem::take(&mut text.out));
    }
    Ok(open)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_made_before_the_first_record_and_a_file_there_is_appended_to() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs").join("c1");
        let path = logs.join("container.log");
        let w = Arc::new(Mutex::new(LogWriter::new(&path, 1 << 20, 2)));
        copy(&b""[..], Stream::Stdout, &w).unwrap();
        assert!(!logs.exists(), "made before any output");
        copy(&b"one\n"[..], Stream::Stdout, &w).unwrap();
        let w2 = Arc::new(Mutex::new(LogWriter::new(&path, 1 << 20, 2)));
        copy(&b"two\n"[..], Stream::Stderr, &w2).unwrap();
        let text = fs::read(&path).unwrap();
        let recs: Vec<Record> = text.split(|&b| b == b'\n').filter_map(parse).collect();
        let got: Vec<_> = recs.iter().map(|r| (r.stream, r.content)).collect();
        assert_eq!(
            got,
            [(&b"stdout"[..], &b"one"[..]), (&b"stderr"[..], &b"two"[..])]
        );
    }

    #[test]
    fn lines_are_recorded_split_and_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("container.log");
        let w = Arc::new(Mutex::new(LogWriter::new(&path, 8192, 2)));
        copy(&b"hello\nworld\nno newline"[..], Stream::Stdout, &w).unwrap();
        let text = fs::read(&path).unwrap();
        let recs: Vec<Record> = text.split(|&b| b == b'\n').filter_map(parse).collect();
        assert_eq!(recs.len(), 3);
        assert_eq!(
            (recs[0].stream, recs[0].partial, recs[0].content),
            (&b"stdout"[..], false, &b"hello"[..])
        );
        assert_eq!(
            (recs[2].partial, recs[2].content),
            (true, &b"no newline"[..])
        );
        assert!(recs[0].time.ends_with(b"Z"));

        let long = vec![b'x'; MAX_LINE + 10];
        copy(&long[..], Stream::Stderr, &w).unwrap();
        // Rotation keeps every file under the cap and at most `keep` old files.
        for _ in 0..100 {
            copy(
                &b"0123456789012345678901234567890123456789\n"[..],
                Stream::Stdout,
                &w,
            )
            .unwrap();
        }
        assert!(fs::metadata(&path).unwrap().len() <= 8192);
        assert!(rotated(&path, 1).exists() && rotated(&path, 2).exists());
        assert!(!rotated(&path, 3).exists());
    }

    fn collect(path: &Path, opts: &ReadOptions) -> Vec<u8> {
        let mut out = Vec::new();
        read(
            path,
            opts,
            || true,
            |c| {
                out.extend_from_slice(&c);
                true
            },
        )
        .unwrap();
        out
    }

    #[test]
    fn reading_gives_back_what_was_written_across_rotations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("container.log");
        assert!(collect(&path, &ReadOptions::default()).is_empty());
        let w = Arc::new(Mutex::new(LogWriter::new(&path, 4096, 2)));
        let mut want = Vec::new();
        for i in 0..300 {
            let line = [format!("line {i:03} ").as_bytes(), &[0xff], b"\n"].concat();
            copy(&line[..], Stream::Stdout, &w).unwrap();
            want.extend_from_slice(&line);
        }
        assert!(rotated(&path, 2).exists(), "the test must cross rotations");
        let all = collect(&path, &ReadOptions::default());
        // Rotation dropped the oldest lines; what is left is the newest, whole and in order.
        // More than one file's worth (~80 lines of 14 bytes per 4 KiB file).
        assert!(all.len() > 1500, "{} bytes", all.len());
        assert!(
            want.ends_with(&all),
            "lines out of order or cut: {:?}",
            String::from_utf8_lossy(&all[..200])
        );
        let tail = collect(
            &path,
            &ReadOptions {
                tail: Some(2),
                ..Default::default()
            },
        );
        assert_eq!(tail, b"line 298 \xff\nline 299 \xff\n");
    }

    #[test]
    fn long_lines_partial_lines_and_timestamps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("container.log");
        let w = Arc::new(Mutex::new(LogWriter::new(&path, 1 << 20, 2)));
        let long = vec![b'y'; MAX_LINE * 2 + 5];
        copy(&b"first\n"[..], Stream::Stdout, &w).unwrap();
        copy(&[&long[..], b"\n"].concat()[..], Stream::Stderr, &w).unwrap();
        copy(&b"\xff\xfe no newline"[..], Stream::Stdout, &w).unwrap();
        let all = collect(&path, &ReadOptions::default());
        assert!(all == [&b"first\n"[..], &long, b"\n\xff\xfe no newline"].concat());
        let tail = collect(
            &path,
            &ReadOptions {
                tail: Some(1),
                ..Default::default()
            },
        );
        // The unfinished last line counts as one.
        assert_eq!(tail, b"\xff\xfe no newline");
        let none = collect(
            &path,
            &ReadOptions {
                tail: Some(0),
                ..Default::default()
            },
        );
        assert!(none.is_empty());
        let ts = collect(
            &path,
            &ReadOptions {
                tail: Some(2),
                timestamps: true,
                ..Default::default()
            },
        );
        let (time, rest) = ts.split_at(ts.iter().position(|&b| b == b' ').unwrap());
        assert!(chrono::DateTime::parse_from_rfc3339(std::str::from_utf8(time).unwrap()).is_ok());
        // One timestamp per line, not per record.
        assert_eq!(rest.len(), 1 + long.len() + 1 + time.len() + 1 + 13);
    }

    #[test]
    fn follow_sees_new_lines_through_rotation_and_ends_after_exit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("container.log");
        let w = Arc::new(Mutex::new(LogWriter::new(&path, 4096, 2)));
        copy(&b"before\n"[..], Stream::Stdout, &w).unwrap();
        let exited = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (w, exited) = (w.clone(), exited.clone());
            std::thread::spawn(move || {
                // Bursts of ~7 KiB, longer apart than the reader's poll: two rotations
                // may pass between two reads, never three (two old files are kept).
                for i in 0..300 {
                    copy(format!("n{i:04}\n").as_bytes(), Stream::Stdout, &w).unwrap();
                    if i % 150 == 0 {
                        std::thread::sleep(std::time::Duration::from_millis(150));
                    }
                }
                exited.store(true, std::sync::atomic::Ordering::SeqCst);
            })
        };
        let mut out = Vec::new();
        read(
            &path,
            &ReadOptions {
                follow: true,
                ..Default::default()
            },
            || exited.load(std::sync::atomic::Ordering::SeqCst),
            |c| {
                out.extend_from_slice(&c);
                true
            },
        )
        .unwrap();
        writer.join().unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.first(), Some(&"before"));
        let want: Vec<String> = (0..300).map(|i| format!("n{i:04}")).collect();
        assert_eq!(lines[1..], want[..], "a follower missed or repeated lines");
        assert!(rotated(&path, 2).exists(), "the test must cross rotations");
    }

    #[test]
    fn a_reader_that_stops_ends_the_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("container.log");
        let w = Arc::new(Mutex::new(LogWriter::new(&path, 1 << 20, 1)));
        copy(&b"x\n"[..], Stream::Stdout, &w).unwrap();
        let mut calls = 0;
        // follow with a container that never exits: only the sink can end it.
        read(
            &path,
            &ReadOptions {
                follow: true,
                ..Default::default()
            },
            || false,
            |_| {
                calls += 1;
                false
            },
        )
        .unwrap();
        assert_eq!(calls, 1);
    }
}
