-- Periodic anti-entropy leaves out versions minted in the last moments
-- (still in flight through normal replication): the digest index carries
-- each version's timestamp so that filter stays an index-only scan. The
-- timestamp is the version's own (minted once), the same on every replica.
DROP INDEX versions_token;
CREATE INDEX versions_token ON versions (token) INCLUDE (vhash, hlc);
