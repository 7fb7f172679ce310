-- Anti-entropy digests are computed by aggregation here, never by shipping
-- rows: a key's place in the digest tree is the top bits of its hash, and
-- this index turns a tree bucket into a range scan.
CREATE INDEX versions_key_hash ON versions (hashtextextended(key, 0));
