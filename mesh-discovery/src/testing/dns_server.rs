//! [`DnsServer`]: a tiny authoritative DNS server on loopback for tests of `resolution: DNS`.

use std::collections::{BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_resolver::proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_resolver::proto::rr::rdata::A;
use hickory_resolver::proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use crate::dns::DnsSettings;

/// How the test server treats queries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// A records from the map, NOERROR/no data for other types of a known name, NXDOMAIN else.
    Answer,
    /// SERVFAIL to everything.
    ServFail,
    /// No reply at all (the resolver times out).
    Silent,
}

#[derive(Debug)]
pub struct ServerState {
    /// Lower-case names without the trailing dot.
    records: HashMap<String, Vec<Ipv4Addr>>,
    ttl: u32,
    mode: Mode,
    /// Names whose queries are dropped whatever the mode (a slow upstream for just them).
    stalled: BTreeSet<String>,
    /// Queries received, per the mode they met.
    seen: HashMap<Mode, usize>,
}

/// An authoritative server for a handful of A records, on UDP 127.0.0.1:<ephemeral>: the
/// DNS a test controls (answers, TTL, failures).
#[derive(Debug)]
pub struct DnsServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<ServerState>>,
    task: JoinHandle<()>,
}

impl DnsServer {
    pub async fn start(ttl: u32, records: &[(&str, &[Ipv4Addr])]) -> anyhow::Result<DnsServer> {
        let socket = UdpSocket::bind("127.0.0.1:0").await?;
        let addr = socket.local_addr()?;
        let state = Arc::new(Mutex::new(ServerState {
            records: records
                .iter()
                .map(|(name, addrs)| (name.to_ascii_lowercase(), addrs.to_vec()))
                .collect(),
            ttl,
            mode: Mode::Answer,
            stalled: BTreeSet::new(),
            seen: HashMap::new(),
        }));
        let task = tokio::spawn(serve(socket, Arc::clone(&state)));
        Ok(DnsServer { addr, state, task })
    }

    pub fn settings(&self, min_ttl: Duration, max_ttl: Duration) -> DnsSettings {
        DnsSettings {
            nameservers: vec![self.addr],
            min_ttl,
            max_ttl,
        }
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut ServerState) -> T) -> T {
        let mut state = self.state.lock().expect("test DNS state poisoned");
        f(&mut state)
    }

    pub fn set(&self, name: &str, addrs: &[Ipv4Addr]) {
        self.with(|s| s.records.insert(name.to_owned(), addrs.to_vec()));
    }

    pub fn stall(&self, name: &str) {
        self.with(|s| s.stalled.insert(name.to_owned()));
    }

    pub fn set_mode(&self, mode: Mode) {
        self.with(|s| s.mode = mode);
    }

    pub fn seen(&self, mode: Mode) -> usize {
        self.with(|s| s.seen.get(&mode).copied().unwrap_or(0))
    }

    pub fn seen_total(&self) -> usize {
        self.with(|s| s.seen.values().sum())
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(socket: UdpSocket, state: Arc<Mutex<ServerState>>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((len, peer)) = socket.recv_from(&mut buf).await else {
            return;
        };
        let Ok(request) = Message::from_vec(&buf[..len]) else {
            continue;
        };
        let reply = {
            let mut state = state.lock().expect("test DNS state poisoned");
            answer(&mut state, &request)
        };
        if let Some(reply) = reply {
            // A lost reply is what the resolver's retries are for.
            let _ = socket.send_to(&reply, peer).await;
        }
    }
}

fn answer(state: &mut ServerState, request: &Message) -> Option<Vec<u8>> {
    *state.seen.entry(state.mode).or_default() += 1;
    if state.mode == Mode::Silent || request.metadata.message_type != MessageType::Query {
        return None;
    }
    let stalled = request.queries.iter().any(|query| {
        let name = query.name().to_ascii().to_ascii_lowercase();
        state.stalled.contains(name.trim_end_matches('.'))
    });
    if stalled {
        return None;
    }
    let mut response = Message::response(request.metadata.id, OpCode::Query);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.metadata.authoritative = true;
    response.add_queries(request.queries.iter().cloned());
    if state.mode == Mode::ServFail {
        response.metadata.response_code = ResponseCode::ServFail;
        return response.to_vec().ok();
    }
    for query in &request.queries {
        let name = query.name().to_ascii().to_ascii_lowercase();
        let Some(addrs) = state.records.get(name.trim_end_matches('.')) else {
            response.metadata.response_code = ResponseCode::NXDomain;
            continue;
        };
        if query.query_type() == RecordType::A {
            for addr in addrs {
                response.add_answer(Record::from_rdata(
                    query.name().clone(),
                    state.ttl,
                    RData::A(A(*addr)),
                ));
            }
        }
    }
    response.to_vec().ok()
}
