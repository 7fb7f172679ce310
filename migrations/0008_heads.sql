-- A key's frontier (its current versions) moves to its own narrow table:
-- superseding a version deletes its head row instead of updating the wide,
-- many-indexed version row, so a version row is written once and never
-- updated (an update rewrote the row and every index entry).
CREATE TABLE heads (
    key  TEXT   NOT NULL,
    node TEXT   NOT NULL,
    seq  BIGINT NOT NULL,
    PRIMARY KEY (key, node, seq)
);
INSERT INTO heads (key, node, seq) SELECT key, node, seq FROM versions WHERE NOT superseded;
DROP INDEX versions_frontier;
ALTER TABLE versions DROP COLUMN superseded;
-- Only read when a node starts (one scan then); not worth maintaining per row.
DROP INDEX versions_node_seq;
-- An outbox entry is inserted in the same transaction as its version and
-- versions are never deleted: the foreign key only cost a row lock on the
-- version per entry (FOR KEY SHARE rewrites the version's tuple header).
ALTER TABLE outbox DROP CONSTRAINT outbox_key_node_seq_fkey;
