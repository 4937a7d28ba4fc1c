//! What the server's routes and pages read from query strings and forms: plain data with its
//! checks, and no HTTP. The server deserializes these with axum's `Query` and `Form` (that is,
//! `serde_urlencoded`) and then calls the checks here; they live in this crate so that the
//! `server_params` fuzz target runs exactly this code without building the whole server.

use std::net::IpAddr;

use chrono::{Duration, NaiveDate};
use serde::Deserialize;
use uuid::Uuid;

use crate::metrics::{Granularity, SeriesRequest};
use crate::ports::{ConnectionId, Tier};

/// The longest range `/api/metrics` serves, days.
pub const MAX_RANGE_DAYS: i64 = 3_660;

/// How many days before `to` a range without `from` starts (90 days, `to` included).
pub const DEFAULT_RANGE_DAYS: i64 = 89;

/// A parameter that cannot be served. Each is a 400 with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParamError {
    /// `from` is after `to`, or the range is longer than [`MAX_RANGE_DAYS`].
    #[error("from must not be after to, and the range at most {MAX_RANGE_DAYS} days")]
    Range,
    /// No `from` was given and `to` is too early for the default range to start before it.
    #[error(
        "to {0} is too early for the default range of {DEFAULT_RANGE_DAYS} days before it: give from"
    )]
    NoDefaultFrom(NaiveDate),
    /// A granularity other than `day` or `month`.
    #[error("granularity {0:?}: expected day or month")]
    Granularity(String),
}

/// `GET /api/metrics` query.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricsQuery {
    /// The connection.
    pub connection_id: String,
    /// First day (default: [`DEFAULT_RANGE_DAYS`] days before `to`).
    pub from: Option<NaiveDate>,
    /// Last day (default: today).
    pub to: Option<NaiveDate>,
    /// `day` (default) or `month`.
    pub granularity: Option<String>,
}

impl MetricsQuery {
    /// The series asked for, `to` defaulting to `today`.
    ///
    /// # Errors
    /// [`ParamError`]: an inverted or too long range, no room for the default `from`, an unknown
    /// granularity.
    pub fn request(&self, today: NaiveDate) -> Result<SeriesRequest, ParamError> {
        let to = self.to.unwrap_or(today);
        let from = match self.from {
            Some(from) => from,
            // Checked: `to` may be the earliest date there is.
            None => to
                .checked_sub_signed(Duration::days(DEFAULT_RANGE_DAYS))
                .ok_or(ParamError::NoDefaultFrom(to))?,
        };
        if from > to || (to - from).num_days() > MAX_RANGE_DAYS {
            return Err(ParamError::Range);
        }
        let granularity = granularity(self.granularity.as_deref())?;
        Ok(SeriesRequest::new(from, to, granularity))
    }
}

/// A series granularity as a query names it: `day` (also when absent) or `month`.
///
/// # Errors
/// [`ParamError::Granularity`] for anything else.
pub fn granularity(value: Option<&str>) -> Result<Granularity, ParamError> {
    match value {
        None | Some("day") => Ok(Granularity::Day),
        Some("month") => Ok(Granularity::Month),
        Some(other) => Err(ParamError::Granularity(other.to_owned())),
    }
}

/// A connection id as a query or form gives it (a UUID), or `None`: the routes answer 404 for
/// it, exactly as for a connection that does not exist.
pub fn connection_id(value: &str) -> Option<ConnectionId> {
    Uuid::parse_str(value).ok().map(ConnectionId)
}

/// `POST /api/insights` query.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InsightsQuery {
    /// The connection.
    pub connection_id: String,
}

/// `GET /dashboard` query.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DashboardQuery {
    /// The connection to show (default: the first active one).
    pub connection: Option<Uuid>,
    /// Set by Checkout's success URL.
    pub upgraded: Option<bool>,
}

/// `POST /insights` form.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct GenerateForm {
    /// The connection.
    pub connection: String,
}

/// `POST /pricing/checkout` form.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct UpgradeForm {
    /// The tier's name as [`Tier::as_str`] writes it.
    pub tier: String,
}

impl UpgradeForm {
    /// The tier named, if there is one.
    pub fn tier(&self) -> Option<Tier> {
        Tier::parse(&self.tier)
    }
}

