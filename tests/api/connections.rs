//! Connections as an attacker holds them: slow or silent clients, idle and abusive HTTP/2.
//! Each must be closed within its limit while the listener keeps serving everyone else.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::helpers::*;

const SLOTS: usize = 5;
const LIMIT: Duration = Duration::from_millis(1000);

/// What a stalling client sends before it goes quiet.
#[derive(Clone, Copy, Debug)]
enum Stall {
    /// Connects and sends nothing.
    Nothing,
    /// One byte: `P` keeps HTTP/2 detection waiting for the rest of the preface.
    OneByte(u8),
    /// A request head, one byte every 500 ms: always sending, never finishing.
    Trickle,
    /// A whole head, then its body one byte every 500 ms.
    TrickledBody,
}

/// Reads until the server closes the connection; how long after `since` that was.
async fn closed_after(mut stream: tokio::net::tcp::OwnedReadHalf, since: Instant) -> Duration {
    let mut buf = [0u8; 512];
    let closed = tokio::time::timeout(DEADLINE, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server kept a stalled connection open");
    since.elapsed()
}

/// Opens one stalling connection and returns how long the server took to close it.
async fn stalled(app: &TestApp, stall: Stall) -> Duration {
    let stream = TcpStream::connect(app.address).await.unwrap();
    let opened = Instant::now();
    let (read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        match stall {
            Stall::Nothing => {}
            Stall::OneByte(b) => {
                let _ = write.write_all(&[b]).await;
            }
            Stall::Trickle | Stall::TrickledBody => {
                let (head, paced_from) = match stall {
                    Stall::Trickle => (
                        format!("POST {ENSURE_PATH} HTTP/1.1\r\nHost: x\r\nX-Slow: "),
                        0,
                    ),
                    _ => {
                        let head = format!(
                            "POST {ENSURE_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
                        );
                        let len = head.len();
                        (head, len)
                    }
                };
                // Paces the slow client's bytes; it is what is under test, not a sync.
                let mut pace = tokio::time::interval(Duration::from_millis(500));
                pace.tick().await; // the first tick is at once
                for (i, b) in head.bytes().chain(std::iter::repeat(b'a')).enumerate() {
                    if write.write_all(&[b]).await.is_err() {
                        break;
                    }
                    if i >= paced_from {
                        pace.tick().await;
                    }
                }
            }
        }
        write // kept open until the server closes: the client itself never gives up
    });
    let after = closed_after(read, opened).await;
    drop(writer.await.unwrap());
    after
}

