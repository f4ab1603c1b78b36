//! Metrics as an SRE scrapes them: counters that move with real traffic, a token that is enforced,
//! and an exposition that `promtool` accepts.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use hyper::StatusCode;

const TOKEN: &str = "scrape-token-0123456789";
const OFFER: &str = r#"{"type":"offer","sdp":"v=0\r\n"}"#;

async fn metrics_server() -> TestServer {
    TestServer::start(|_, o| o.metrics_token = Some(TOKEN.parse().unwrap())).await
}

#[tokio::test]
async fn a_scripted_call_moves_the_counters_and_histograms() {
    let server = metrics_server().await;
    let (mut a, ha) = Ws::join(&server).await;
    let (mut b, hb) = Ws::join(&server).await;
    let (a_id, b_id) = (ha["id"].as_u64().unwrap(), hb["id"].as_u64().unwrap());
    a.send(&format!(
        r#"{{"type":"video-offer-request","calleeId":{b_id},"offer":{OFFER}}}"#
    ))
    .await;
    b.recv().await;
    b.send(&format!(
        r#"{{"type":"client-reply","reply":"1","callerId":{a_id},"answer":{OFFER}}}"#
    ))
    .await;
    a.recv().await;
    a.send(&format!(
        r#"{{"type":"ice-candidate","clientId":{b_id},"candidate":{{}}}}"#
    ))
    .await;
    b.recv().await;
    a.send(&format!(
        r#"{{"type":"close-call-client","clientId":{b_id}}}"#
    ))
    .await;
    b.recv().await;
    a.send("{broken").await;
    assert_eq!(a.recv().await["code"], "invalid_json");
    let _ = https_get(&server, "/").await;

    let text = String::from_utf8(scrape(&server, Some(TOKEN)).await.body.to_vec()).unwrap();
    let expect = |series: &str, value: f64| {
        assert_eq!(sample(&text, series), Some(value), "{series} in:\n{text}");
    };
    expect("callgate_websocket_connections_opened_total", 2.0);
    expect("callgate_websocket_connections_open", 2.0);
    expect(
        r#"callgate_signaling_messages_received_total{type="video-offer-request"}"#,
        1.0,
    );
    expect(
        r#"callgate_signaling_messages_received_total{type="client-reply"}"#,
        1.0,
    );
    expect(
        r#"callgate_signaling_messages_received_total{type="ice-candidate"}"#,
        1.0,
    );
    expect(
        r#"callgate_signaling_messages_received_total{type="invalid"}"#,
        1.0,
    );
    expect(r#"callgate_signaling_messages_sent_total{type="id"}"#, 2.0);
    expect(
        r#"callgate_signaling_messages_sent_total{type="video-answer-request"}"#,
        1.0,
    );
    expect(
        r#"callgate_signaling_messages_sent_total{type="server-reply"}"#,
        1.0,
    );
    expect(
        r#"callgate_signaling_messages_sent_total{type="close-call-server"}"#,
        1.0,
    );
    expect(
        r#"callgate_signaling_errors_sent_total{code="invalid_json"}"#,
        1.0,
    );
    expect("callgate_calls_attempted_total", 1.0);
    expect(r#"callgate_calls_total{outcome="answered"}"#, 1.0);
    expect("callgate_calls_in_progress", 0.0);
    expect("callgate_call_setup_duration_seconds_count", 1.0);
    expect("callgate_call_duration_seconds_count", 1.0);
    expect(
        r#"callgate_http_requests_total{route="websocket",status="1xx"}"#,
        2.0,
    );
    expect(
        r#"callgate_http_requests_total{route="static",status="2xx"}"#,
        1.0,
    );
    assert!(sample(&text, r#"callgate_tls_handshakes_total{outcome="ok"}"#).unwrap() >= 3.0);
    assert!(sample(&text, "callgate_tls_handshake_duration_seconds_count").unwrap() >= 3.0);
    let expiry = sample(&text, "callgate_certificate_expiry_timestamp_seconds").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(expiry > now, "certificate expiry {expiry} is in the future");
    expect(r#"callgate_build_info{version="0.1.0"}"#, 1.0);
    assert!(sample(&text, "process_resident_memory_bytes").unwrap() > 0.0);

    // Closing a socket is counted with its reason.
    drop(b);
    a.send(r#"{"type":"ping"}"#).await;
    a.recv().await;
    let mut closed = None;
    for _ in 0..100 {
        let text = String::from_utf8(scrape(&server, Some(TOKEN)).await.body.to_vec()).unwrap();
        closed = sample(
            &text,
            r#"callgate_websocket_connections_closed_total{reason="client"}"#,
        )
        .filter(|v| *v >= 1.0);
        if closed.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(closed, Some(1.0));
    server.stop().await;
}

#[tokio::test]
async fn rate_limit_rejections_are_counted_by_limit() {
    let server = TestServer::start(|_, o| {
        o.metrics_token = Some(TOKEN.parse().unwrap());
        o.ws_messages_per_second = Some(1);
        o.ws_message_burst = Some(1);
    })
    .await;
    let (mut a, _) = Ws::join(&server).await;
    a.send(r#"{"type":"ping"}"#).await;
    a.send(r#"{"type":"ping"}"#).await;
    a.recv().await;
    assert_eq!(a.recv().await["code"], "rate_limited");
    let text = String::from_utf8(scrape(&server, Some(TOKEN)).await.body.to_vec()).unwrap();
    assert_eq!(
        sample(&text, r#"callgate_rate_limited_total{limit="ws_messages"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"callgate_signaling_errors_sent_total{code="rate_limited"}"#
        ),
        Some(1.0)
    );
    server.stop().await;
}

#[tokio::test]
async fn the_admin_token_is_enforced() {
    let server = metrics_server().await;
    assert_eq!(scrape(&server, None).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        scrape(&server, Some("wrong-token-0123456789")).await.status,
        StatusCode::UNAUTHORIZED
    );
    let ok = scrape(&server, Some(TOKEN)).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert!(ok.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    server.stop().await;
}

#[tokio::test]
async fn metrics_are_not_served_on_the_public_port() {
    let server = metrics_server().await;
    assert_eq!(
        https_get(&server, "/metrics").await.status,
        StatusCode::NOT_FOUND
    );
    server.stop().await;
}

#[tokio::test]
async fn certificate_reloads_are_counted_by_outcome() {
    let server = metrics_server().await;
    let mut status = server.certs.subscribe();
    write_new_cert(&server.cert_path, &server.key_path);
    // (A reload may catch the new key before the new certificate and fail once: count that too.)
    let after_reload =
        tokio::time::timeout(Duration::from_secs(10), status.wait_for(|s| s.reloads >= 1))
            .await
            .unwrap()
            .unwrap()
            .clone();
    std::fs::write(&server.key_path, "broken").unwrap();
    let expected = tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| s.failures > after_reload.failures),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    let want = (
        Some(expected.reloads as f64),
        Some(expected.failures as f64),
    );
    let mut seen = (None, None);
    for _ in 0..100 {
        let text = String::from_utf8(scrape(&server, Some(TOKEN)).await.body.to_vec()).unwrap();
        seen = (
            sample(&text, r#"callgate_certificate_reloads_total{outcome="ok"}"#),
            sample(
                &text,
                r#"callgate_certificate_reloads_total{outcome="failed"}"#,
            ),
        );
        if seen == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen, want);
    server.stop().await;
}

#[tokio::test]
async fn promtool_accepts_a_live_scrape() {
    if !require_tool("promtool", "prometheus") {
        return;
    }
    let server = metrics_server().await;
    let (_a, _) = Ws::join(&server).await;
    let text = scrape(&server, Some(TOKEN)).await.body;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&text).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    server.stop().await;
}
