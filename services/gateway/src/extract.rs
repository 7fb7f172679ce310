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

/// Undoes the body's `Content-Encoding` (none, `identity`, `gzip` or
/// `zstd`), refusing more than `limit` decompressed bytes with 413, other
/// or several encodings with 415, and a body that is not wholly in its
/// encoding with 400. A gzip body may hold several members and a zstd body
/// several frames (what `cat a.gz b.gz` makes): all are decoded, in order.
/// Runs on a blocking thread: decompression is CPU work.
pub async fn decode_body(
    headers: &HeaderMap,
    bytes: bytes::Bytes,
    limit: usize,
) -> Result<bytes::Bytes, ApiError> {
    let unsupported = |why: String| ApiError::new(ErrorCode::UnsupportedMediaType, why);
    let mut values = headers.get_all(http::header::CONTENT_ENCODING).iter();
    let encoding = match (values.next(), values.next()) {
        (None, _) => return Ok(bytes),
        (Some(_), Some(_)) => {
            return Err(unsupported(
                "Content-Encoding given more than once; send one of gzip or zstd".into(),
            ));
        }
        (Some(value), None) => value
            .to_str()
            .map_err(|_| unsupported("Content-Encoding is not ASCII; use gzip or zstd".into()))?
            .trim()
            .to_ascii_lowercase(),
    };
    let decode = move || -> Result<bytes::Bytes, ApiError> {
        match encoding.as_str() {
            "identity" | "" => Ok(bytes),
            "gzip" | "x-gzip" => read_limited(flate2::read::MultiGzDecoder::new(&bytes[..]), limit),
            "zstd" => decode_zstd(&bytes, limit),
            other => Err(unsupported(format!(
                "Content-Encoding {other:?} is not supported; use gzip or zstd (one encoding)"
            ))),
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

fn decompressed_too_large(limit: usize) -> ApiError {
    ApiError::new(
        ErrorCode::PayloadTooLarge,
        format!("decompressed request body exceeds the limit of {limit} bytes"),
    )
}

/// Reads all of `reader`, but at most `limit` bytes (a compressed body may
/// expand a thousandfold).
fn read_limited(reader: impl std::io::Read, limit: usize) -> Result<bytes::Bytes, ApiError> {
    let mut out = Vec::new();
    read_into(reader, &mut out, limit)?;
    Ok(out.into())
}

/// Appends all of `reader` to `out`, refusing to let `out` grow past `limit`.
fn read_into(reader: impl std::io::Read, out: &mut Vec<u8>, limit: usize) -> Result<(), ApiError> {
    use std::io::Read;
    let room = (limit + 1).saturating_sub(out.len()) as u64;
    reader
        .take(room)
        .read_to_end(out)
        .map_err(|e| undecodable(&e.to_string()))?;
    if out.len() > limit {
        return Err(decompressed_too_large(limit));
    }
    Ok(())
}

/// Every frame of a zstd body, skippable frames skipped. ruzstd's
/// `StreamingDecoder` reads one frame: it is made again for each.
fn decode_zstd(bytes: &[u8], limit: usize) -> Result<bytes::Bytes, ApiError> {
    use ruzstd::decoding::StreamingDecoder;
    use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
    let mut source = bytes;
    let mut out = Vec::new();
    let mut frames = 0;
    while !source.is_empty() {
        match StreamingDecoder::new(&mut source) {
            Ok(decoder) => {
                read_into(decoder, &mut out, limit)?;
                frames += 1;
            }
            Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                length,
                ..
            })) => {
                let length = length as usize;
                if source.len() < length {
                    return Err(undecodable("a skippable zstd frame is cut short"));
                }
                source = &source[length..];
            }
            Err(e) => return Err(undecodable(&e.to_string())),
        }
    }
    if frames == 0 {
        return Err(undecodable("no zstd frame"));
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
/// own: a bad record fails alone, and so does one larger than
/// `max_record_bytes` (what a single write may be). The body as a whole
/// must be a JSON array (or NDJSON) of 1 to `max_records` records; the
/// count is checked while splitting, before any record is parsed.
pub fn parse_batch(
    bytes: &[u8],
    ndjson: bool,
    max_records: usize,
    max_record_bytes: usize,
) -> Result<Vec<Result<WriteBody, ApiError>>, ApiError> {
    let too_many = || {
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "the batch has more than {max_records} records; at most {max_records} per batch"
            ),
        )
    };
    let records: Vec<&[u8]> = if ndjson {
        let mut lines = Vec::new();
        for line in bytes
            .split(|b| *b == b'\n')
            .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
        {
            if lines.len() == max_records {
                return Err(too_many());
            }
            lines.push(line);
        }
        lines
    } else {
        let overflowed = std::cell::Cell::new(false);
        let mut items = serde_json::Deserializer::from_slice(bytes);
        let parsed = serde::de::DeserializeSeed::deserialize(
            BoundedArray {
                max: max_records,
                overflowed: &overflowed,
            },
            &mut items,
        )
        .and_then(|records| items.end().map(|()| records));
        match parsed {
            Ok(records) => records,
            Err(_) if overflowed.get() => return Err(too_many()),
            Err(e) => {
                return Err(ApiError::new(
                    ErrorCode::InvalidJson,
                    format!(
                        "a batch is a JSON array of records (or NDJSON with Content-Type: application/x-ndjson): {e}"
                    ),
                ));
            }
        }
    };
    if records.is_empty() {
        return Err(ApiError::new(
            ErrorCode::InvalidJson,
            "the batch has no records",
        ));
    }
    Ok(records
        .into_iter()
        .map(|record| {
            if record.len() > max_record_bytes {
                return Err(ApiError::new(
                    ErrorCode::PayloadTooLarge,
                    format!(
                        "the record has {} bytes; a record may have at most {max_record_bytes} (as a single write)",
                        record.len()
                    ),
                ));
            }
            parse_write(record)
        })
        .collect())
}

