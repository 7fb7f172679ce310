//! Request parsing that never panics and never answers in plain text: the
//! body (size-limited, JSON), the key, the query string. Every rejection is
//! an [`ApiError`] with a stable code.

use crate::error::ApiError;
use axum::body::Body;
use geolog_core::{ConsistencyLevel, ErrorCode, Key};
use http::HeaderMap;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Deserialize;
use serde_json::value::RawValue;

/// Reads the whole body, refusing more than `limit` bytes with 413.
pub async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<bytes::Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("request body exceeds the limit of {limit} bytes"),
        )
    };
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(err) => Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("cannot read request body: {err}"),
        )),
    }
}

/// Undoes the body's `Content-Encoding` (none, `gzip` or `zstd`), refusing
/// more than `limit` decompressed bytes with 413 and other encodings with
/// 415. Runs on a blocking thread: decompression is CPU work.
pub async fn decode_body(
    headers: &HeaderMap,
    bytes: bytes::Bytes,
    limit: usize,
) -> Result<bytes::Bytes, ApiError> {
    let encoding = match headers.get(http::header::CONTENT_ENCODING) {
        None => return Ok(bytes),
        Some(value) => value
            .to_str()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase(),
    };
    let decode = move || -> Result<bytes::Bytes, ApiError> {
        match encoding.as_str() {
            "identity" | "" => Ok(bytes),
            "gzip" | "x-gzip" => read_limited(flate2::read::GzDecoder::new(&bytes[..]), limit),
            "zstd" => {
                let decoder = ruzstd::decoding::StreamingDecoder::new(&bytes[..])
                    .map_err(|e| undecodable(&format!("{e}")))?;
                read_limited(decoder, limit)
            }
            other => Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                format!("Content-Encoding {other:?} is not supported; use gzip or zstd"),
            )),
        }
    };
    tokio::task::spawn_blocking(decode)
        .await
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("decompression failed: {e}")))?
}

fn undecodable(reason: &str) -> ApiError {
    ApiError::new(
        ErrorCode::InvalidRequest,
        format!("cannot decompress the request body: {reason}"),
    )
}

/// Reads all of `reader`, but at most `limit` bytes (a compressed body may
/// expand a thousandfold).
fn read_limited(reader: impl std::io::Read, limit: usize) -> Result<bytes::Bytes, ApiError> {
    use std::io::Read;
    let mut out = Vec::new();
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| undecodable(&e.to_string()))?;
    if out.len() > limit {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("decompressed request body exceeds the limit of {limit} bytes"),
        ));
    }
    Ok(out.into())
}

/// True when the body is NDJSON (one record per line) rather than a JSON array.
pub fn is_ndjson(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .is_some_and(|v| {
            matches!(
                v.as_str(),
                "application/x-ndjson" | "application/ndjson" | "application/jsonl"
            )
        })
}

/// Splits a batch body into its records, each parsed and validated on its
/// own: a bad record fails alone. The body as a whole must be a JSON array
/// (or NDJSON) of 1 to `max_records` records.
pub fn parse_batch(
    bytes: &[u8],
    ndjson: bool,
    max_records: usize,
) -> Result<Vec<Result<WriteBody, ApiError>>, ApiError> {
    let records: Vec<Result<WriteBody, ApiError>> = if ndjson {
        bytes
            .split(|b| *b == b'\n')
            .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
            .map(parse_write)
            .collect()
    } else {
        let items: Vec<&RawValue> = serde_json::from_slice(bytes).map_err(|e| {
            ApiError::new(
                ErrorCode::InvalidJson,
                format!(
                    "a batch is a JSON array of records (or NDJSON with Content-Type: application/x-ndjson): {e}"
                ),
            )
        })?;
        items
            .into_iter()
            .map(|item| parse_write(item.get().as_bytes()))
            .collect()
    };
    if records.is_empty() {
        return Err(ApiError::new(
            ErrorCode::InvalidJson,
            "the batch has no records",
        ));
    }
    if records.len() > max_records {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "the batch has {} records; at most {max_records} per batch",
                records.len()
            ),
        ));
    }
    Ok(records)
}

