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
#[derive(Debug)]
pub struct LogWriter {
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    keep: usize,
}

impl LogWriter {
    pub fn open(path: &Path, max_bytes: u64, keep: usize) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_owned(),
            file,
            size,
            max_bytes: max_bytes.max(4096),
            keep,
        })
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
        if self.size + rec.len() as u64 > self.max_bytes && self.size > 0 {
            self.rotate()?;
        }
        self.file.write_all(&rec)?;
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
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
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

/// One parsed record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub time: &'a str,
    pub stream: &'a str,
    pub partial: bool,
    pub content: &'a str,
}

pub fn parse(line: &str) -> Option<Record<'_>> {
    let mut it = line.splitn(4, ' ');
    let time = it.next()?;
    let stream = it.next()?;
    let tag = it.next()?;
    let content = it.next().unwrap_or("");
    Some(Record {
        time,
        stream,
        partial: tag == "P",
        content,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_recorded_split_and_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("container.log");
        let w = Arc::new(Mutex::new(LogWriter::open(&path, 8192, 2).unwrap()));
        copy(&b"hello\nworld\nno newline"[..], Stream::Stdout, &w).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        let recs: Vec<Record> = text.lines().filter_map(parse).collect();
        assert_eq!(recs.len(), 3);
        assert_eq!(
            (recs[0].stream, recs[0].partial, recs[0].content),
            ("stdout", false, "hello")
        );
        assert_eq!((recs[2].partial, recs[2].content), (true, "no newline"));
        assert!(recs[0].time.ends_with('Z'));

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
}
