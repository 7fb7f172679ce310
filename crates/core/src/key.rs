//! Rules for log keys: UTF-8 (guaranteed by `&str`), 1 to 512 bytes, and no
//! NUL character (PostgreSQL text cannot store it). A process checks a key
//! once, where it enters (a request, a message from another service), by
//! making a [`Key`]; the code behind that boundary takes `Key`s and never
//! checks again.

use crate::error::{ErrorCode, GeologError};
use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;

/// A log key that follows the rules: holding one proves it was checked.
/// Shown (`Display`, `Debug`) as the string it is.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct Key(String);

impl Key {
    /// Checks `key`; the error says which rule it broke.
    pub fn new(key: impl Into<String>) -> Result<Key, GeologError> {
        let key = key.into();
        validate_key(&key)?;
        Ok(Key(key))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl Deref for Key {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Key {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Key {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<Key> for String {
    fn from(key: Key) -> String {
        key.0
    }
}

impl TryFrom<String> for Key {
    type Error = GeologError;
    fn try_from(key: String) -> Result<Key, GeologError> {
        Key::new(key)
    }
}

impl TryFrom<&str> for Key {
    type Error = GeologError;
    fn try_from(key: &str) -> Result<Key, GeologError> {
        Key::new(key)
    }
}

impl PartialEq<str> for Key {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Key {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// Longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 512;

/// Checks a key; the error message says which rule it broke. Code that
/// keeps the key makes a [`Key`] instead.
pub fn validate_key(key: &str) -> Result<(), GeologError> {
    if key.is_empty() {
        return Err(GeologError::new(
            ErrorCode::InvalidKey,
            "key must not be empty",
        ));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(GeologError::new(
            ErrorCode::InvalidKey,
            format!(
                "key is {} bytes; the limit is {MAX_KEY_BYTES} bytes",
                key.len()
            ),
        ));
    }
    if key.contains('\0') {
        return Err(GeologError::new(
            ErrorCode::InvalidKey,
            "key must not contain the NUL character",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds() {
        assert!(validate_key("a").is_ok());
        assert!(validate_key(&"x".repeat(512)).is_ok());
        assert_eq!(validate_key("").unwrap_err().code, ErrorCode::InvalidKey);
        assert_eq!(
            validate_key(&"x".repeat(513)).unwrap_err().code,
            ErrorCode::InvalidKey
        );
        // 171 three-byte characters = 513 bytes: the limit counts bytes, not chars.
        assert!(validate_key(&"€".repeat(171)).is_err());
        assert!(validate_key("a\0b").is_err());
    }

    #[test]
    fn a_key_is_made_only_from_a_valid_one() {
        let key = Key::new("logs/a").expect("valid");
        assert_eq!((key.as_str(), &*key), ("logs/a", "logs/a"));
        assert_eq!(key, "logs/a");
        assert_eq!(Key::new("").unwrap_err().code, ErrorCode::InvalidKey);
        assert!(Key::try_from("x".repeat(513)).is_err());
        assert!(Key::try_from("a\0b").is_err());
        assert_eq!(serde_json::to_string(&key).unwrap(), "\"logs/a\"");
        assert_eq!(format!("{key} {key:?}"), "logs/a \"logs/a\"");
    }
}
