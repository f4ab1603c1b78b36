//! Signaling over real TLS WebSockets: the seed's protocol, the hardening, resume, limits.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const OFFER: &str = r#"{"type":"offer","sdp":"v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"}"#;
const ANSWER: &str =
    r#"{"type":"answer","sdp":"v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"}"#;

fn id_of(hello: &Value) -> u64 {
    hello["id"].as_u64().expect("numeric id")
}

/// A calls B and B accepts; both are then in a call.
async fn call(a: &mut Ws, a_id: u64, b: &mut Ws, b_id: u64) {
    a.send(&format!(
        r#"{{"type":"video-offer-request","id":{a_id},"calleeId":{b_id},"offer":{OFFER}}}"#
    ))
    .await;
    let incoming = b.recv().await;
    assert_eq!(incoming["type"], "video-answer-request");
    b.send(&format!(
        r#"{{"type":"client-reply","reply":"1","id":{b_id},"callerId":{a_id},"answer":{ANSWER}}}"#
    ))
    .await;
    let reply = a.recv().await;
    assert_eq!(reply["type"], "server-reply");
}

/// Proves nothing else was queued for `ws`: an app-level ping is answered by the very next frame.
async fn assert_nothing_pending(ws: &mut Ws) {
    ws.send(r#"{"type":"ping"}"#).await;
    let next = ws.recv().await;
    assert_eq!(next["type"], "pong", "unexpected message: {next}");
}

#[tokio::test]
async fn the_seed_clients_sequence_works_field_for_field() {
    let server = TestServer::start(|_, _| {}).await;
    let (mut a, hello_a) = Ws::join(&server).await;
    // The seed client used the root path.
    let mut b = Ws::open(&server, "/", None).await.unwrap();
    let hello_b = b.recv().await;
    let (a_id, b_id) = (id_of(&hello_a), id_of(&hello_b));
    for id in [a_id, b_id] {
        assert!(
            (100_000_000..1_000_000_000).contains(&id),
            "9-digit id: {id}"
        );
    }
    assert_ne!(a_id, b_id);
    assert!(
        hello_a["token"].is_string(),
        "resume token in the id message"
    );

    a.send(&format!(
        r#"{{"type":"video-offer-request","id":{a_id},"calleeId":{b_id},"offer":{OFFER}}}"#
    ))
    .await;
    let Event::Text(raw) = b.next().await else {
        panic!()
    };
    assert_eq!(
        raw,
        format!(r#"{{"type":"video-answer-request","callerId":{a_id},"offer":{OFFER}}}"#),
        "offer relayed byte for byte"
    );

    b.send(&format!(
        r#"{{"type":"client-reply","reply":"1","id":{b_id},"callerId":{a_id},"answer":{ANSWER}}}"#
    ))
    .await;
    let reply = a.recv().await;
    assert_eq!(reply["type"], "server-reply");
    assert_eq!(reply["reply"], "1");
    assert_eq!(reply["calleeId"], b_id);
    assert_eq!(
        reply["answer"],
        serde_json::from_str::<Value>(ANSWER).unwrap()
    );

    a.send(&format!(
        r#"{{"type":"normal","id":{a_id},"message":"hello"}}"#
    ))
    .await;
    a.send(&format!(
        r#"{{"type":"close-call-client","id":{a_id},"clientId":{b_id}}}"#
    ))
    .await;
    let closed = b.recv().await;
    assert_eq!(closed["type"], "close-call-server");
    assert_eq!(closed["clientId"], a_id);
    assert_nothing_pending(&mut a).await;
    server.stop().await;
}

#[tokio::test]
async fn a_declined_call_tells_the_caller() {
    let server = TestServer::start(|_, _| {}).await;
    let (mut a, ha) = Ws::join(&server).await;
    let (mut b, hb) = Ws::join(&server).await;
    let (a_id, b_id) = (id_of(&ha), id_of(&hb));
    a.send(&format!(
        r#"{{"type":"video-offer-request","id":{a_id},"calleeId":{b_id},"offer":{OFFER}}}"#
    ))
    .await;
    b.recv().await;
    b.send(&format!(
        r#"{{"type":"client-reply","reply":"0","id":{b_id},"callerId":{a_id},"answer":null}}"#
    ))
    .await;
    let reply = a.recv().await;
    assert_eq!(
        (reply["type"].as_str(), reply["reply"].as_str()),
        (Some("server-reply"), Some("0"))
    );
    // Both are idle again: B can now call A.
    call(&mut b, b_id, &mut a, a_id).await;
    server.stop().await;
}

#[tokio::test]
async fn identity_comes_from_the_connection() {
    let server = TestServer::start(|_, _| {}).await;
    let (mut a, ha) = Ws::join(&server).await;
    let (mut b, hb) = Ws::join(&server).await;
    let (mut c, hc) = Ws::join(&server).await;
    let (a_id, b_id, c_id) = (id_of(&ha), id_of(&hb), id_of(&hc));
    call(&mut a, a_id, &mut b, b_id).await;
    // C pretends to be A and hangs up A's call.
    c.send(&format!(
        r#"{{"type":"close-call-client","id":{a_id},"clientId":{b_id}}}"#
    ))
    .await;
    let error = c.recv().await;
    assert_eq!(
        (error["type"].as_str(), error["code"].as_str()),
        (Some("error"), Some("id_mismatch"))
    );
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert_nothing_pending(&mut b).await;
    // Without the id field, C is still C: not in a call with B.
    c.send(&format!(
        r#"{{"type":"close-call-client","clientId":{b_id}}}"#
    ))
    .await;
    assert_eq!(c.recv().await["code"], "not_in_call");
    // And C cannot send candidates into A and B's call.
    c.send(&format!(r#"{{"type":"ice-candidate","id":{c_id},"clientId":{b_id},"candidate":{{"candidate":"x"}}}}"#)).await;
    assert_eq!(c.recv().await["code"], "not_in_call");
    assert_nothing_pending(&mut b).await;
    server.stop().await;
}

#[tokio::test]
async fn unknown_callee_busy_and_cancel() {
    let server = TestServer::start(|_, _| {}).await;
    let (mut a, ha) = Ws::join(&server).await;
    let (mut b, hb) = Ws::join(&server).await;
    let (mut c, hc) = Ws::join(&server).await;
    let (a_id, b_id, c_id) = (id_of(&ha), id_of(&hb), id_of(&hc));

    a.send(&format!(
        r#"{{"type":"video-offer-request","id":{a_id},"calleeId":123,"offer":{OFFER}}}"#
    ))
    .await;
    let error = a.recv().await;
    assert_eq!(error["code"], "unknown_client", "{error}");

    call(&mut a, a_id, &mut b, b_id).await;
    c.send(&format!(
        r#"{{"type":"video-offer-request","id":{c_id},"calleeId":{b_id},"offer":{OFFER}}}"#
    ))
    .await;
    let busy = c.recv().await;
    assert_eq!(busy["type"], "busy");
    assert_nothing_pending(&mut b).await;
    // A and B's call is untouched: candidates still flow.
    a.send(&format!(
        r#"{{"type":"ice-candidate","clientId":{b_id},"candidate":{{"candidate":"cand-1"}}}}"#
    ))
    .await;
    let candidate = b.recv().await;
    assert_eq!(
        (candidate["type"].as_str(), candidate["clientId"].as_u64()),
        (Some("ice-candidate"), Some(a_id))
    );
    assert_eq!(candidate["candidate"]["candidate"], "cand-1");

    // C calls A's... no: C calls a fresh D and cancels before the answer.
    let (mut d, hd) = Ws::join(&server).await;
    let d_id = id_of(&hd);
    c.send(&format!(
        r#"{{"type":"video-offer-request","calleeId":{d_id},"offer":{OFFER}}}"#
    ))
    .await;
    assert_eq!(d.recv().await["type"], "video-answer-request");
    d.send(&format!(r#"{{"type":"ringing","clientId":{c_id}}}"#))
        .await;
    assert_eq!(c.recv().await["type"], "ringing");
    c.send(&format!(r#"{{"type":"cancel","clientId":{d_id}}}"#))
        .await;
    let cancelled = d.recv().await;
    assert_eq!(
        (cancelled["type"].as_str(), cancelled["reason"].as_str()),
        (Some("close-call-server"), Some("cancelled"))
    );
    server.stop().await;
}

#[tokio::test]
async fn renegotiation_inside_a_call() {
    let server = TestServer::start(|_, _| {}).await;
    let (mut a, ha) = Ws::join(&server).await;
    let (mut b, hb) = Ws::join(&server).await;
    let (a_id, b_id) = (id_of(&ha), id_of(&hb));
    call(&mut a, a_id, &mut b, b_id).await;
    b.send(&format!(
        r#"{{"type":"offer","clientId":{a_id},"offer":{OFFER}}}"#
    ))
    .await;
    let offer = a.recv().await;
    assert_eq!(
        (offer["type"].as_str(), offer["clientId"].as_u64()),
        (Some("offer"), Some(b_id))
    );
    a.send(&format!(
        r#"{{"type":"answer","clientId":{b_id},"answer":{ANSWER}}}"#
    ))
    .await;
    assert_eq!(b.recv().await["type"], "answer");
    server.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_the_connection_stays() {
    let server = TestServer::start(|_, _| {}).await;
    let (mut a, _) = Ws::join(&server).await;
    let cases = [
        ("{not json", "invalid_json"),
        (r#"{"type":"teleport"}"#, "unknown_type"),
        (
            r#"{"type":"video-offer-request","offer":{}}"#,
            "missing_field",
        ),
        (
            r#"{"type":"video-offer-request","calleeId":"abc","offer":{}}"#,
            "invalid_field",
        ),
        (
            &format!(
                r#"{{"type":"normal","message":{}{}}}"#,
                "[".repeat(100),
                "]".repeat(100)
            ),
            "too_deep",
        ),
    ];
    for (input, code) in cases {
        a.send(input).await;
        let error = a.recv().await;
        assert_eq!(
            (error["type"].as_str(), error["code"].as_str()),
            (Some("error"), Some(code)),
            "for {input}"
        );
    }
    a.ws.write_frame(fastwebsockets::Frame::binary(
        fastwebsockets::Payload::Borrowed(b"\x00\x01"),
    ))
    .await
    .unwrap();
    assert_eq!(a.recv().await["code"], "binary_not_supported");
    assert_nothing_pending(&mut a).await;
    server.stop().await;
}

#[tokio::test]
async fn oversized_messages_are_refused_with_1009_whole_or_fragmented() {
    let server = TestServer::start(|_, _| {}).await;
    let (mut a, _) = Ws::join(&server).await;
    let big = format!(
        r#"{{"type":"normal","message":"{}"}}"#,
        "x".repeat(70 * 1024)
    );
    a.send(&big).await;
    assert_eq!(a.recv().await["code"], "message_too_large");
    assert_eq!(a.expect_close().await, Some(1009));

    // Fragments of 30 KiB each: fine one by one, too large together.
    let (mut b, _) = Ws::join(&server).await;
    let chunk = vec![b'x'; 30 * 1024];
    let mut first = fastwebsockets::Frame::text(fastwebsockets::Payload::Borrowed(&chunk));
    first.fin = false;
    b.ws.write_frame(first).await.unwrap();
    for _ in 0..2 {
        let mut more = fastwebsockets::Frame::new(
            false,
            fastwebsockets::OpCode::Continuation,
            None,
            fastwebsockets::Payload::Borrowed(&chunk),
        );
        more.fin = false;
        if b.ws.write_frame(more).await.is_err() {
            break;
        }
    }
    assert_eq!(b.recv().await["code"], "message_too_large");
    assert_eq!(b.expect_close().await, Some(1009));

    // Others are unaffected.
    let (mut c, _) = Ws::join(&server).await;
    assert_nothing_pending(&mut c).await;
    server.stop().await;
}

#[tokio::test]
async fn a_fragmented_message_within_the_limit_is_assembled() {
    let server = TestServer::start(|_, _| {}).await;
    let (mut a, _) = Ws::join(&server).await;
    let text = br#"{"type":"ping"}"#;
    let (head, tail) = text.split_at(5);
    let mut first = fastwebsockets::Frame::text(fastwebsockets::Payload::Borrowed(head));
    first.fin = false;
    a.ws.write_frame(first).await.unwrap();
    a.ws.write_frame(fastwebsockets::Frame::new(
        true,
        fastwebsockets::OpCode::Continuation,
        None,
        fastwebsockets::Payload::Borrowed(tail),
    ))
    .await
    .unwrap();
    assert_eq!(a.recv().await["type"], "pong");
    server.stop().await;
}

#[tokio::test]
async fn a_text_message_that_is_not_utf8_closes_with_1007_whole_or_fragmented() {
    let server = TestServer::start(|_, _| {}).await;
    let (mut a, _) = Ws::join(&server).await;
    // Each fragment is checked only when the message is whole: a character may span fragments,
    // so the first half of "é" (0xC3) is fine on its own; 0xFF can never be UTF-8.
    let mut first = fastwebsockets::Frame::text(fastwebsockets::Payload::Borrowed(
        b"{\"type\":\"normal\",\"message\":\"\xC3",
    ));
    first.fin = false;
    a.ws.write_frame(first).await.unwrap();
    a.ws.write_frame(fastwebsockets::Frame::new(
        true,
        fastwebsockets::OpCode::Continuation,
        None,
        fastwebsockets::Payload::Borrowed(b"\xFF\"}"),
    ))
    .await
    .unwrap();
    assert_eq!(a.expect_close().await, Some(1007));

    let (mut b, _) = Ws::join(&server).await;
    b.ws.write_frame(fastwebsockets::Frame::text(
        fastwebsockets::Payload::Borrowed(b"{\"type\":\"normal\",\"message\":\"\xFF\"}"),
    ))
    .await
    .unwrap();
    assert_eq!(b.expect_close().await, Some(1007));

    // Others are unaffected.
    let (mut c, _) = Ws::join(&server).await;
    assert_nothing_pending(&mut c).await;
    server.stop().await;
}

#[tokio::test]
async fn frames_that_break_the_websocket_rules_close_with_1002() {
    use fastwebsockets::{Frame, OpCode, Payload};
    let server = TestServer::start(|_, _| {}).await;
    // A client must mask its frames (RFC 6455 §5.1).
    let (mut a, _) = Ws::join(&server).await;
    a.ws.set_auto_apply_mask(false);
    a.send(r#"{"type":"ping"}"#).await;
    assert_eq!(a.expect_close().await, Some(1002));
    // A continuation with no message to continue.
    let (mut b, _) = Ws::join(&server).await;
    b.ws.write_frame(Frame::new(
        true,
        OpCode::Continuation,
        None,
        Payload::Borrowed(b"x"),
    ))
    .await
    .unwrap();
    assert_eq!(b.expect_close().await, Some(1002));
    // A close code reserved for local use (1005: "no code") may not be sent.
    let (mut c, _) = Ws::join(&server).await;
    c.ws.write_frame(Frame::close_raw(Payload::Borrowed(&1005u16.to_be_bytes())))
        .await
        .unwrap();
    assert_eq!(c.expect_close().await, Some(1002));
    // Others are unaffected.
    let (mut d, _) = Ws::join(&server).await;
    assert_nothing_pending(&mut d).await;
    server.stop().await;
}

#[tokio::test]
async fn pings_are_answered_and_a_client_close_is_echoed() {
    use fastwebsockets::{Frame, OpCode, Payload};
    let server = TestServer::start(|_, _| {}).await;
    let (mut a, _) = Ws::join(&server).await;
    a.ws.write_frame(Frame::new(
        true,
        OpCode::Ping,
        None,
        Payload::Borrowed(b"still there?"),
    ))
    .await
    .unwrap();
    assert!(matches!(a.next().await, Event::Other(op) if op == "Pong"));
    a.ws.write_frame(Frame::close(1000, b"bye")).await.unwrap();
    assert_eq!(a.expect_close().await, Some(1000));
    server.stop().await;
}

#[tokio::test]
async fn resume_within_the_grace_period_keeps_the_id_the_call_and_queued_messages() {
    let server = TestServer::start(|_, _| {}).await;
    let (mut a, ha) = Ws::join(&server).await;
    let (mut b, hb) = Ws::join(&server).await;
    let (a_id, b_id) = (id_of(&ha), id_of(&hb));
    call(&mut a, a_id, &mut b, b_id).await;

    // A's network drops: no close frame.
    drop(a);
    // B keeps sending into the call while A is away; the last one is certainly after the drop.
    for n in 0..3 {
        b.send(&format!(
            r#"{{"type":"ice-candidate","clientId":{a_id},"candidate":{{"n":{n}}}}}"#
        ))
        .await;
    }
    assert_nothing_pending(&mut b).await;

    let mut again = Ws::open(&server, "/socket", None).await.unwrap();
    let fresh = again.recv().await;
    assert_ne!(id_of(&fresh), a_id);
    again
        .send_json(json!({"type":"resume","id":a_id,"token":ha["token"]}))
        .await;
    let resumed = again.recv().await;
    assert_eq!(
        (resumed["type"].as_str(), id_of(&resumed)),
        (Some("id"), a_id)
    );
    assert_eq!(resumed["resumed"], true);
    assert_ne!(
        resumed["token"], ha["token"],
        "a new token for the next resume"
    );
    for n in 0..3 {
        let candidate = again.recv().await;
        assert_eq!(candidate["candidate"]["n"], n, "queued messages in order");
    }
    // The call continues.
    again
        .send(&format!(
            r#"{{"type":"ice-candidate","clientId":{b_id},"candidate":{{"after":"resume"}}}}"#
        ))
        .await;
    assert_eq!(b.recv().await["candidate"]["after"], "resume");
    server.stop().await;
}

#[tokio::test]
async fn a_wrong_token_cannot_take_an_id() {
    let server = TestServer::start(|_, _| {}).await;
    let (a, ha) = Ws::join(&server).await;
    let a_id = id_of(&ha);
    drop(a);
    let (mut thief, _) = Ws::join(&server).await;
    thief
        .send_json(json!({"type":"resume","id":a_id,"token":"AAAAAAAAAAAAAAAAAAAAAA"}))
        .await;
    assert_eq!(thief.recv().await["code"], "resume_failed");
    // The owner still can.
    let (mut owner, _) = Ws::join(&server).await;
    owner
        .send_json(json!({"type":"resume","id":a_id,"token":ha["token"]}))
        .await;
    assert_eq!(id_of(&owner.recv().await), a_id);
    server.stop().await;
}

#[tokio::test]
async fn after_the_grace_period_the_peer_is_told_and_the_id_is_gone() {
    let server = TestServer::start(|_, o| {
        o.resume_grace = Some(callgate::config::Seconds(Duration::from_millis(300)))
    })
    .await;
    let (mut a, ha) = Ws::join(&server).await;
    let (mut b, hb) = Ws::join(&server).await;
    let (a_id, b_id) = (id_of(&ha), id_of(&hb));
    call(&mut a, a_id, &mut b, b_id).await;
    drop(a);
    let gone = b.recv().await;
    assert_eq!(
        (
            gone["type"].as_str(),
            gone["clientId"].as_u64(),
            gone["reason"].as_str()
        ),
        (Some("close-call-server"), Some(a_id), Some("peer_gone"))
    );
    let (mut late, _) = Ws::join(&server).await;
    late.send_json(json!({"type":"resume","id":a_id,"token":ha["token"]}))
        .await;
    assert_eq!(late.recv().await["code"], "resume_failed");
    server.stop().await;
}

#[tokio::test]
async fn a_dead_peer_is_reaped_by_the_heartbeat() {
    let server = TestServer::start(|_, o| {
        o.ws_heartbeat_interval = Some(callgate::config::Seconds(Duration::from_millis(100)));
    })
    .await;
    let (mut dead, _) = Ws::join(&server).await;
    dead.ws.set_auto_pong(false);
    let (mut alive, _) = Ws::join(&server).await;
    // `alive` keeps reading (so its client answers pings) while `dead` goes silent.
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let keep_alive = tokio::spawn(async move {
        let mut rounds = 0;
        loop {
            assert_nothing_pending(&mut alive).await;
            rounds += 1;
            if stopped.try_recv().is_ok() {
                return rounds;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    // The silent client is closed; the answering one is not.
    assert_eq!(dead.expect_close().await, Some(1001));
    // Let `alive` live through several more heartbeat intervals.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.send(()).unwrap();
    assert!(keep_alive.await.unwrap() > 5);
    server.stop().await;
}

#[tokio::test]
async fn shutdown_closes_websockets_with_1001() {
    let server = TestServer::start(|_, _| {}).await;
    let (mut a, _) = Ws::join(&server).await;
    let stop = tokio::spawn(server.stop());
    assert_eq!(a.expect_close().await, Some(1001));
    stop.await.unwrap();
}

#[tokio::test]
async fn cross_site_origins_are_refused_before_the_upgrade() {
    let server =
        TestServer::start(|_, o| o.allowed_origins = Some(vec!["https://app.example.com".into()]))
            .await;
    let port = server.addrs.https.port();
    let refused = Ws::open(&server, "/socket", Some("https://evil.example"))
        .await
        .err()
        .unwrap();
    assert_eq!(refused.0, Some(403));
    assert_eq!(
        Ws::open(&server, "/socket", Some("null"))
            .await
            .err()
            .unwrap()
            .0,
        Some(403)
    );
    assert_eq!(
        Ws::open(
            &server,
            "/socket",
            Some(&format!("http://localhost:{port}"))
        )
        .await
        .err()
        .unwrap()
        .0,
        Some(403)
    );
    Ws::open(
        &server,
        "/socket",
        Some(&format!("https://localhost:{port}")),
    )
    .await
    .expect("same origin allowed");
    Ws::open(&server, "/socket", Some("https://app.example.com"))
        .await
        .expect("configured origin allowed");
    server.stop().await;
}

#[tokio::test]
async fn message_rate_limit() {
    let server = TestServer::start(|_, o| {
        o.ws_messages_per_second = Some(1);
        o.ws_message_burst = Some(3);
    })
    .await;
    let (mut a, _) = Ws::join(&server).await;
    for _ in 0..5 {
        a.send(r#"{"type":"ping"}"#).await;
    }
    let mut codes = Vec::new();
    for _ in 0..5 {
        let m = a.recv().await;
        codes.push(
            m["code"]
                .as_str()
                .unwrap_or(m["type"].as_str().unwrap())
                .to_owned(),
        );
    }
    assert_eq!(
        codes.iter().filter(|c| *c == "pong").count(),
        3,
        "{codes:?}"
    );
    assert_eq!(
        codes.iter().filter(|c| *c == "rate_limited").count(),
        2,
        "{codes:?}"
    );
    // Another client is unaffected.
    let (mut b, _) = Ws::join(&server).await;
    assert_nothing_pending(&mut b).await;
    server.stop().await;
}

#[tokio::test]
async fn persistent_flooding_gets_the_connection_closed_with_1008() {
    let server = TestServer::start(|_, o| {
        o.ws_messages_per_second = Some(1);
        o.ws_message_burst = Some(1);
    })
    .await;
    let (mut a, _) = Ws::join(&server).await;
    let flood = async {
        for _ in 0..200 {
            if a.ws
                .write_frame(fastwebsockets::Frame::text(
                    fastwebsockets::Payload::Borrowed(br#"{"type":"ping"}"#),
                ))
                .await
                .is_err()
            {
                break;
            }
        }
    };
    flood.await;
    assert_eq!(a.expect_close().await, Some(1008));
    server.stop().await;
}

#[tokio::test]
async fn a_ping_flood_counts_against_the_message_rate() {
    let server = TestServer::start(|_, o| {
        o.ws_messages_per_second = Some(1);
        o.ws_message_burst = Some(1);
    })
    .await;
    let (mut a, _) = Ws::join(&server).await;
    for _ in 0..200 {
        let ping = fastwebsockets::Frame::new(
            true,
            fastwebsockets::OpCode::Ping,
            None,
            fastwebsockets::Payload::Borrowed(b"flood"),
        );
        if a.ws.write_frame(ping).await.is_err() {
            break;
        }
    }
    let mut rate_limited = 0;
    let code = loop {
        match a.next().await {
            Event::Text(text) if text.contains(r#""code":"rate_limited""#) => rate_limited += 1,
            Event::Close(code, _) => break code,
            Event::Ended(e) => panic!("no close frame: {e}"),
            _ => {}
        }
    };
    assert_eq!(code, Some(1008));
    assert!(rate_limited > 0, "the flood was told before the close");
    // Others are unaffected.
    let (mut b, _) = Ws::join(&server).await;
    assert_nothing_pending(&mut b).await;
    server.stop().await;
}

#[tokio::test]
async fn new_call_rate_limit() {
    let server = TestServer::start(|_, o| o.ws_calls_per_minute = Some(2)).await;
    let (mut a, _) = Ws::join(&server).await;
    for _ in 0..2 {
        a.send(&format!(
            r#"{{"type":"video-offer-request","calleeId":111111111,"offer":{OFFER}}}"#
        ))
        .await;
        assert_eq!(a.recv().await["code"], "unknown_client");
    }
    a.send(&format!(
        r#"{{"type":"video-offer-request","calleeId":111111112,"offer":{OFFER}}}"#
    ))
    .await;
    assert_eq!(a.recv().await["code"], "too_many_calls");
    server.stop().await;
}

#[tokio::test]
async fn per_address_upgrade_rate_and_connection_cap() {
    let server = TestServer::start(|_, o| {
        o.ws_upgrades_per_second = Some(3);
        o.ws_connections_per_ip = Some(100);
    })
    .await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(Ws::join(&server).await);
    }
    let refused = Ws::open(&server, "/socket", None)
        .await
        .err()
        .expect("fourth upgrade in a second refused");
    assert_eq!(refused.0, Some(429));
    server.stop().await;

    let server = TestServer::start(|_, o| {
        o.ws_upgrades_per_second = Some(100);
        o.ws_connections_per_ip = Some(2);
    })
    .await;
    let (_a, _) = Ws::join(&server).await;
    let (_b, _) = Ws::join(&server).await;
    let mut third = Ws::open(&server, "/socket", None).await.unwrap();
    assert_eq!(third.recv().await["code"], "too_many_connections");
    assert_eq!(third.expect_close().await, Some(1008));
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_without_stalling_others() {
    let server = TestServer::start(|_, o| {
        o.ws_outbox_frames = Some(65);
        o.ws_write_timeout = Some(callgate::config::Seconds(Duration::from_secs(1)));
        o.ws_messages_per_second = Some(10_000);
        o.ws_message_burst = Some(10_000);
    })
    .await;
    let (mut slow, hs) = Ws::join(&server).await;
    let (mut sender, hsender) = Ws::join(&server).await;
    let (slow_id, sender_id) = (id_of(&hs), id_of(&hsender));
    call(&mut sender, sender_id, &mut slow, slow_id).await;
    let (mut c, hc) = Ws::join(&server).await;
    let (mut d, hd) = Ws::join(&server).await;
    call(&mut c, id_of(&hc), &mut d, id_of(&hd)).await;

    // `slow` never reads again; the sender pushes 60 KB candidates at it.
    let blob = "y".repeat(60 * 1024);
    let flood = tokio::spawn(async move {
        for _ in 0..400 {
            let text =
                format!(r#"{{"type":"ice-candidate","clientId":{slow_id},"candidate":"{blob}"}}"#);
            // The sender does not read either, so the server may end it too once its own queue
            // of replies fills up; that is fine here.
            if sender
                .ws
                .write_frame(fastwebsockets::Frame::text(fastwebsockets::Payload::Owned(
                    text.into_bytes(),
                )))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    // Meanwhile another call keeps working.
    for n in 0..20 {
        c.send(&format!(
            r#"{{"type":"ice-candidate","clientId":{},"candidate":{n}}}"#,
            id_of(&hd)
        ))
        .await;
        assert_eq!(d.recv().await["candidate"], n);
    }
    flood.await.unwrap();
    // The slow client's connection was ended by the server.
    let mut saw_end = false;
    for _ in 0..2000 {
        match slow.next().await {
            Event::Text(_) => continue,
            _ => {
                saw_end = true;
                break;
            }
        }
    }
    assert!(saw_end, "the slow client was disconnected");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_place_calls_concurrently() {
    let server = TestServer::start(|_, o| {
        o.ws_upgrades_per_second = Some(10_000);
        o.ws_connections_per_ip = Some(10_000);
    })
    .await;
    let server = std::sync::Arc::new(server);
    let mut pairs = Vec::new();
    for _ in 0..500 {
        let server = server.clone();
        pairs.push(tokio::spawn(async move {
            let (mut a, ha) = Ws::join(&server).await;
            let (mut b, hb) = Ws::join(&server).await;
            call(&mut a, id_of(&ha), &mut b, id_of(&hb)).await;
            a.send(&format!(
                r#"{{"type":"close-call-client","clientId":{}}}"#,
                id_of(&hb)
            ))
            .await;
            assert_eq!(b.recv().await["type"], "close-call-server");
            (id_of(&ha), id_of(&hb))
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for pair in pairs {
        let (a, b) = pair.await.unwrap();
        assert!(ids.insert(a) && ids.insert(b), "IDs are unique");
    }
    assert_eq!(ids.len(), 1000);
    std::sync::Arc::into_inner(server).unwrap().stop().await;
}

/// Four pairs on one node, each caller sending 50 `ice-candidate`s interleaved with the others'
/// (no read in between): every callee gets all 50, in order. The one-node twin of
/// `cluster_calls::four_senders_of_fifty_across_nodes_deliver_every_message_in_order`; both
/// stalled at about 32 per callee while the test client did not flush its sends.
#[tokio::test]
async fn four_senders_of_fifty_on_one_node_deliver_every_message_in_order() {
    let server = TestServer::start(|_, _| {}).await;
    let mut pairs = Vec::new();
    for _ in 0..4 {
        let (mut a, ha) = Ws::join(&server).await;
        let (mut b, hb) = Ws::join(&server).await;
        call(&mut a, id_of(&ha), &mut b, id_of(&hb)).await;
        pairs.push((a, b, id_of(&hb)));
    }
    // Below one connection's burst (60): nothing here may be rate limited.
    const M: u64 = 50;
    for n in 0..M {
        for (a, _, b_id) in &mut pairs {
            a.send(&format!(
                r#"{{"type":"ice-candidate","clientId":{b_id},"candidate":{{"n":{n}}}}}"#
            ))
            .await;
        }
    }
    let mut counts = Vec::new();
    for (_, b, _) in &mut pairs {
        let mut numbers = Vec::new();
        while numbers.len() < M as usize {
            match tokio::time::timeout(Duration::from_secs(5), b.next()).await {
                Ok(Event::Text(text)) => {
                    let message: Value = serde_json::from_str(&text).unwrap();
                    assert_eq!(message["type"], "ice-candidate", "{message}");
                    numbers.push(message["candidate"]["n"].as_u64().unwrap());
                }
                Ok(other) => panic!("{other:?} after {numbers:?}"),
                Err(_) => break,
            }
        }
        assert_eq!(numbers, (0..numbers.len() as u64).collect::<Vec<_>>());
        counts.push(numbers.len());
    }
    assert_eq!(counts, [M as usize; 4], "each callee's count of {M}");
    for (a, _, _) in &mut pairs {
        assert_nothing_pending(a).await;
    }
}
