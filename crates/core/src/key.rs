//! Rules for log keys: UTF-8 (guaranteed by `&str`), 1 to 512 bytes, and no
//! NUL character (PostgreSQL text cannot store it).

use crate::error::{ErrorCode, GeologError};

/// Longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 512;

/// Checks a key; the error message says which rule it broke.
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
}
