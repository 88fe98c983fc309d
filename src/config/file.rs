//! Reading a config file without trusting what sits at its path.
//!
//! A reload reads whatever is at the path when SIGHUP arrives: a FIFO would block the reader
//! forever, a link to `/dev/zero` would fill memory, and a huge file would stall the process.
//! So only a regular file is read, opened without blocking, and only up to
//! [`MAX_CONFIG_BYTES`] (a config is kilobytes).

use std::fs::File;
use std::io::Read;
use std::path::Path;

use super::ConfigError;

/// The largest config file read: a hundred times the fully commented example.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

pub(super) fn read(path: &Path) -> Result<String, ConfigError> {
    let failed = |source| ConfigError::Read { path: path.to_path_buf(), source };
    let file = open(path).map_err(failed)?;
    let metadata = file.metadata().map_err(failed)?;
    let kind = kind_of(&metadata.file_type());
    if kind != "a regular file" {
        return Err(ConfigError::NotAFile { path: path.to_path_buf(), kind });
    }
    if metadata.len() > MAX_CONFIG_BYTES {
        return Err(too_large(path, metadata.len()));
    }
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    // The file may grow between the stat and the read: the limit holds on what is read.
    file.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes).map_err(failed)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(too_large(path, bytes.len() as u64));
    }
    String::from_utf8(bytes).map_err(|_| {
        failed(std::io::Error::new(std::io::ErrorKind::InvalidData, "it is not UTF-8 text"))
    })
}

fn too_large(path: &Path, size: u64) -> ConfigError {
    ConfigError::TooLarge { path: path.to_path_buf(), size, limit: MAX_CONFIG_BYTES }
}

/// Opens for reading without waiting: opening a FIFO that no one writes to returns at once.
#[cfg(unix)]
fn open(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)
}

#[cfg(not(unix))]
fn open(path: &Path) -> std::io::Result<File> {
    File::open(path)
}

fn kind_of(file_type: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if file_type.is_fifo() {
            return "a FIFO";
        }
        if file_type.is_char_device() {
            return "a character device";
        }
        if file_type.is_block_device() {
            return "a block device";
        }
        if file_type.is_socket() {
            return "a socket";
        }
    }
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_regular_file_of_bounded_size_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = dir.path().join("good.toml");
        std::fs::write(&good, "[server]\n").expect("write");
        assert_eq!(read(&good).expect("read"), "[server]\n");

        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'#'; MAX_CONFIG_BYTES as usize + 1]).expect("write");
        assert!(matches!(read(&big), Err(ConfigError::TooLarge { .. })));

        assert!(matches!(read(dir.path()), Err(ConfigError::NotAFile { kind: "a directory", .. })));
        #[cfg(unix)]
        {
            let zero = dir.path().join("zero.toml");
            std::os::unix::fs::symlink("/dev/zero", &zero).expect("symlink");
            let error = read(&zero).expect_err("a device is refused");
            assert!(error.to_string().contains("a character device"), "{error}");
        }
    }
}
