//! Property tests of the SOCKS5 and RFC 1929 codecs: any byte string decodes to a message or a
//! typed error, never a panic, and every valid message round-trips through its wire form. The
//! same holds for the UDP request header (RFC 1928 section 7), which is parsed from a slice.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use poolsocks::secret::Secret;
use poolsocks::socks::{
    write_ip_header_before, Command, Greeting, Reply, ReplyCode, Request, TargetAddr, UdpDatagram,
    UdpHeaderError, UserPassReply, UserPassRequest, UDP_IP_HEADER_MAX,
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

    #[test]
    fn any_datagram_parses_to_a_header_or_a_typed_error(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        match UdpDatagram::parse(&bytes) {
            Ok(datagram) => {
                // Whatever parsed re-encodes to the same bytes (RSV was zero).
                let mut wire = Vec::new();
                datagram.write_to(&mut wire);
                prop_assert_eq!(wire, bytes);
            }
            Err(UdpHeaderError::Truncated(len)) => prop_assert_eq!(len, bytes.len()),
            Err(UdpHeaderError::AddressTypeNotSupported(atyp)) => {
                prop_assert!(![1u8, 3, 4].contains(&atyp));
                prop_assert_eq!(bytes[3], atyp);
            }
            Err(UdpHeaderError::EmptyDomain) => prop_assert_eq!(&bytes[3..5], &[3u8, 0][..]),
            Err(UdpHeaderError::DomainNotUtf8) => prop_assert_eq!(bytes[3], 3),
            Err(UdpHeaderError::ReservedNotZero(rsv)) => {
                prop_assert!(rsv != 0);
                prop_assert_eq!(rsv.to_be_bytes(), [bytes[0], bytes[1]]);
            }
        }
    }

    #[test]
    fn datagrams_round_trip(
        frag in any::<u8>(),
        target in target_addr(),
        payload in proptest::collection::vec(any::<u8>(), 0..2000),
    ) {
        let datagram = UdpDatagram { frag, target, payload: &payload };
        let mut wire = Vec::new();
        datagram.write_to(&mut wire);
        prop_assert_eq!(UdpDatagram::parse(&wire).expect("decodes"), datagram);
        // Cut anywhere inside the header, it is an error (a cut in the payload is a shorter
        // payload, which UDP cannot tell from a whole one).
        let header = wire.len() - payload.len();
        for cut in 0..header {
            prop_assert!(UdpDatagram::parse(&wire[..cut]).is_err());
        }
    }

    #[test]
    fn a_reply_header_written_in_place_parses_back(
        source in prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(Ipv4Addr::from(ip).into(), port)),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(Ipv6Addr::from(ip).into(), port)),
        ],
        payload in proptest::collection::vec(any::<u8>(), 0..100),
    ) {
        let mut buf = vec![0xeeu8; UDP_IP_HEADER_MAX];
        buf.extend_from_slice(&payload);
        let start = write_ip_header_before(&mut buf[..UDP_IP_HEADER_MAX], &source).expect("room");
        let parsed = UdpDatagram::parse(&buf[start..]).expect("parses");
        prop_assert_eq!(parsed, UdpDatagram { frag: 0, target: TargetAddr::Ip(source), payload: &payload });
    }
}
