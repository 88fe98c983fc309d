//! Property tests of the SOCKS5 and RFC 1929 codecs: any byte string decodes to a message or a
//! typed error, never a panic, and every valid message round-trips through its wire form.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use poolsocks::secret::Secret;
use poolsocks::socks::{
    Command, Greeting, Reply, ReplyCode, Request, TargetAddr, UserPassReply, UserPassRequest,
};
use proptest::prelude::*;

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().build().expect("runtime").block_on(future)
}

fn target_addr() -> impl Strategy<Value = TargetAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| TargetAddr::Ip(SocketAddr::new(
            Ipv4Addr::from(ip).into(),
            port
        ))),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| TargetAddr::Ip(SocketAddr::new(
            Ipv6Addr::from(ip).into(),
            port
        ))),
        ("[a-zA-Z0-9.-]{1,255}", any::<u16>())
            .prop_map(|(name, port)| TargetAddr::Domain(name, port)),
    ]
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![Just(Command::Connect), Just(Command::Bind), Just(Command::UdpAssociate)]
}

fn reply_code() -> impl Strategy<Value = ReplyCode> {
    (0u8..=8).prop_map(|byte| ReplyCode::from_byte(byte).expect("codes 0..=8 exist"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_decode_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        block_on(async {
            let _ = Greeting::read_from(&mut bytes.as_slice()).await;
            let _ = UserPassRequest::read_from(&mut bytes.as_slice()).await;
            let _ = UserPassReply::read_from(&mut bytes.as_slice()).await;
            let _ = Request::read_from(&mut bytes.as_slice()).await;
            let _ = Reply::read_from(&mut bytes.as_slice()).await;
        });
    }

    #[test]
    fn a_decoded_request_re_encodes_to_what_was_read(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        block_on(async {
            let mut rest = bytes.as_slice();
            if let Ok(request) = Request::read_from(&mut rest).await {
                let consumed = bytes.len() - rest.len();
                let mut wire = Vec::new();
                request.write_to(&mut wire);
                // The reserved byte is ignored on input and written as zero.
                let mut expected = bytes[..consumed].to_vec();
                expected[2] = 0;
                prop_assert_eq!(wire, expected);
            }
            Ok(())
        })?;
    }

    #[test]
    fn requests_round_trip(command in command(), target in target_addr()) {
        let request = Request { command, target };
        let mut wire = Vec::new();
        request.write_to(&mut wire);
        let decoded = block_on(Request::read_from(&mut wire.as_slice())).expect("decodes");
        prop_assert_eq!(decoded, request);
    }

    #[test]
    fn replies_round_trip(code in reply_code(), bound in target_addr()) {
        let reply = Reply { code, bound };
        let decoded = block_on(Reply::read_from(&mut reply.to_bytes().as_slice())).expect("decodes");
        prop_assert_eq!(decoded, reply);
    }

    #[test]
    fn greetings_round_trip(methods in proptest::collection::vec(any::<u8>(), 1..=255)) {
        let greeting = Greeting { methods };
        let mut wire = Vec::new();
        greeting.write_to(&mut wire);
        let decoded = block_on(Greeting::read_from(&mut wire.as_slice())).expect("decodes");
        prop_assert_eq!(decoded, greeting);
    }

    #[test]
    fn credentials_round_trip(username in "[ -~]{0,255}", password in "[ -~]{0,255}") {
        let request = UserPassRequest { username, password: Secret::new(password) };
        let mut wire = Vec::new();
        request.write_to(&mut wire);
        let decoded = block_on(UserPassRequest::read_from(&mut wire.as_slice())).expect("decodes");
        prop_assert_eq!(decoded, request);
    }

    #[test]
    fn truncating_a_valid_request_anywhere_is_an_error_not_a_panic(
        command in command(), target in target_addr(), cut in any::<prop::sample::Index>()
    ) {
        let mut wire = Vec::new();
        Request { command, target }.write_to(&mut wire);
        let cut = cut.index(wire.len());
        prop_assert!(block_on(Request::read_from(&mut &wire[..cut])).is_err());
    }
}