/// A JSON array's items as raw text, refused past `max` items (flagged in
/// `overflowed`, so that the caller tells it from bad syntax).
struct BoundedArray<'f> {
    max: usize,
    overflowed: &'f std::cell::Cell<bool>,
}

impl<'de> serde::de::DeserializeSeed<'de> for BoundedArray<'_> {
    type Value = Vec<&'de [u8]>;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for BoundedArray<'_> {
    type Value = Vec<&'de [u8]>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array of records")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut records = Vec::new();
        while let Some(record) = seq.next_element::<&'de RawValue>()? {
            if records.len() == self.max {
                self.overflowed.set(true);
                return Err(serde::de::Error::custom("too many records"));
            }
            records.push(record.get().as_bytes());
        }
        Ok(records)
    }
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
    let mut values = headers.get_all(header).iter();
    if let (Some(_), Some(_)) = (values.next(), values.next()) {
        return Err(ApiError::new(
            code,
            format!("header {header} is given more than once"),
        ));
    }
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
    // serde_json skips a raw value without a depth limit.
    let depth = geolog_core::json::nesting_depth(body.value.get().as_bytes());
    if depth > geolog_core::json::MAX_VALUE_DEPTH {
        return Err(ApiError::new(
            ErrorCode::InvalidJson,
            format!(
                "the value nests {depth} arrays or objects deep; at most {} are accepted",
                geolog_core::json::MAX_VALUE_DEPTH
            ),
        ));
    }
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
    for (i, (name, value)) in pairs.iter().enumerate() {
        if !accepted.contains(&name.as_str()) {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                if accepted.is_empty() {
                    format!("unknown query parameter {name:?}; this route takes none")
                } else {
                    format!(
                        "unknown query parameter {name:?}; accepted: {}",
                        accepted.join(", ")
                    )
                },
            ));
        }
        // Not "the last one wins": `consistency=ONE&consistency=ALL` is
        // a mistake whichever level was meant.
        if pairs[..i].iter().any(|(earlier, _)| earlier == name) {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!("query parameter {name:?} is given more than once"),
            ));
        }
        let value = value.clone();
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

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    fn zstd(bytes: &[u8]) -> Vec<u8> {
        ruzstd::encoding::compress_to_vec(bytes, ruzstd::encoding::CompressionLevel::Fastest)
    }

    fn decode(encoding: &str, body: Vec<u8>, limit: usize) -> Result<bytes::Bytes, ErrorCode> {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_ENCODING,
            http::HeaderValue::from_bytes(encoding.as_bytes()).unwrap(),
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime
            .block_on(decode_body(&headers, body.into(), limit))
            .map_err(|e| e.0.code)
    }

    #[test]
    fn every_member_and_frame_is_decoded_and_nothing_else_is_taken() {
        let (a, b) = (b"first\n".as_slice(), b"second\n".as_slice());
        let both = [gzip(a), gzip(b)].concat();
        assert_eq!(
            decode("gzip", both.clone(), 1 << 20).unwrap(),
            b"first\nsecond\n".as_slice()
        );
        let both = [zstd(a), zstd(b)].concat();
        assert_eq!(
            decode("zstd", both.clone(), 1 << 20).unwrap(),
            b"first\nsecond\n".as_slice()
        );
        // A skippable zstd frame (magic 0x184D2A50, 4-byte length) is skipped.
        let skippable = [
            &0x184D_2A50u32.to_le_bytes()[..],
            &3u32.to_le_bytes(),
            b"xyz",
        ]
        .concat();
        let with_skip = [zstd(a), skippable, zstd(b)].concat();
        assert_eq!(
            decode("zstd", with_skip, 1 << 20).unwrap(),
            b"first\nsecond\n".as_slice()
        );

        for (encoding, mut body) in [("gzip", gzip(a)), ("zstd", zstd(a))] {
            body.extend_from_slice(b"trailing garbage");
            assert_eq!(
                decode(encoding, body, 1 << 20),
                Err(ErrorCode::InvalidRequest),
                "{encoding}"
            );
        }
        assert_eq!(
            decode("zstd", Vec::new(), 1 << 20),
            Err(ErrorCode::InvalidRequest)
        );
        // The limit counts every member together.
        let big = [gzip(&[b'x'; 600]), gzip(&[b'y'; 600])].concat();
        assert_eq!(decode("gzip", big, 1000), Err(ErrorCode::PayloadTooLarge));
        let big = [zstd(&[b'x'; 600]), zstd(&[b'y'; 600])].concat();
        assert_eq!(decode("zstd", big, 1000), Err(ErrorCode::PayloadTooLarge));
    }

    #[test]
    fn batch_bounds_hold_while_splitting_and_per_record() {
        let record = |i: usize| format!(r#"{{"key":"k{i}","value":{i}}}"#);
        let array = |n: usize| format!("[{}]", (0..n).map(record).collect::<Vec<_>>().join(","));
        let lines = |n: usize| (0..n).map(record).collect::<Vec<_>>().join("\n");
        assert_eq!(
            parse_batch(array(3).as_bytes(), false, 3, 1000)
                .unwrap()
                .len(),
            3
        );
        assert_eq!(
            parse_batch(lines(3).as_bytes(), true, 3, 1000)
                .unwrap()
                .len(),
            3
        );
        for (body, ndjson) in [(array(4), false), (lines(4), true)] {
            let err = parse_batch(body.as_bytes(), ndjson, 3, 1000).unwrap_err().0;
            assert_eq!(err.code, ErrorCode::PayloadTooLarge, "{body}");
        }
        // A million records past the bound are not all split first.
        let many = lines(1_000_000);
        let err = parse_batch(many.as_bytes(), true, 10, 1000).unwrap_err().0;
        assert_eq!(err.code, ErrorCode::PayloadTooLarge);
        for bad in ["[", "[1,", "{}", "[] x", "[]"] {
            let err = parse_batch(bad.as_bytes(), false, 3, 1000).unwrap_err().0;
            assert_eq!(err.code, ErrorCode::InvalidJson, "{bad}");
        }
        // A record larger than a single write fails alone.
        let big = format!(
            r#"[{},{{"key":"big","value":"{}"}}]"#,
            record(0),
            "x".repeat(100)
        );
        let parsed = parse_batch(big.as_bytes(), false, 3, 50).unwrap();
        assert!(parsed[0].is_ok());
        assert_eq!(
            parsed[1].as_ref().unwrap_err().0.code,
            ErrorCode::PayloadTooLarge
        );
    }

    #[test]
    fn unknown_non_ascii_and_repeated_encodings_are_refused() {
        for encoding in ["br", "gzip, zstd", "gz\u{e9}"] {
            assert_eq!(
                decode(encoding, gzip(b"x"), 1 << 20),
                Err(ErrorCode::UnsupportedMediaType),
                "{encoding:?}"
            );
        }
        let mut headers = HeaderMap::new();
        headers.append(http::header::CONTENT_ENCODING, "gzip".parse().unwrap());
        headers.append(http::header::CONTENT_ENCODING, "gzip".parse().unwrap());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let twice = runtime.block_on(decode_body(&headers, gzip(b"x").into(), 1 << 20));
        assert_eq!(twice.unwrap_err().0.code, ErrorCode::UnsupportedMediaType);
        assert_eq!(
            decode("identity", b"x".to_vec(), 1 << 20).unwrap(),
            b"x".as_slice()
        );
    }

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
            q("consistency=ONE&consistency=ALL").unwrap_err().0.code,
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            parse_query(Some("foo=1"), &[]).unwrap_err().0.code,
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
        let nested = |depth: usize| {
            format!(
                r#"{{"key":"k","value":{}"[{{" {}}}"#,
                "[".repeat(depth),
                "]".repeat(depth)
            )
        };
        assert!(parse_write(nested(128).as_bytes()).is_ok());
        for depth in [129, 100_000] {
            let err = parse_write(nested(depth).as_bytes()).unwrap_err().0;
            assert_eq!(err.code, ErrorCode::InvalidJson, "{depth}");
            assert!(err.message.contains("at most 128"), "{}", err.message);
        }
    }
}
