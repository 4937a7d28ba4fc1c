//! The server's protections against abuse that are not about who the caller is: the same-origin
//! check on every state-changing request (CSRF) and the security headers of every response. The
//! rate-limit maps that stay bounded however many keys an attacker invents are the library's
//! ([`KeyedBudget`]). `docs/security.md` says what each one is and how to configure it.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use url::Url;

pub use revpilot_core::guard::KeyedBudget;

// ----- cross-site requests -----

/// Paths that other servers call with their own credentials (a Stripe signature, the cron's
/// bearer secret): no browser posts them, and no session cookie acts there.
const SERVER_TO_SERVER: &[&str] = &[
    "/api/webhooks/stripe-billing",
    "/api/webhooks/stripe-connect",
    "/api/stripe/sync",
];

/// Safe navigations that still act for the user: starting a Stripe connection.
const GUARDED_GETS: &[&str] = &["/api/stripe/connect"];

/// Whether a request comes from another site and must be refused.
///
/// Every request that can change something (any method but GET, HEAD, OPTIONS and TRACE, and
/// the GETs in `GUARDED_GETS`) must come from the app itself. Browsers say where a request
/// comes from: `Sec-Fetch-Site` (every current browser) must be `same-origin` (or `none`, a
/// user's own action); without it, `Origin` must be the app's origin (`REVPILOT_APP_URL`). A
/// request with neither header is not a browser's (browsers have sent `Origin` on every
/// cross-origin POST since 2020) and passes: scripts and API clients authenticate with a bearer
/// token, which no other site can attach. This is Go's `http.CrossOriginProtection` algorithm.
pub fn cross_origin(app_url: &Url, method: &Method, path: &str, headers: &HeaderMap) -> bool {
    let unsafe_method = !matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    );
    if !(unsafe_method || GUARDED_GETS.contains(&path)) || SERVER_TO_SERVER.contains(&path) {
        return false;
    }
    if let Some(site) = headers.get("sec-fetch-site") {
        return !matches!(site.as_bytes(), b"same-origin" | b"none");
    }
    match headers.get(header::ORIGIN) {
        None => false,
        Some(origin) => origin.as_bytes() != app_url.origin().ascii_serialization().as_bytes(),
    }
}

/// Middleware: refuses a cross-site request with 403 before any handler runs.
pub(crate) async fn same_origin(
    State(state): crate::Shared,
    request: Request,
    next: Next,
) -> Response {
    if cross_origin(
        &state.app_url,
        request.method(),
        request.uri().path(),
        request.headers(),
    ) {
        tracing::info!(
            path = request.uri().path(),
            origin = ?request.headers().get(header::ORIGIN),
            site = ?request.headers().get("sec-fetch-site"),
            "cross-site request refused"
        );
        metrics::counter!("revpilot_cross_origin_refused_total").increment(1);
        return crate::error(
            StatusCode::FORBIDDEN,
            "cross_origin",
            "this request did not come from the app's own pages",
        );
    }
    next.run(request).await
}

// ----- security headers -----

/// The pages' Content-Security-Policy: everything from the app itself (the pages carry inline
/// styles, no script), and no framing by any site.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; style-src 'self' 'unsafe-inline'; \
     img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

/// The headers every response carries (unless the handler set its own).
pub fn security_headers() -> [(header::HeaderName, HeaderValue); 4] {
    [
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        // Not `no-referrer`: with it, browsers send `Origin: null` on the app's own form posts.
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("same-origin"),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_apps_own_origin_may_post() {
        let app = Url::parse("https://app.example/").unwrap_or_else(|_| unreachable!());
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, HeaderValue::from_static(v));
            }
            m
        };
        let post = Method::POST;
        assert!(!cross_origin(&app, &post, "/login", &h(&[])), "no browser");
        assert!(!cross_origin(
            &app,
            &post,
            "/login",
            &h(&[("origin", "https://app.example")])
        ));
        assert!(cross_origin(
            &app,
            &post,
            "/login",
            &h(&[("origin", "https://evil.example")])
        ));
        assert!(cross_origin(
            &app,
            &post,
            "/login",
            &h(&[("origin", "null")])
        ));
        assert!(cross_origin(
            &app,
            &post,
            "/login",
            &h(&[("origin", "https://app.example:8443")])
        ));
        assert!(cross_origin(
            &app,
            &post,
            "/logout",
            &h(&[
                ("sec-fetch-site", "same-site"),
                ("origin", "https://app.example")
            ])
        ));
        assert!(!cross_origin(
            &app,
            &post,
            "/logout",
            &h(&[("sec-fetch-site", "same-origin")])
        ));
        assert!(!cross_origin(
            &app,
            &Method::GET,
            "/dashboard",
            &h(&[("sec-fetch-site", "cross-site")])
        ));
        assert!(cross_origin(
            &app,
            &Method::GET,
            "/api/stripe/connect",
            &h(&[("sec-fetch-site", "cross-site")])
        ));
        assert!(!cross_origin(
            &app,
            &post,
            "/api/webhooks/stripe-billing",
            &h(&[("origin", "https://evil.example")])
        ));
    }
}
