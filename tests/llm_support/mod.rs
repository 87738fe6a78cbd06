//! A tiny HTTP/1.1 server on 127.0.0.1 standing in for OpenAI- and Anthropic-compatible
//! endpoints: it plays the responses a test scripts, in order, one per connection, and
//! records the requests it receives so the test can check what went over the wire.

// Shared by several test binaries, each of which uses only part of it.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use serde_json::Value as Json;

/// What the server does with one request.
#[derive(Debug, Clone)]
pub enum Response {
    /// A complete response with a `Content-Length`.
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// A `text/event-stream` body written in small pieces (so events and characters arrive
    /// split across reads) and ended by closing the connection. Before the event at
    /// `stall_at`, if any, the server waits `stall`.
    Stream {
        events: Vec<String>,
        stall_at: Option<usize>,
        stall: Duration,
    },
    /// Read the request, then close the connection without a word.
    HangUp,
    /// Wait, then respond.
    Slow(Duration, Box<Response>),
}

impl Response {
    pub fn json(status: u16, body: Json) -> Response {
        Response::Full {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
        }
    }

    pub fn text(status: u16, body: &str) -> Response {
        Response::Full {
            status,
            headers: vec![("Content-Type".into(), "text/plain".into())],
            body: body.as_bytes().to_vec(),
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Response {
        if let Response::Full { headers, .. } = &mut self {
            headers.push((name.into(), value.into()));
        }
        self
    }

    /// Each item is one event's lines (`data: …`, or `event: …\ndata: …`).
    pub fn sse<S: Into<String>>(events: impl IntoIterator<Item = S>) -> Response {
        Response::Stream {
            events: events.into_iter().map(Into::into).collect(),
            stall_at: None,
            stall: Duration::ZERO,
        }
    }

    /// Sends the first `events` events, then goes quiet for `stall` before the rest.
    pub fn stalling_after(self, events: usize, stall: Duration) -> Response {
        match self {
            Response::Stream { events: all, .. } => Response::Stream {
                events: all,
                stall_at: Some(events),
                stall,
            },
            other => other,
        }
    }

    pub fn slow(delay: Duration, then: Response) -> Response {
        Response::Slow(delay, Box::new(then))
    }
}

/// One request as the server read it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    /// Lower-cased names.
    pub headers: HashMap<String, String>,
    /// The body as JSON (Null if it was not JSON).
    pub body: Json,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

#[derive(Default)]
struct State {
    script: VecDeque<Response>,
    requests: Vec<Recorded>,
}

pub struct Server {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl Server {
    pub fn start(script: impl IntoIterator<Item = Response>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let addr = listener.local_addr().expect("a bound address");
        let state = Arc::new(Mutex::new(State {
            script: script.into_iter().collect(),
            requests: Vec::new(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (accept_state, accept_stop) = (state.clone(), stop.clone());
        thread::spawn(move || {
            for stream in listener.incoming() {
                if accept_stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let state = accept_state.clone();
                // One thread per connection, so a slow response does not hold up the retry
                // that follows it.
                thread::spawn(move || serve(stream, &state));
            }
        });
        Server { addr, state, stop }
    }

    /// `http://127.0.0.1:PORT`, without a path.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().expect("server state").requests.clone()
    }

    /// The only request received; fails the test if there were others.
    pub fn single_request(&self) -> Recorded {
        let requests = self.requests();
        assert_eq!(requests.len(), 1, "expected one request, got {requests:#?}");
        requests[0].clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(mut stream: TcpStream, state: &Mutex<State>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let Some(request) = read_request(&mut stream) else {
        return;
    };
    let response = {
        let Ok(mut state) = state.lock() else { return };
        state.requests.push(request);
        state.script.pop_front()
    };
    let response = response.unwrap_or_else(|| Response::text(418, "no response scripted"));
    respond(&mut stream, response);
}

fn read_request(stream: &mut TcpStream) -> Option<Recorded> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.lines();
    let path = lines.next()?.split_whitespace().nth(1)?.to_string();
    let headers: HashMap<String, String> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_lowercase(), value.trim().to_string()))
        .collect();
    let length: usize = headers
        .get("content-length")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = serde_json::from_slice(&buf[head_end..head_end + length]).unwrap_or(Json::Null);
    Some(Recorded {
        path,
        headers,
        body,
    })
}

/// Write errors are ignored: a client that gave up (a timeout test) has closed its end.
fn respond(stream: &mut TcpStream, response: Response) {
    match response {
        Response::Slow(delay, then) => {
            thread::sleep(delay);
            respond(stream, *then);
        }
        Response::HangUp => {
            let _ = stream.shutdown(Shutdown::Both);
        }
        Response::Full {
            status,
            headers,
            body,
        } => {
            let mut head = format!(
                "HTTP/1.1 {status} Scripted\r\nContent-Length: {}\r\nConnection: close\r\n",
                body.len()
            );
            for (name, value) in headers {
                head.push_str(&format!("{name}: {value}\r\n"));
            }
            head.push_str("\r\n");
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
            let _ = stream.flush();
        }
        Response::Stream {
            events,
            stall_at,
            stall,
        } => {
            let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                        Cache-Control: no-cache\r\nConnection: close\r\n\r\n";
            if stream.write_all(head.as_bytes()).is_err() {
                return;
            }
            for (i, event) in events.iter().enumerate() {
                if stall_at == Some(i) {
                    thread::sleep(stall);
                }
                let bytes = format!("{event}\n\n").into_bytes();
                // Small pieces split lines and multi-byte characters between reads.
                for piece in bytes.chunks(7) {
                    if stream
                        .write_all(piece)
                        .and_then(|_| stream.flush())
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
}
