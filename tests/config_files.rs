//! Every fixture under tests/fixtures/config/valid parses; every one under invalid/ is refused
//! with a message containing each of its `# expect:` lines (the key, and the line for syntax).

use std::path::{Path, PathBuf};

use poolsocks::config::{Config, SocksMethod};

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config").join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.expect("dir entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no fixtures in {}", dir.display());
    files
}

#[test]
fn valid_fixtures_load() {
    for path in fixtures("valid") {
        if let Err(e) = Config::load(&path) {
            panic!("{} should be valid: {e}", path.display());
        }
    }
}

#[test]
fn a_rustsocks_style_file_keeps_its_meaning() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config/valid/rustsocks_pool.toml");
    let config = Config::load(&path).expect("valid");
    let pool = &config.server.pool;
    assert!(pool.enabled);
    assert_eq!((pool.max_idle_per_dest, pool.max_total_idle), (8, 200));
    assert_eq!((pool.idle_timeout_secs, pool.connect_timeout_ms), (60, 3000));
    assert_eq!(config.auth.method(), SocksMethod::Userpass);
    assert_eq!(config.server.bind_addr(), "0.0.0.0:1080".parse().expect("addr"));
    // The password is held, but never printable.
    assert_eq!(config.auth.users[0].password.expose(), "correct horse");
    assert!(!format!("{config:?}").contains("correct horse"));
}

#[test]
fn invalid_fixtures_are_refused_with_the_expected_message() {
    for path in fixtures("invalid") {
        let text = std::fs::read_to_string(&path).expect("read fixture");
        let expectations: Vec<&str> =
            text.lines().filter_map(|line| line.strip_prefix("# expect: ")).collect();
        assert!(!expectations.is_empty(), "{} has no `# expect:` line", path.display());
        let message = match Config::load(&path) {
            Ok(_) => panic!("{} should be refused", path.display()),
            Err(e) => e.to_string(),
        };
        assert!(message.contains(&*path.to_string_lossy()), "message names the file: {message}");
        for expected in expectations {
            assert!(
                message.contains(expected),
                "{}: expected {expected:?} in:\n{message}",
                path.display()
            );
        }
    }
}

#[test]
fn a_missing_file_is_reported_with_its_path() {
    let message =
        Config::load(Path::new("/nonexistent/poolsocks.toml")).expect_err("missing").to_string();
    assert!(message.contains("/nonexistent/poolsocks.toml"), "{message}");
}

#[test]
fn rustsocks_sections_whose_features_are_off_are_listed_once_as_accepted() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config/valid/rustsocks_features_off.toml");
    let config = Config::load(&path).expect("valid");
    assert_eq!(
        config.rustsocks.accepted,
        [
            "[server.tls]",
            "auth.client_method = \"none\"",
            "[auth.pam]",
            "[auth.gssapi]",
            "[acl]",
            "sessions.enabled",
            "sessions.storage",
            "sessions.dashboard_enabled",
            "sessions.base_path",
            "[sessions.dashboard_auth]",
            "[metrics]",
            "[qos]",
        ]
    );
    // poolsocks' own keys in the same sections keep their meaning.
    assert!(config.server.pool.enabled && config.sessions.stats_api_enabled);
    assert_eq!(config.auth.users.len(), 1, "dashboard users are not SOCKS users");
    assert!(!format!("{config:?}").contains("never-printed"));
}
