//! Issue 34: a flood of strangers' logins must not starve a client that has logged in before.
//! Every login costs one argon2 check when a user is hashed, and only two run at once.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use poolsocks::config::UserConfig;
use poolsocks::secret::Secret;
use poolsocks::socks::{UserPassReply, UserPassRequest, METHOD_USERPASS};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};

/// Upper bound for the whole flood to be answered; reaching it means a hang, not a slow pass.
const DEADLINE: Duration = Duration::from_secs(120);
const FLOOD: usize = 300;
/// Strangers the known client must overtake: the line holds 64 waiting strangers.
const OVERTAKEN_AT_LEAST: usize = 32;

fn argon2_phc(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::from_b64("ZmFpcm5lc3N0ZXN0c2FsdA").expect("salt");
    argon2::Argon2::default().hash_password(password.as_bytes(), &salt).expect("hash").to_string()
}

/// A client of the proxy whose source is `source` (any 127.0.0.0/8 address is local).
async fn connect_from(source: Ipv4Addr, proxy: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(source.into(), 0)).expect("bind source");
    socket.connect(proxy).await.expect("connect to proxy")
}

fn credentials(user: &str, password: &str) -> Vec<u8> {
    let mut bytes = Vec::new();
    UserPassRequest { username: user.into(), password: Secret::new(password) }.write_to(&mut bytes);
    bytes
}

async fn login_from(source: Ipv4Addr, proxy: SocketAddr, user: &str, password: &str) -> bool {
    let mut stream = connect_from(source, proxy).await;
    assert_eq!(greet(&mut stream, &[METHOD_USERPASS]).await.method, METHOD_USERPASS);
    authenticate(&mut stream, user, password).await.success
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_client_logs_in_ahead_of_a_flood_of_strangers_and_the_excess_is_shed() {
    let mut config = test_config();
    // Long enough that nobody times out in line, with or without fairness.
    config.server.handshake_timeout_ms = 120_000;
    config.auth.users =
        vec![UserConfig { username: "alice".into(), password: Secret::new(argon2_phc("right")) }];
    let server = build_server(config).await.expect("build");
    let metrics = server.metrics();
    let proxy = TestProxy::start_server(server).await;
    let known = Ipv4Addr::new(127, 0, 0, 2);
    assert!(login_from(known, proxy.addr, "alice", "right").await, "first login");

    // The flood: unknown users from as many addresses, each well under the failure limit. All
    // connect and greet first, then send their credentials at once, so the line is full when
    // the known client asks (stragglers would let it drain meanwhile).
    let answered = Arc::new(AtomicUsize::new(0));
    let (go_tx, go) = watch::channel(false);
    let (ready_tx, mut ready) = mpsc::unbounded_channel();
    let (sent_tx, mut sent) = mpsc::unbounded_channel();
    let mut flood = Vec::new();
    for i in 0..FLOOD {
        let source = Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8);
        let (proxy, answered) = (proxy.addr, answered.clone());
        let (mut go, ready, sent) = (go.clone(), ready_tx.clone(), sent_tx.clone());
        flood.push(tokio::spawn(async move {
            let mut stream = connect_from(source, proxy).await;
            assert_eq!(greet(&mut stream, &[METHOD_USERPASS]).await.method, METHOD_USERPASS);
            let _ = ready.send(());
            go.wait_for(|&go| go).await.expect("go");
            stream.write_all(&credentials(&format!("stranger{i}"), "guess")).await.expect("send");
            let _ = sent.send(());
            // A reply must come (a failure), not a hang or a bare close.
            let reply = UserPassReply::read_from(&mut stream).await.expect("auth reply");
            answered.fetch_add(1, Ordering::SeqCst);
            reply.success
        }));
    }
    for _ in 0..FLOOD {
        ready.recv().await.expect("every stranger greeted");
    }
    let mut client = connect_from(known, proxy.addr).await;
    assert_eq!(greet(&mut client, &[METHOD_USERPASS]).await.method, METHOD_USERPASS);
    go_tx.send(true).expect("go");
    for _ in 0..FLOOD {
        sent.recv().await.expect("every stranger sent its credentials");
    }

    let before = answered.load(Ordering::SeqCst);
    let started = tokio::time::Instant::now();
    client.write_all(&credentials("alice", "right")).await.expect("send");
    let accepted = UserPassReply::read_from(&mut client).await.expect("auth reply").success;
    drop(client);
    let unanswered = FLOOD - answered.load(Ordering::SeqCst);
    println!(
        "known client answered after {:?}, with {unanswered} of {FLOOD} strangers unanswered \
         ({} when it asked)",
        started.elapsed(),
        FLOOD - before,
    );
    assert!(accepted, "the known client's login");
    assert!(
        unanswered >= OVERTAKEN_AT_LEAST,
        "the known client was answered with only {unanswered} of {FLOOD} strangers still waiting"
    );

    let outcomes = tokio::time::timeout(DEADLINE, async {
        let mut outcomes = Vec::new();
        for login in flood {
            outcomes.push(login.await.expect("every stranger got a reply"));
        }
        outcomes
    })
    .await
    .expect("the flood is answered in time");
    assert!(outcomes.iter().all(|&success| !success), "a stranger was let in");
    let auth = serde_json::to_value(metrics.snapshot()).expect("snapshot as JSON");
    let count = |name: &str| auth[name].as_u64().unwrap_or_else(|| panic!("{name}: {auth}"));
    println!("strangers checked {}, shed {}", count("logins_rejected"), count("logins_shed"));
    assert_eq!(count("logins_accepted"), 2);
    assert_eq!(count("logins_rejected") + count("logins_shed"), FLOOD as u64);
    // The line holds 64 strangers and 2 are checked at once: most of the burst is shed.
    assert!(count("logins_shed") >= (FLOOD / 2) as u64, "{auth}");
    proxy.stop().await;
}
