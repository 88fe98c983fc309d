//! The GlobalBudget and the Janitor, stopped or killed under a running proxy: each is restarted
//! by the Directory, the restart is in telemetry, sessions in flight keep every byte, new
//! clients are served, and the pool's books still match what the upstream holds.

mod common;

use std::time::Duration;

use common::*;
use poolsocks::pool::{BudgetMsg, JanitorMsg, Pool};
use poolsocks::socks::{ReplyCode, TargetAddr};
use poolsocks::telemetry::{EventQuery, Telemetry};
use ractor::{ActorCell, Message};

struct Running {
    proxy: TestProxy,
    pool: Pool,
    telemetry: Telemetry,
    upstream: TaggedServer,
}

async fn start() -> Running {
    let mut config = test_config();
    config.server.pool.enabled = true;
    let server = common::build_server(config).await.expect("build");
    let pool = server.pool().expect("pool enabled");
    let telemetry = server.telemetry();
    let proxy = TestProxy::start_server(server).await;
    Running { proxy, pool, telemetry, upstream: TaggedServer::start().await }
}

/// The Directory's child actor handling messages of type `M`.
fn child_of_type<M: Message>(pool: &Pool) -> ActorCell {
    pool.directory()
        .get_cell()
        .get_children()
        .into_iter()
        .find(|child| child.is_message_type_of::<M>() == Some(true))
        .expect("child actor of that type")
}

/// Awaits a supervisor event in telemetry whose message contains `needle`, then the end of
/// the restart that recorded it. Each round trip to the Directory is an event: supervision
/// events are handled before later messages.
async fn await_restart(running: &Running, needle: &str) {
    let query = EventQuery { category: Some("pool.supervisor".into()), ..EventQuery::default() };
    for _ in 0..10_000 {
        if running.telemetry.query(&query).iter().any(|event| event.message.contains(needle)) {
            // The event is recorded as the restart begins, and the Directory may still be
            // stopping managers and spawning the new actor: a message sent now is answered
            // only once that handling is over.
            running.pool.stats().await.expect("the directory answers");
            return;
        }
        running.pool.stats().await.expect("the directory answers");
    }
    panic!("no restart of the {needle} recorded: {:?}", running.telemetry.query(&query));
}

async fn served(running: &mut Running) {
    let (mut stream, reply) = connect(running.proxy.addr, running.upstream.addr.into()).await;
    assert_eq!(reply.code, ReplyCode::Succeeded);
    let conn = who(&mut stream).await;
    assert!(conn >= 1);
    assert_eq!(round_trip(&mut stream, b"served after a restart").await, b"served after a restart");
    // The session is over once the upstream sees its connection closed; only then may the
    // books be read (the destination's published view could still show the state before it).
    drop(stream);
    running.upstream.await_closed(conn).await;
}

async fn books_balance(running: &mut Running) {
    let target: TargetAddr = running.upstream.addr.into();
    let mut view = running.pool.watch_destination(&target).await.expect("watch");
    let rest = tokio::time::timeout(Duration::from_secs(10), view.wait_for(|s| s.is_quiet()))
        .await
        .expect("at rest")
        .expect("view")
        .clone();
    // Connections the pool closed show up upstream as close events; await them.
    running.upstream.drain();
    while running.upstream.open() != rest.idle {
        running.upstream.next_event().await;
    }
    let stats = running.pool.stats().await.expect("stats");
    assert_eq!(stats.connections_in_use, 0, "{stats:?}");
    assert_eq!(stats.pending_creates, 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_global_budget_is_restarted_and_no_client_notices() {
    let mut running = start().await;
    served(&mut running).await; // warm: a spare exists now
    let (mut in_flight, reply) = connect(running.proxy.addr, running.upstream.addr.into()).await;
    assert_eq!(reply.code, ReplyCode::Succeeded);
    assert_eq!(round_trip(&mut in_flight, b"before").await, b"before");

    let old = child_of_type::<BudgetMsg>(&running.pool);
    old.kill();
    await_restart(&running, "global budget").await;
    assert_ne!(child_of_type::<BudgetMsg>(&running.pool).get_id(), old.get_id());

    // The session in flight keeps relaying, byte for byte.
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 241) as u8).collect();
    assert_eq!(round_trip(&mut in_flight, &payload).await, payload);
    drop(in_flight);
    for _ in 0..5 {
        served(&mut running).await;
    }
    books_balance(&mut running).await;
    running.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_janitor_is_restarted_and_keeps_sweeping() {
    let mut running = start().await;
    served(&mut running).await;
    let old = child_of_type::<JanitorMsg>(&running.pool);
    old.stop(Some("test stops the janitor".into()));
    await_restart(&running, "janitor").await;
    assert_ne!(child_of_type::<JanitorMsg>(&running.pool).get_id(), old.get_id());
    // The new Janitor answers a sweep.
    let report = running.pool.run_janitor().await.expect("a sweep by the new janitor");
    assert_eq!(report.expired, 0, "nothing is old enough yet");
    served(&mut running).await;
    books_balance(&mut running).await;
    running.proxy.stop().await;
}
