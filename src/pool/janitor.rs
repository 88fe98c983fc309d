//! The Janitor: on a ractor interval timer, asks the Directory to expire old spares and prune
//! cold destinations. A harness drives it with `JanitorMsg::Tick` instead (or as well), and the
//! timer runs on tokio time, so `tokio::time::pause()`/`advance()` drive it deterministically.

use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::messages::{DirectoryMsg, JanitorMsg, SweepReport};

pub struct Janitor;

pub struct JanitorArgs {
    pub directory: ActorRef<DirectoryMsg>,
    pub period: Option<Duration>,
}

pub struct JanitorState {
    directory: ActorRef<DirectoryMsg>,
}

/// A pass visits every destination; this only bounds a wedged Directory.
const SWEEP_TIMEOUT: Duration = Duration::from_secs(60);

impl Actor for Janitor {
    type Msg = JanitorMsg;
    type State = JanitorState;
    type Arguments = JanitorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: JanitorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        if let Some(period) = args.period {
            // The timer task ends by itself when this actor stops.
            myself.send_interval(period, || JanitorMsg::Tick(None));
        }
        Ok(JanitorState { directory: args.directory })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: JanitorMsg,
        state: &mut JanitorState,
    ) -> Result<(), ActorProcessingErr> {
        let JanitorMsg::Tick(reply) = message;
        let report = match state.directory.call(DirectoryMsg::Sweep, Some(SWEEP_TIMEOUT)).await {
            Ok(ractor::rpc::CallResult::Success(report)) => report,
            Ok(_) | Err(_) => {
                tracing::warn!("janitor: the directory did not answer a sweep");
                SweepReport::default()
            }
        };
        if report.expired > 0 || report.pruned > 0 {
            tracing::debug!(?report, "janitor pass");
        }
        if let Some(reply) = reply {
            let _ = reply.send(report);
        }
        Ok(())
    }
}
