//! Reading the files a configuration names (the config file itself, a
//! `token_file`): regular files only, of a bounded size. A FIFO, a device or
//! a directory is refused at once instead of blocking the reader (a reload
//! waiting on a FIFO would hold the SIGHUP loop for ever) or filling memory.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Largest config file read.
pub const MAX_CONFIG_FILE: u64 = 16 * 1024 * 1024;
/// Largest token file read.
pub const MAX_TOKEN_FILE: u64 = 4096;

/// The text of the regular file at `path` (symbolic links followed), at most
/// `max_len` bytes; the error says why not, in words for an operator.
pub fn read_regular_file(path: &Path, max_len: u64) -> Result<String, String> {
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot read the file: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("cannot read the file: {e}"))?;
    if !meta.file_type().is_file() {
        return Err(format!("not a regular file (a {})", kind(&meta)));
    }
    if meta.len() > max_len {
        return Err(format!("too large: {} bytes, at most {max_len}", meta.len()));
    }
    let mut text = String::new();
    file.take(max_len + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read the file: {e}"))?;
    if text.len() as u64 > max_len {
        return Err(format!("too large: more than {max_len} bytes"));
    }
    Ok(text)
}

/// Why a secret's file is too open: every user of the machine may read it.
pub fn too_open(path: &Path) -> Option<String> {
    let mode = std::fs::metadata(path).ok()?.mode();
    (mode & 0o004 != 0).then(|| format!("readable by every user (mode {:04o}): chmod o-r it", mode & 0o7777))
}

fn kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() || t.is_block_device() {
        "device"
    } else {
        "special file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_of_a_bounded_size_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("lb.toml");
        std::fs::write(&file, "x = 1\n").unwrap();
        assert_eq!(read_regular_file(&file, 100).unwrap(), "x = 1\n");
        assert!(read_regular_file(&file, 3).unwrap_err().contains("too large"));
        assert!(read_regular_file(dir.path(), 100).unwrap_err().contains("directory"));
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Returns at once (a blocking open would hang the test).
        assert!(read_regular_file(&fifo, 100).unwrap_err().contains("FIFO"));
        assert!(
            read_regular_file(Path::new("/dev/zero"), 100)
                .unwrap_err()
                .contains("device")
        );
        assert!(
            read_regular_file(&dir.path().join("none"), 100)
                .unwrap_err()
                .contains("cannot read")
        );
    }
}
