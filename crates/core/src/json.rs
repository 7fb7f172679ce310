//! `JsonText`: a JSON value's text as it travels between services — UTF-8
//! checked once, where it enters a process from the network, then shared:
//! cloning it bumps a reference count instead of copying the value.

use crate::error::{ErrorCode, GeologError};
use bytes::Bytes;
use std::fmt;

/// Deepest nesting of arrays and objects a value may have where it enters
/// geolog (serde_json's own limit for typed values; many clients' parsers
/// cannot read much deeper values back).
pub const MAX_VALUE_DEPTH: usize = 128;

/// The deepest nesting of arrays and objects in JSON text `bytes` (assumed
/// well-formed), counted without recursion and without parsing: brackets
/// inside strings do not count.
pub fn nesting_depth(bytes: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in bytes {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// UTF-8 text of a JSON value. Its syntax is checked where it enters
/// geolog (the gateway) and by every storage node that stores it
/// ([`JsonText::check_syntax`]): PostgreSQL keeps it as plain text.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct JsonText(Bytes);

impl JsonText {
    /// Takes `bytes` received from the network: refused unless UTF-8.
    pub fn from_wire(bytes: Bytes) -> Result<JsonText, GeologError> {
        match std::str::from_utf8(&bytes) {
            Ok(_) => Ok(JsonText(bytes)),
            Err(e) => Err(GeologError::new(
                ErrorCode::InvalidRequest,
                format!("value is not UTF-8: {e}"),
            )),
        }
    }

    /// Refused unless the text is one JSON value (nesting limited as the
    /// gateway's parser limits it).
    pub fn check_syntax(&self) -> Result<(), String> {
        serde_json::from_slice::<serde::de::IgnoredAny>(&self.0)
            .map(|_| ())
            .map_err(|e| format!("the value is not valid JSON: {e}"))
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("JsonText holds UTF-8 from construction")
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The bytes for the wire (shared, not copied).
    pub fn to_bytes(&self) -> Bytes {
        self.0.clone()
    }

    /// A copy in an allocation of its own, for holders that outlive the
    /// message it came in (a slice would keep the whole message alive).
    pub fn detached(&self) -> JsonText {
        JsonText(Bytes::copy_from_slice(&self.0))
    }
}

impl From<String> for JsonText {
    fn from(text: String) -> JsonText {
        JsonText(Bytes::from(text))
    }
}

impl From<&str> for JsonText {
    fn from(text: &str) -> JsonText {
        JsonText(Bytes::copy_from_slice(text.as_bytes()))
    }
}

impl std::ops::Deref for JsonText {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for JsonText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for JsonText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_is_checked_once_at_the_wire() {
        let text = JsonText::from_wire(Bytes::from_static(b"{\"a\":\"\xc3\xa9\"}")).unwrap();
        assert_eq!(text.as_str(), "{\"a\":\"é\"}");
        let err = JsonText::from_wire(Bytes::from_static(b"\"\xff\"")).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidRequest);
    }

    #[test]
    fn detached_copies_only_the_value() {
        let message = Bytes::from_static(b"xx{\"v\":1}yy");
        let text = JsonText::from_wire(message.slice(2..9)).unwrap();
        let own = text.detached();
        assert_eq!(own, text);
        assert_eq!(&*own, "{\"v\":1}");
    }

    #[test]
    fn depth_counts_brackets_outside_strings_only() {
        assert_eq!(nesting_depth(b"1"), 0);
        assert_eq!(nesting_depth(br#"{"a": [1, {"b": []}]}"#), 4);
        assert_eq!(nesting_depth(br#"["[[[[", "\"[[", {}]"#), 2);
        assert_eq!(nesting_depth(br#""\\" "#), 0);
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(nesting_depth(deep.as_bytes()), 100_000);
    }
}
