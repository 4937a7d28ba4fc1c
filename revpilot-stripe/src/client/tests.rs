//! The retry, rate-limit and idempotency rules against wiremock (and a socket that hangs up, for
//! the dropped connections wiremock cannot make).

use std::time::Instant;

use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use super::*;

fn config(base: &str) -> ClientConfig {
    let mut c = ClientConfig::new(SecretString::from("sk_test_x"))
        .with_api_base(base)
        .unwrap();
    c.min_delay = Duration::from_millis(5);
    c.max_delay = Duration::from_millis(20);
    c.requests_per_second = NonZeroU32::new(1000).unwrap();
    c
}

fn ok_list() -> ResponseTemplate {
    ResponseTemplate::new(200)
        .set_body_string(r#"{"object":"list","data":[{"id":"cus_1"}],"has_more":false}"#)
}

fn stripe_error(status: u16) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_string(format!(
        r#"{{"error":{{"message":"status {status}","type":"api_error"}}}}"#
    ))
}

async fn server_with(first: ResponseTemplate, times: u64) -> MockServer {
    let server = MockServer::start().await;
    if times == 0 {
        Mock::given(path("/v1/customers"))
            .respond_with(ok_list())
            .mount(&server)
            .await;
        return server;
    }
    Mock::given(path("/v1/customers"))
        .respond_with(first)
        .up_to_n_times(times)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(path("/v1/customers"))
        .respond_with(ok_list())
        .with_priority(2)
        .mount(&server)
        .await;
    server
}

#[tokio::test]
async fn a_429_storm_is_retried_until_it_passes() {
    let server = server_with(stripe_error(429), 4).await;
    let client = Client::new(config(&server.uri())).unwrap();
    let page = client.list_page("/v1/customers", &[], None).await.unwrap();
    assert_eq!(page.data.len(), 1);
    assert_eq!(client.counters(), (5, 4));
}

#[tokio::test]
async fn retryable_statuses_are_retried_and_others_are_not() {
    for (status, retried) in [
        (409, true),
        (500, true),
        (503, true),
        (400, false),
        (404, false),
        (402, false),
    ] {
        let server = server_with(stripe_error(status), 1).await;
        let client = Client::new(config(&server.uri())).unwrap();
        let got = client.get("/v1/customers", &[]).await;
        assert_eq!(got.is_ok(), retried, "status {status}: {got:?}");
        assert_eq!(client.counters().1, u64::from(retried), "status {status}");
    }
}

#[tokio::test]
async fn stripe_should_retry_overrides_the_status() {
    let server = server_with(
        stripe_error(500).insert_header("Stripe-Should-Retry", "false"),
        1,
    )
    .await;
    let client = Client::new(config(&server.uri())).unwrap();
    let err = client.get("/v1/customers", &[]).await.unwrap_err();
    assert!(
        matches!(err, ApiError::Rejected { status: 500, .. }),
        "{err}"
    );
    assert_eq!(client.counters(), (1, 0));

    let server = server_with(
        stripe_error(400).insert_header("Stripe-Should-Retry", "true"),
        1,
    )
    .await;
    let client = Client::new(config(&server.uri())).unwrap();
    client.get("/v1/customers", &[]).await.unwrap();
    assert_eq!(client.counters(), (2, 1));
}

#[tokio::test]
async fn attempts_are_bounded() {
    let server = MockServer::start().await;
    Mock::given(path("/v1/customers"))
        .respond_with(stripe_error(503))
        .mount(&server)
        .await;
    let mut cfg = config(&server.uri());
    cfg.max_attempts = 4;
    let client = Client::new(cfg).unwrap();
    let err = client.get("/v1/customers", &[]).await.unwrap_err();
    assert!(matches!(err, ApiError::GaveUp { attempts: 4, .. }), "{err}");
    assert_eq!(server.received_requests().await.unwrap().len(), 4);
}

#[tokio::test]
async fn a_revoked_token_is_unauthorized_at_once() {
    let server = server_with(stripe_error(401), 10).await;
    let client = Client::new(config(&server.uri())).unwrap();
    let err = client.get("/v1/customers", &[]).await.unwrap_err();
    assert!(matches!(err, ApiError::Unauthorized { .. }), "{err}");
    assert_eq!(client.counters(), (1, 0));
}

