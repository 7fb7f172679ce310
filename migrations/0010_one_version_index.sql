-- One index per version row instead of three. A version was indexed by its
-- dot (the primary key), by (key, hlc) for history and by tree token for
-- anti-entropy; btree insertion was half of PostgreSQL's time on the write
-- path. One unique index on (token, key, hlc, node, seq) now serves all
-- three: a key's history is the range (token, key) read backwards (the
-- storage node computes a key's token), a tree bucket is a token range
-- (index-only, the version hash included), and a dot is unique because a
-- dot is minted once, with one timestamp, for one key. Comparisons are on
-- the 64-bit token first, not on text.
--
-- Rows that name a version (heads, hints, outbox entries) carry what finds
-- it in that index: its timestamp, and the key's token where the key alone
-- does not give it (the node computes tokens for heads from the key).
ALTER TABLE heads ADD COLUMN hlc BIGINT;
UPDATE heads h SET hlc = v.hlc FROM versions v
WHERE (v.key, v.node, v.seq) = (h.key, h.node, h.seq);
DELETE FROM heads WHERE hlc IS NULL;
ALTER TABLE heads ALTER COLUMN hlc SET NOT NULL;

ALTER TABLE hints ADD COLUMN hlc BIGINT, ADD COLUMN token BIGINT;
UPDATE hints h SET hlc = v.hlc, token = v.token FROM versions v
WHERE (v.key, v.node, v.seq) = (h.key, h.node, h.seq);
DELETE FROM hints WHERE hlc IS NULL;
ALTER TABLE hints ALTER COLUMN hlc SET NOT NULL;

ALTER TABLE outbox ADD COLUMN hlc BIGINT, ADD COLUMN token BIGINT;
UPDATE outbox o SET hlc = v.hlc, token = v.token FROM versions v
WHERE (v.key, v.node, v.seq) = (o.key, o.node, o.seq);
DELETE FROM outbox WHERE hlc IS NULL;
ALTER TABLE outbox ALTER COLUMN hlc SET NOT NULL;

-- A hint's version is checked when the hint is stored (and versions are
-- never deleted): the foreign key needed the dot index.
ALTER TABLE hints DROP CONSTRAINT hints_key_node_seq_fkey;

-- Tokens still NULL here (rows from before 0007) are filled by the storage
-- node when it opens the store, versions first, through this index.
CREATE UNIQUE INDEX versions_place ON versions (token, key, hlc, node, seq) INCLUDE (vhash);
ALTER TABLE versions DROP CONSTRAINT versions_pkey;
DROP INDEX versions_history;
DROP INDEX versions_token;