/// The client's address: `peer` (the TCP peer's), unless the peer is one of the `trusted`
/// proxies: then the address the `X-Forwarded-For` values (`forwarded`, in header order) name,
/// read from the right past every trusted proxy (a client can put anything at the left of that
/// header, never at its right). With no trusted proxy the header is ignored; garbage in it
/// leaves the last trusted hop's view.
pub fn client_behind<'a>(
    peer: IpAddr,
    forwarded: impl IntoIterator<Item = &'a str>,
    trusted: &[IpAddr],
) -> IpAddr {
    if !trusted.contains(&peer) {
        return peer;
    }
    let hops: Vec<&str> = forwarded.into_iter().flat_map(|v| v.split(',')).collect();
    let mut client = peer;
    for hop in hops.into_iter().rev() {
        let Ok(ip) = hop.trim().parse::<IpAddr>() else {
            break;
        };
        client = ip;
        if !trusted.contains(&ip) {
            break;
        }
    }
    client
}

/// The rate-limit key of a client address: an IPv4 address (also when IPv4-mapped) as itself,
/// an IPv6 one by its /64, which one host usually holds whole.
pub fn client_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("ip:{v4}"),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("ip:{v4}"),
            None => {
                let s = v6.segments();
                format!("ip6:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

/// A comma-separated list of addresses (`REVPILOT_TRUSTED_PROXIES`), blanks dropped.
///
/// # Errors
/// The first entry that is not an address, with the parser's message.
pub fn address_list(csv: &str) -> Result<Vec<IpAddr>, String> {
    csv.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.parse().map_err(|e| format!("{p:?}: {e}")))
        .collect()
}

#[cfg(test)]
mod address_tests {
    use super::*;

    #[test]
    fn the_client_is_read_past_trusted_proxies_only() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("the tests' addresses are valid");
        let proxy = ip("10.0.0.1");
        let trusted = [proxy, ip("10.0.0.2")];
        // Not through a trusted proxy: the header is the client's to forge.
        assert_eq!(
            client_behind(ip("203.0.113.9"), ["1.2.3.4"], &trusted),
            ip("203.0.113.9")
        );
        // Through two trusted hops, a forged entry at the left is never read.
        let hops = ["6.6.6.6, 198.51.100.7", "10.0.0.2"];
        assert_eq!(client_behind(proxy, hops, &trusted), ip("198.51.100.7"));
        // Garbage: the last trusted hop's view.
        assert_eq!(client_behind(proxy, ["nonsense"], &trusted), proxy);
        assert_eq!(client_behind(proxy, [], &trusted), proxy);
        assert_eq!(client_key(ip("::ffff:192.0.2.1")), "ip:192.0.2.1");
        assert_eq!(client_key(ip("2001:db8:1:2:3::9")), "ip6:2001:db8:1:2::/64");
        assert_eq!(address_list(" 10.0.0.1, ,::1"), Ok(vec![proxy, ip("::1")]));
        assert!(address_list("10.0.0.1,proxy").is_err_and(|e| e.contains("proxy")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(s: &str) -> NaiveDate {
        s.parse().expect("the tests' dates are valid")
    }

    fn query(from: Option<&str>, to: Option<&str>, granularity: Option<&str>) -> MetricsQuery {
        MetricsQuery {
            connection_id: String::new(),
            from: from.map(day),
            to: to.map(day),
            granularity: granularity.map(str::to_owned),
        }
    }

    #[test]
    fn the_default_range_is_ninety_days_to_today() {
        let r = query(None, None, None).request(day("2026-12-06"));
        assert_eq!(
            r,
            Ok(SeriesRequest::new(
                day("2026-09-08"),
                day("2026-12-06"),
                Granularity::Day
            ))
        );
        let r = query(Some("2026-01-01"), Some("2026-01-31"), Some("month"));
        assert_eq!(
            r.request(day("2026-12-06")).map(|r| r.granularity),
            Ok(Granularity::Month)
        );
    }

    #[test]
    fn bad_ranges_and_granularities_are_named() {
        let today = day("2026-12-06");
        let inverted = query(Some("2026-02-01"), Some("2026-01-01"), None);
        assert_eq!(inverted.request(today), Err(ParamError::Range));
        let long = query(Some("2000-01-01"), Some("2026-01-01"), None);
        assert_eq!(long.request(today), Err(ParamError::Range));
        let week = query(None, None, Some("week"));
        assert_eq!(
            week.request(today),
            Err(ParamError::Granularity("week".into()))
        );
    }

    #[test]
    fn the_earliest_to_has_no_default_from_and_does_not_panic() {
        // `to - 89 days` was evaluated eagerly and overflowed for the earliest dates chrono has.
        let earliest = query(None, Some("-262143-03-01"), None);
        assert_eq!(
            earliest.request(day("2026-12-06")),
            Err(ParamError::NoDefaultFrom(day("-262143-03-01")))
        );
        let with_from = query(Some("-262143-01-01"), Some("-262143-03-01"), None);
        assert!(with_from.request(day("2026-12-06")).is_ok());
    }
}
