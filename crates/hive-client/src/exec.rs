//! The exec stream: what flows over an upgraded `…/instances/{name}/exec` connection between
//! the client and the node agent (the API server passes it through unread).
//!
//! Frames are `type (1 byte) | length (4 bytes, big endian) | payload`. Client to agent:
//! stdin data, end of stdin, terminal size. Agent to client: stdout, stderr, then the exit
//! code, or an error message.

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The `Upgrade` protocol name.
pub const PROTOCOL: &str = "hive-exec.v1";
/// Largest payload of one frame.
pub const MAX_FRAME: usize = 64 * 1024;
/// Most arguments an exec command may have, and most bytes in all of them.
pub const MAX_ARGS: usize = 256;
pub const MAX_ARGS_BYTES: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Stdin(Bytes),
    StdinEof,
    Resize { cols: u16, rows: u16 },
    Stdout(Bytes),
    Stderr(Bytes),
    Exit(i32),
    Error(String),
}

impl Frame {
    fn kind(&self) -> u8 {
        match self {
            Frame::Stdin(_) => 0,
            Frame::StdinEof => 1,
            Frame::Resize { .. } => 2,
            Frame::Stdout(_) => 3,
            Frame::Stderr(_) => 4,
            Frame::Exit(_) => 5,
            Frame::Error(_) => 6,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let payload: Vec<u8> = match self {
            Frame::Stdin(b) | Frame::Stdout(b) | Frame::Stderr(b) => b.to_vec(),
            Frame::StdinEof => Vec::new(),
            Frame::Resize { cols, rows } => [cols.to_be_bytes(), rows.to_be_bytes()].concat(),
            Frame::Exit(code) => code.to_be_bytes().to_vec(),
            Frame::Error(m) => m.as_bytes().to_vec(),
        };
        let mut out = Vec::with_capacity(5 + payload.len());
        out.push(self.kind());
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&payload);
        out
    }
}

fn bad(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// The next frame, or `None` at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<Frame>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    r.read_exact(&mut head[1..]).await?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(bad(format!(
            "exec frame of {len} bytes (at most {MAX_FRAME})"
        )));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    let exact = |n: usize| {
        if len == n {
            Ok(())
        } else {
            Err(bad(format!(
                "exec frame type {} with {len} bytes, expected {n}",
                head[0]
            )))
        }
    };
    Ok(Some(match head[0] {
        0 => Frame::Stdin(payload.into()),
        1 => {
            exact(0)?;
            Frame::StdinEof
        }
        2 => {
            exact(4)?;
            Frame::Resize {
                cols: u16::from_be_bytes([payload[0], payload[1]]),
                rows: u16::from_be_bytes([payload[2], payload[3]]),
            }
        }
        3 => Frame::Stdout(payload.into()),
        4 => Frame::Stderr(payload.into()),
        5 => {
            exact(4)?;
            Frame::Exit(i32::from_be_bytes([
                payload[0], payload[1], payload[2], payload[3],
            ]))
        }
        6 => Frame::Error(String::from_utf8_lossy(&payload).into_owned()),
        t => return Err(bad(format!("unknown exec frame type {t}"))),
    }))
}

/// Checks an exec command: not empty, bounded, no NUL bytes.
pub fn check_command(cmd: &[String]) -> Result<(), String> {
    if cmd.is_empty() || cmd[0].is_empty() {
        return Err("command: must name a program".into());
    }
    if cmd.len() > MAX_ARGS {
        return Err(format!("command: at most {MAX_ARGS} arguments"));
    }
    if cmd.iter().map(String::len).sum::<usize>() > MAX_ARGS_BYTES {
        return Err(format!("command: at most {MAX_ARGS_BYTES} bytes in all"));
    }
    if cmd.iter().any(|a| a.contains('\0')) {
        return Err("command: arguments cannot contain NUL".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_hostile_ones_are_refused() {
        let frames = [
            Frame::Stdin(Bytes::from_static(b"hello")),
            Frame::StdinEof,
            Frame::Resize { cols: 80, rows: 24 },
            Frame::Stdout(Bytes::from_static(b"\xff\x00out")),
            Frame::Stderr(Bytes::new()),
            Frame::Exit(-9),
            Frame::Error("no such container".into()),
        ];
        let wire: Vec<u8> = frames.iter().flat_map(Frame::encode).collect();
        let mut r = &wire[..];
        for f in &frames {
            assert_eq!(read_frame(&mut r).await.unwrap().as_ref(), Some(f));
        }
        assert_eq!(read_frame(&mut r).await.unwrap(), None);

        let too_big = [&[3u8][..], &((MAX_FRAME + 1) as u32).to_be_bytes()].concat();
        assert!(read_frame(&mut &too_big[..]).await.is_err());
        let unknown = [9u8, 0, 0, 0, 0];
        assert!(read_frame(&mut &unknown[..]).await.is_err());
        let short_exit = [5u8, 0, 0, 0, 2, 0, 1];
        assert!(read_frame(&mut &short_exit[..]).await.is_err());
        let cut = [3u8, 0, 0, 0, 9, b'a'];
        assert!(read_frame(&mut &cut[..]).await.is_err());
    }

    #[test]
    fn commands_are_bounded() {
        assert!(check_command(&["ls".into(), "-l".into()]).is_ok());
        assert!(check_command(&[]).is_err());
        assert!(check_command(&["".into()]).is_err());
        assert!(check_command(&vec!["a".to_owned(); MAX_ARGS + 1]).is_err());
        assert!(check_command(&["a\0b".into()]).is_err());
        assert!(check_command(&["x".repeat(MAX_ARGS_BYTES + 1)]).is_err());
    }
}