/// `MAX_CONNECTIONS` stalling clients are all closed within about the header timeout,
/// and then the listener answers at once on a fresh connection.
async fn stalled_clients_are_closed_and_the_listener_serves_again(stall: Stall) {
    let app = spawn_app_with(|v| {
        set(v, "MAX_CONNECTIONS", &SLOTS.to_string());
        set(v, "HEADER_READ_TIMEOUT_MS", &LIMIT.as_millis().to_string());
    })
    .await;
    let closed = join_all((0..SLOTS).map(|_| stalled(&app, stall))).await;
    for after in &closed {
        assert!(
            *after >= LIMIT.mul_f32(0.9) && *after < LIMIT + Duration::from_millis(1500),
            "{stall:?}: closed after {after:?}, the limit is {LIMIT:?}"
        );
    }

    // A fresh client (no pooled connection) on a fresh connection.
    let client = reqwest::Client::new();
    let started = Instant::now();
    let health = client.get(app.url("/healthz")).send().await.unwrap();
    let health_took = started.elapsed();
    assert_eq!(health.status(), 200);
    let started = Instant::now();
    let ensure = reqwest::Client::new()
        .post(app.url(ENSURE_PATH))
        .bearer_auth(token("after-stall", "after-stall@example.com"))
        .send()
        .await
        .unwrap();
    let ensure_took = started.elapsed();
    assert_eq!(ensure.status(), 200);
    assert!(health_took < Duration::from_millis(500), "{health_took:?}");
    assert!(ensure_took < Duration::from_secs(2), "{ensure_took:?}");
    let slowest = closed.iter().max().unwrap();
    let fastest = closed.iter().min().unwrap();
    // The figures of the slow-client test, for the record (`--nocapture` shows them).
    println!(
        "{stall:?}: {SLOTS} sockets (MAX_CONNECTIONS={SLOTS}, HEADER_READ_TIMEOUT_MS={}) closed after {fastest:?}..{slowest:?}; then /healthz in {health_took:?}, ensure in {ensure_took:?}",
        LIMIT.as_millis()
    );
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn one_byte_clients_are_closed_within_the_header_timeout() {
    stalled_clients_are_closed_and_the_listener_serves_again(Stall::OneByte(b'P')).await;
    stalled_clients_are_closed_and_the_listener_serves_again(Stall::OneByte(b'G')).await;
}

#[tokio::test]
async fn silent_clients_are_closed_within_the_header_timeout() {
    stalled_clients_are_closed_and_the_listener_serves_again(Stall::Nothing).await;
}

#[tokio::test]
async fn a_head_trickled_byte_by_byte_is_cut_off_at_the_header_timeout() {
    stalled_clients_are_closed_and_the_listener_serves_again(Stall::Trickle).await;
}

#[tokio::test]
async fn a_body_trickled_byte_by_byte_is_cut_off_at_the_header_timeout() {
    stalled_clients_are_closed_and_the_listener_serves_again(Stall::TrickledBody).await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let app = spawn_app_with(|v| set(v, "HEADER_READ_TIMEOUT_MS", "1000")).await;
    let stream = TcpStream::connect(app.address).await.unwrap();
    let (read, mut write) = stream.into_split();
    write
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let answered = Instant::now();
    let after = closed_after(read, answered).await;
    assert!(after < Duration::from_millis(2500), "{after:?}");
    app.shutdown().await.unwrap();
}

/// An h2c (prior knowledge) client connection, driven on its own task.
async fn h2c(
    app: &TestApp,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = TcpStream::connect(app.address).await.unwrap();
    let (send, connection) = h2::client::handshake(tcp).await.unwrap();
    (send, tokio::spawn(connection))
}

async fn h2_get(
    send: &mut h2::client::SendRequest<bytes::Bytes>,
    path: &str,
    extra: Option<(&str, String)>,
) -> Result<u16, h2::Error> {
    let mut request = hyper::Request::get(path);
    if let Some((name, value)) = extra {
        request = request.header(name, value);
    }
    let mut ready = send.clone().ready().await?;
    let (response, _) = ready.send_request(request.body(()).unwrap(), true)?;
    Ok(response.await?.status().as_u16())
}

#[tokio::test]
async fn an_idle_h2c_connection_is_closed_though_it_answers_pings() {
    let app = spawn_app_with(|v| set(v, "HEADER_READ_TIMEOUT_MS", "1000")).await;
    let (mut send, connection) = h2c(&app).await;
    assert_eq!(h2_get(&mut send, "/healthz", None).await.unwrap(), 200);
    let idle_from = Instant::now();
    // The h2 client answers the server's pings by itself: only the idle limit closes it.
    let ended = tokio::time::timeout(DEADLINE, connection).await;
    assert!(ended.is_ok(), "the idle h2c connection was kept open");
    let after = idle_from.elapsed();
    assert!(after < Duration::from_millis(2500), "{after:?}");
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn h2c_advertises_its_stream_limit_and_refuses_oversized_header_lists() {
    let app = spawn_app().await;
    let (mut send, _connection) = h2c(&app).await;
    assert_eq!(h2_get(&mut send, "/healthz", None).await.unwrap(), 200);
    assert_eq!(send.current_max_send_streams(), 256);
    // 80 KiB of headers, over the 64 KiB list limit: never served.
    let big = "a".repeat(80 * 1024);
    let answer = h2_get(&mut send, "/healthz", Some(("x-big", big))).await;
    assert!(!matches!(answer, Ok(200)), "{answer:?}");
    // Other clients are still served.
    assert_eq!(app.get("/healthz").await.status(), 200);
    app.shutdown().await.unwrap();
}

/// One HTTP/2 frame: 9-byte header and payload (RFC 9113 §4.1).
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[tokio::test]
async fn a_rapid_reset_client_is_sent_away_and_others_are_still_served() {
    const HEADERS: u8 = 0x1;
    const RST_STREAM: u8 = 0x3;
    const SETTINGS: u8 = 0x4;
    const GOAWAY: u8 = 0x7;
    const ENHANCE_YOUR_CALM: u32 = 0xb;
    const CANCEL: u32 = 0x8;
    let app = spawn_app().await;
    let mut stream = TcpStream::connect(app.address).await.unwrap();
    let mut attack = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    attack.extend(frame(SETTINGS, 0, 0, &[]));
    for i in 0..2000u32 {
        let id = 2 * i + 1;
        // HPACK, all from the static table: :method GET, :scheme http, :path /.
        attack.extend(frame(HEADERS, 0x4 | 0x1, id, &[0x82, 0x86, 0x84]));
        attack.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
    }
    // The server may close while the rest is still being written.
    let _ = stream.write_all(&attack).await;
    let mut received = Vec::new();
    let read = tokio::time::timeout(DEADLINE, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the rapid-reset connection was kept open");
    let mut goaway = None;
    let mut rest = &received[..];
    while rest.len() >= 9 {
        let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
        if rest.len() < 9 + len {
            break;
        }
        if rest[3] == GOAWAY && len >= 8 {
            goaway = Some(u32::from_be_bytes(rest[13..17].try_into().unwrap()));
        }
        rest = &rest[9 + len..];
    }
    assert_eq!(
        goaway,
        Some(ENHANCE_YOUR_CALM),
        "no GOAWAY(ENHANCE_YOUR_CALM)"
    );
    assert_eq!(app.get("/healthz").await.status(), 200);
    let (mut send, _connection) = h2c(&app).await;
    assert_eq!(h2_get(&mut send, "/healthz", None).await.unwrap(), 200);
    app.shutdown().await.unwrap();
}
