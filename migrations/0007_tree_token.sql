-- Anti-entropy compares, per pair of replicas, only the key ranges both
-- replicate. The tree is therefore laid over the ring's token space: each
-- version stores its key's tree token and its own hash (both computed by
-- the storage node when it inserts), and this index answers a bucket's
-- digest with an index-only range scan. Rows written before this migration
-- are filled in by the storage node when it opens the store.
ALTER TABLE versions ADD COLUMN token bigint, ADD COLUMN vhash bigint;
DROP INDEX versions_key_hash;
CREATE INDEX versions_token ON versions (token) INCLUDE (vhash);