/// The body of `POST /api/logs`, checked.
#[derive(Debug)]
pub struct WriteBody {
    pub key: Key,
    /// Any JSON value, kept verbatim.
    pub value: Box<RawValue>,
    /// Context token from a read: the write supersedes what it saw.
    pub context: Option<String>,
    /// Idempotency key (same as the `Idempotency-Key` header).
    pub id: Option<String>,
}

/// [`WriteBody`] as sent: the key is checked after parsing, so that a bad
/// one is `invalid_key`, not `invalid_json`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SentWriteBody {
    key: String,
    value: Box<RawValue>,
    #[serde(default)]
    context: Option<String>,
    #[serde(default)]
    id: Option<String>,
}

/// A value a client may send as a body field or as a header: either, or
/// both when they agree. Errors carry `code`.
pub fn body_or_header(
    field_value: Option<String>,
    headers: &HeaderMap,
    header: &str,
    field: &str,
    code: ErrorCode,
) -> Result<Option<String>, ApiError> {
    let header_value = match headers.get(header) {
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| ApiError::new(code, format!("header {header} is not visible ASCII")))?
                .to_string(),
        ),
        None => None,
    };
    match (field_value, header_value) {
        (Some(a), Some(b)) if a != b => Err(ApiError::new(
            code,
            format!("body field {field:?} and header {header} differ"),
        )),
        (a, b) => Ok(a.or(b)),
    }
}

/// Longest idempotency key accepted, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;

/// Checks an idempotency key: 1 to 255 visible ASCII characters.
pub fn validate_idempotency_key(id: &str) -> Result<(), ApiError> {
    if id.is_empty()
        || id.len() > MAX_IDEMPOTENCY_KEY_BYTES
        || !id.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!(
                "idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} visible ASCII characters"
            ),
        ));
    }
    Ok(())
}

/// Parses and validates a write body.
pub fn parse_write(bytes: &[u8]) -> Result<WriteBody, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::new(
            ErrorCode::InvalidJson,
            "request body is empty; expected {\"key\": ..., \"value\": ...}",
        ));
    }
    let body: SentWriteBody = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::new(ErrorCode::InvalidJson, format!("invalid JSON body: {e}")))?;
    Ok(WriteBody {
        key: Key::new(body.key)?,
        value: body.value,
        context: body.context,
        id: body.id,
    })
}

/// Query parameters accepted by the log routes.
#[derive(Debug, Default)]
pub struct LogQuery {
    /// `None` means the coordinator's default level.
    pub consistency: Option<ConsistencyLevel>,
    /// History page size.
    pub limit: Option<u32>,
    /// History cursors (tokens from an earlier page).
    pub before: Option<HistoryCursor>,
    pub after: Option<HistoryCursor>,
}

/// Parameters of the plain log routes.
pub const LOG_PARAMS: &[&str] = &["consistency"];
/// Parameters of the history route.
pub const HISTORY_PARAMS: &[&str] = &["consistency", "limit", "before", "after"];

/// Largest history page.
pub const MAX_HISTORY_LIMIT: u32 = 1_000;

/// Parses a raw query string; parameters outside `accepted` are rejected,
/// so a typo such as `consistancy=ALL` cannot silently fall back to the
/// default level.
pub fn parse_query(raw: Option<&str>, accepted: &[&str]) -> Result<LogQuery, ApiError> {
    let mut query = LogQuery::default();
    let Some(raw) = raw else { return Ok(query) };
    let pairs: Vec<(String, String)> = serde_urlencoded_pairs(raw)?;
    for (name, value) in pairs {
        if !accepted.contains(&name.as_str()) {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "unknown query parameter {name:?}; accepted: {}",
                    accepted.join(", ")
                ),
            ));
        }
        match name.as_str() {
            "consistency" => query.consistency = Some(value.parse()?),
            "limit" => {
                let limit = value
                    .parse::<u32>()
                    .ok()
                    .filter(|l| (1..=MAX_HISTORY_LIMIT).contains(l));
                query.limit = Some(limit.ok_or_else(|| {
                    ApiError::new(
                        ErrorCode::InvalidRequest,
                        format!("limit must be 1 to {MAX_HISTORY_LIMIT}"),
                    )
                })?);
            }
            "before" => query.before = Some(HistoryCursor::from_token(&value)?),
            "after" => query.after = Some(HistoryCursor::from_token(&value)?),
            _ => unreachable!("accepted names are handled above"),
        }
    }
    Ok(query)
}

