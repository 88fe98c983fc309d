//! A DNS server of the test's own on loopback: names in its table get an A record at once,
//! names starting with `slow` are never answered, everything else gets NXDOMAIN. The daemon is
//! pointed at it with `[server.dns] servers`, so no test asks the machine's DNS server.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::UdpSocket;

pub struct TestDns {
    pub addr: SocketAddr,
    /// Queries received (answered or not).
    pub queries: Arc<AtomicUsize>,
}

impl TestDns {
    pub async fn start(names: &[(&str, Ipv4Addr)]) -> TestDns {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind dns");
        let addr = socket.local_addr().expect("dns addr");
        let table: HashMap<String, Ipv4Addr> =
            names.iter().map(|(name, ip)| (name.to_ascii_lowercase(), *ip)).collect();
        let queries = Arc::new(AtomicUsize::new(0));
        let counter = queries.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 1500];
            while let Ok((len, from)) = socket.recv_from(&mut buf).await {
                counter.fetch_add(1, Ordering::Relaxed);
                let query = &buf[..len];
                let Some((name, qtype, question_end)) = parse_question(query) else { continue };
                if name.starts_with("slow") {
                    continue; // a name server that never answers
                }
                let answer = table.get(&name).filter(|_| qtype == 1);
                let reply =
                    build_reply(query, question_end, answer.copied(), table.contains_key(&name));
                let _ = socket.send_to(&reply, from).await;
            }
        });
        TestDns { addr, queries }
    }
}

/// The question's name (lower case, no trailing dot), type, and where the question ends.
fn parse_question(query: &[u8]) -> Option<(String, u16, usize)> {
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = *query.get(at)? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    Some((labels.join("."), qtype, at + 4))
}

fn build_reply(
    query: &[u8],
    question_end: usize,
    answer: Option<Ipv4Addr>,
    known: bool,
) -> Vec<u8> {
    let mut reply = query[..question_end].to_vec();
    // QR, opcode 0, RD copied, RA; RCODE 0 (known name) or 3 (NXDOMAIN).
    reply[2] = 0x80 | (query[2] & 0x01);
    reply[3] = 0x80 | if known { 0 } else { 3 };
    reply[4..6].copy_from_slice(&1u16.to_be_bytes()); // QDCOUNT
    reply[6..8].copy_from_slice(&u16::from(answer.is_some()).to_be_bytes()); // ANCOUNT
    reply[8..12].fill(0); // NSCOUNT, ARCOUNT
    if let Some(ip) = answer {
        reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]); // name pointer, A, IN
        reply.extend_from_slice(&30u32.to_be_bytes()); // TTL
        reply.extend_from_slice(&4u16.to_be_bytes());
        reply.extend_from_slice(&ip.octets());
    }
    reply
}
