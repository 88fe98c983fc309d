//! The hosts file (`/etc/hosts`), read as glibc's `files` service reads it: a name listed
//! there resolves to exactly its addresses there, both families, in the file's order, and is
//! never asked of a name server. (hickory's own reading answers A and AAAA apart: a name the
//! file lists for one family gets the other from DNS, and `localhost` gets `::1` even where
//! the file says 127.0.0.1 only.)
//!
//! The file is checked at each lookup (one `stat(2)`) and read again when it changed, so an
//! edit is seen by the next lookup without a restart.

use std::collections::HashMap;
use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

/// The system's hosts file.
pub const SYSTEM_HOSTS: &str = "/etc/hosts";

/// A hosts file larger than this is read only this far (a blocklist of a million names is
/// about 30 MiB): the read happens on a runtime thread, once per change.
const MAX_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Debug)]
pub struct HostsFile {
    path: PathBuf,
    loaded: Mutex<Loaded>,
}

#[derive(Debug, Default)]
struct Loaded {
    /// What the file looked like when it was read; `None` before the first read.
    stamp: Option<Stamp>,
    names: HashMap<String, Vec<IpAddr>>,
}

/// Enough of a file's metadata to notice that it was replaced or rewritten.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stamp {
    Missing,
    File { modified: Option<SystemTime>, len: u64, inode: u64 },
}

impl HostsFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        HostsFile { path: path.into(), loaded: Mutex::new(Loaded::default()) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The addresses the file gives `name` (any case, with or without a trailing dot), in
    /// its order; `None` when it does not list the name.
    pub fn lookup(&self, name: &str) -> Option<Vec<IpAddr>> {
        let key = name.trim_end_matches('.').to_ascii_lowercase();
        let stamp = stamp(&self.path);
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if loaded.stamp.as_ref() != Some(&stamp) {
            loaded.names = match stamp {
                Stamp::Missing => HashMap::new(),
                Stamp::File { .. } => match read(&self.path) {
                    Ok(text) => parse(&text),
                    Err(e) => {
                        tracing::warn!(path = %self.path.display(), error = %e, "cannot read the hosts file: no name resolves from it");
                        HashMap::new()
                    }
                },
            };
            loaded.stamp = Some(stamp);
        }
        loaded.names.get(&key).cloned()
    }
}

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        // Only a regular file: a FIFO put at the path would block the read forever.
        Ok(meta) if meta.is_file() => {
            Stamp::File { modified: meta.modified().ok(), len: meta.len(), inode: meta.ino() }
        }
        _ => Stamp::Missing,
    }
}

fn read(path: &Path) -> std::io::Result<String> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?.take(MAX_BYTES).read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// `address name [alias...]` lines; `#` starts a comment. Names are matched without case.
/// A line whose address does not parse (a scoped `fe80::1%eth0`) is skipped, as glibc does.
fn parse(text: &str) -> HashMap<String, Vec<IpAddr>> {
    let mut names: HashMap<String, Vec<IpAddr>> = HashMap::new();
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        let mut fields = line.split_whitespace();
        let Some(Ok(address)) = fields.next().map(str::parse::<IpAddr>) else { continue };
        for name in fields {
            let addresses =
                names.entry(name.trim_end_matches('.').to_ascii_lowercase()).or_default();
            if !addresses.contains(&address) {
                addresses.push(address);
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|ip| ip.parse().expect("ip")).collect()
    }

    #[test]
    fn names_get_their_lines_addresses_in_file_order_both_families() {
        let names = parse(
            "\u{feff}127.0.0.1\tlocalhost\r\n\
             # a comment\n\
             ::1 ip6-localhost ip6-loopback\n\
             192.0.2.7 Multi.Example alias # trailing comment\n\
             2001:db8::7 multi.example.\n\
             192.0.2.8 multi.example\n\
             192.0.2.7 multi.example\n\
             fe80::1%eth0 scoped.example\n\
             not-an-address broken.example\n\
             192.0.2.9\n",
        );
        assert_eq!(names["localhost"], ips(&["127.0.0.1"]));
        assert_eq!(names["multi.example"], ips(&["192.0.2.7", "2001:db8::7", "192.0.2.8"]));
        assert_eq!(names["alias"], ips(&["192.0.2.7"]));
        assert_eq!(names["ip6-loopback"], ips(&["::1"]));
        assert!(!names.contains_key("scoped.example"));
        assert!(!names.contains_key("broken.example"));
    }

    #[test]
    fn a_changed_file_is_read_again_and_a_missing_one_lists_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hosts");
        let hosts = HostsFile::new(&path);
        assert_eq!(hosts.lookup("localhost"), None);
        std::fs::write(&path, "127.0.0.1 localhost\n").expect("write");
        assert_eq!(hosts.lookup("LOCALHOST."), Some(ips(&["127.0.0.1"])));
        // Replaced (a new inode), as editors and configuration tools write it.
        let next = dir.path().join("hosts.new");
        std::fs::write(&next, "::1 localhost\n127.0.0.1 localhost\n").expect("write");
        std::fs::rename(&next, &path).expect("rename");
        assert_eq!(hosts.lookup("localhost"), Some(ips(&["::1", "127.0.0.1"])));
        std::fs::remove_file(&path).expect("remove");
        assert_eq!(hosts.lookup("localhost"), None);
    }
}
