//! Body integrity. The meta records the body's length (`size`) and CRC32C (`crc32c`), computed
//! while the body is written; recovery and every delivery attempt read the body back and compare
//! before any byte of it goes upstream. A body that does not match (a queue entry whose file
//! holds another message's bytes after a power cut, a disk error, a hand edit) is moved to
//! `corrupt/` and never sent.
//!
//! A message just committed is read back too, although its CRC was computed a moment earlier
//! while it was written (the forwarder gets that meta with the commit notice): skipping the read
//! would trust that nothing, our own file reuse included, touched the file since, and not
//! trusting that is the point of the check. The read of a fresh body comes from the page cache
//! and `crc32c` uses the CPU's CRC instruction; see BENCHMARKS.md (2026-12-04) for the cost.
//!
//! A meta written before these fields existed (`crc32c` absent) is not checkable: its message
//! is delivered as before, so an upgrade loses nothing.

use std::io::{self, Read};
use std::path::Path;

/// How a body read back from disk differs from what its meta records.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    #[error("the body file holds {found} bytes but its meta records {recorded}")]
    Length { recorded: u64, found: u64 },
    #[error("the body's CRC32C is {found:08x} but its meta records {recorded:08x}")]
    Checksum { recorded: u32, found: u32 },
    #[error("the body file is missing")]
    Missing,
}

/// Why a body could not be shown sound.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The body is not the one the meta describes: quarantine it, never send it.
    #[error(transparent)]
    Corrupt(#[from] Corruption),
    /// The body could not be read right now (a disk error, no file handles): try again later.
    #[error("cannot read the body to check it: {0}")]
    Io(#[from] io::Error),
}

/// The CRC32C of a body as it is written, piece by piece.
#[derive(Debug, Clone, Copy, Default)]
pub struct Crc(u32);

impl Crc {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0 = crc32c::crc32c_append(self.0, bytes);
    }

    pub fn value(self) -> u32 {
        self.0
    }
}

/// Reads the body at `path` and compares it with `size` and `crc` from its meta. `crc == None`
/// (a meta from before checksums) is not checkable and passes without reading anything.
pub fn verify_file(path: &Path, size: u64, crc: Option<u32>) -> Result<(), VerifyError> {
    let Some(recorded) = crc else {
        return Ok(());
    };
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Corruption::Missing.into()),
        Err(e) => return Err(e.into()),
    };
    // The length first: it costs no read, and a different length settles the question.
    let on_disk = file.metadata()?.len();
    if on_disk != size {
        return Err(Corruption::Length {
            recorded: size,
            found: on_disk,
        }
        .into());
    }
    let mut crc = Crc::default();
    let mut read = 0u64;
    // Sized to the body (most are a few KB), so a check does not grow every blocking thread's
    // heap by a large buffer.
    let mut buf = vec![
        0u8;
        usize::try_from(size)
            .unwrap_or(usize::MAX)
            .clamp(1, 64 * 1024)
            + 1
    ];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        read += n as u64;
        crc.update(&buf[..n]);
    }
    if read != size {
        return Err(Corruption::Length {
            recorded: size,
            found: read,
        }
        .into());
    }
    if crc.value() != recorded {
        return Err(Corruption::Checksum {
            recorded,
            found: crc.value(),
        }
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crc_of(bytes: &[u8]) -> u32 {
        let mut c = Crc::default();
        c.update(bytes);
        c.value()
    }

    #[test]
    fn pieces_give_the_whole_crc() {
        let mut c = Crc::default();
        c.update(b"Subject: a\r\n");
        c.update(b"\r\nbody\r\n");
        assert_eq!(c.value(), crc_of(b"Subject: a\r\n\r\nbody\r\n"));
        // The standard CRC32C check value.
        assert_eq!(crc_of(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn verify_tells_sound_from_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let body = dir.path().join("b.eml");
        std::fs::write(&body, b"message A\r\n").unwrap();
        let crc = crc_of(b"message A\r\n");
        assert!(verify_file(&body, 11, Some(crc)).is_ok());
        // Same length, other bytes: another message's content.
        std::fs::write(&body, b"message B\r\n").unwrap();
        assert!(matches!(
            verify_file(&body, 11, Some(crc)),
            Err(VerifyError::Corrupt(Corruption::Checksum { .. }))
        ));
        std::fs::write(&body, b"message A\r\nand more").unwrap();
        assert!(matches!(
            verify_file(&body, 11, Some(crc)),
            Err(VerifyError::Corrupt(Corruption::Length {
                recorded: 11,
                found: 19
            }))
        ));
        // Not checkable: an old meta without a CRC.
        assert!(verify_file(&body, 11, None).is_ok());
        std::fs::remove_file(&body).unwrap();
        assert!(matches!(
            verify_file(&body, 11, Some(crc)),
            Err(VerifyError::Corrupt(Corruption::Missing))
        ));
    }
}