/// A position in a key's history, as an opaque token in URLs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct HistoryCursor {
    pub hlc: u64,
    pub node: String,
    pub seq: u64,
}

impl HistoryCursor {
    pub fn to_token(&self) -> String {
        use base64::Engine;
        let json =
            serde_json::to_vec(&(self.hlc, &self.node, self.seq)).expect("a tuple serializes");
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    }

    pub fn from_token(token: &str) -> Result<Self, ApiError> {
        use base64::Engine;
        let bad = || {
            ApiError::new(
                ErrorCode::InvalidRequest,
                "invalid history cursor; pass back a `next` token",
            )
        };
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.trim())
            .map_err(|_| bad())?;
        let (hlc, node, seq): (u64, String, u64) =
            serde_json::from_slice(&bytes).map_err(|_| bad())?;
        Ok(HistoryCursor { hlc, node, seq })
    }
}

/// `a=b&c=d` with percent-decoding and `+` as space.
fn serde_urlencoded_pairs(raw: &str) -> Result<Vec<(String, String)>, ApiError> {
    raw.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((percent_decode(k)?, percent_decode(v)?))
        })
        .collect()
}

fn percent_decode(s: &str) -> Result<String, ApiError> {
    let bad = || {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!("malformed query string near {s:?}"),
        )
    };
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or_else(bad)?;
                let hex = std::str::from_utf8(hex).map_err(|_| bad())?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_rules() {
        let q = |raw: &str| parse_query(Some(raw), LOG_PARAMS);
        assert_eq!(
            q("consistency=all").unwrap().consistency,
            Some(ConsistencyLevel::All)
        );
        assert_eq!(
            q("consistency=LOCAL%5FONE").unwrap().consistency,
            Some(ConsistencyLevel::LocalOne)
        );
        assert!(parse_query(None, LOG_PARAMS).unwrap().consistency.is_none());
        assert_eq!(
            q("consistency=MOST").unwrap_err().0.code,
            ErrorCode::InvalidConsistency
        );
        assert_eq!(
            q("consistancy=ALL").unwrap_err().0.code,
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            q("consistency=%zz").unwrap_err().0.code,
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            q("limit=5").unwrap_err().0.code,
            ErrorCode::InvalidRequest,
            "limit is history-only"
        );
        let h = |raw: &str| parse_query(Some(raw), HISTORY_PARAMS);
        assert_eq!(h("limit=5").unwrap().limit, Some(5));
        assert!(h("limit=0").is_err() && h("limit=1001").is_err() && h("limit=x").is_err());
        let cursor = HistoryCursor {
            hlc: 7,
            node: "a1".into(),
            seq: 3,
        };
        assert_eq!(
            h(&format!("before={}", cursor.to_token())).unwrap().before,
            Some(cursor)
        );
        assert!(h("before=garbage").is_err());
    }

    #[test]
    fn body_rules() {
        assert!(parse_write(br#"{"key":"k","value":{"a":[1,2]}}"#).is_ok());
        assert!(parse_write(br#"{"key":"k","value":null}"#).is_ok());
        for bad in [
            &b""[..],
            b"{",
            b"[]",
            br#"{"key":"k"}"#,
            br#"{"value":1}"#,
            br#"{"key":1,"value":1}"#,
            br#"{"key":"k","value":1,"x":2}"#,
        ] {
            assert_eq!(
                parse_write(bad).unwrap_err().0.code,
                ErrorCode::InvalidJson,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            parse_write(br#"{"key":"","value":1}"#).unwrap_err().0.code,
            ErrorCode::InvalidKey
        );
        assert_eq!(
            parse_write(br#"{"key":"a\u0000b","value":1}"#)
                .unwrap_err()
                .0
                .code,
            ErrorCode::InvalidKey
        );
    }
}