#[tokio::test]
async fn a_post_keeps_its_idempotency_key_across_retries() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(stripe_error(500))
        .up_to_n_times(2)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_string("{}"))
        .with_priority(2)
        .mount(&server)
        .await;
    let client = Client::new(config(&server.uri())).unwrap();
    let key = idempotency_key();
    client
        .post(
            "/v1/checkout/sessions",
            &[("mode", "subscription".into())],
            &key,
        )
        .await
        .unwrap();
    let seen: Vec<Request> = server.received_requests().await.unwrap();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|r| {
        r.headers
            .get("Idempotency-Key")
            .and_then(|v| v.to_str().ok())
            == Some(key.as_str())
    }));
    assert!(seen.iter().all(
        |r| r.headers.get("Authorization").and_then(|v| v.to_str().ok())
            == Some("Bearer sk_test_x")
    ));
}

#[tokio::test]
async fn the_connected_account_header_is_sent() {
    let server = server_with(ok_list(), 1).await;
    let mut cfg = config(&server.uri());
    cfg.account = Some("acct_123".into());
    Client::new(cfg)
        .unwrap()
        .get("/v1/customers", &[])
        .await
        .unwrap();
    let seen = server.received_requests().await.unwrap();
    assert_eq!(seen[0].headers.get("Stripe-Account").unwrap(), "acct_123");
}

/// Hangs up on the first `drops` connections, then answers one list.
async fn dropping_server(drops: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut n = 0;
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            n += 1;
            let mut buf = [0u8; 4096];
            let _ = sock.read(&mut buf).await;
            if n <= drops {
                // Half an answer, then the connection goes.
                let _ = sock
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 500\r\n\r\n{\"data\":[")
                    .await;
                drop(sock);
                continue;
            }
            let body = r#"{"object":"list","data":[],"has_more":false}"#;
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn dropped_connections_are_retried() {
    let base = dropping_server(2).await;
    let client = Client::new(config(&base)).unwrap();
    let page = client.list_page("/v1/customers", &[], None).await.unwrap();
    assert!(page.data.is_empty());
    assert_eq!(client.counters(), (3, 2));
}

#[tokio::test]
async fn the_token_bucket_spaces_requests() {
    let server = server_with(ok_list(), 0).await;
    let mut cfg = config(&server.uri());
    cfg.requests_per_second = NonZeroU32::new(10).unwrap();
    let client = Client::new(cfg).unwrap();
    let start = Instant::now();
    for _ in 0..25 {
        client.get("/v1/customers", &[]).await.unwrap();
    }
    // A burst of 10, then 15 more at 10/s: at least 1.4 s whatever the machine's speed.
    assert!(
        start.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn a_bad_api_base_keeps_the_parsers_error() {
    let err = ClientConfig::new(SecretString::from("sk_test_x"))
        .with_api_base("not a url")
        .unwrap_err();
    assert!(matches!(err, ApiError::Url { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "client configuration: api base \"not a url\": relative URL without a base"
    );
    let source = std::error::Error::source(&err).expect("the parser's error is the source");
    assert_eq!(
        source.downcast_ref::<url::ParseError>(),
        Some(&url::ParseError::RelativeUrlWithoutBase)
    );
    // Not http(s) is RevPilot's own rule: there is no underlying error.
    let err = ClientConfig::new(SecretString::from("sk_test_x"))
        .with_api_base("ftp://example.com")
        .unwrap_err();
    assert!(matches!(err, ApiError::Config(_)), "{err:?}");
    assert!(std::error::Error::source(&err).is_none());
}

#[test]
fn live_keys_are_told_from_test_keys() {
    let live = |key: &str| ClientConfig::new(SecretString::from(key.to_owned())).is_live();
    assert!(live("sk_live_abc") && live("rk_live_abc"));
    assert!(!live("sk_test_abc") && !live("rk_test_abc") && !live("live"));
}
