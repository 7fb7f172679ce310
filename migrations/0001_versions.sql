-- Every version of every key this storage node holds. Nothing is updated in
-- place: a write adds a row, replication adds the same row elsewhere.
CREATE TABLE versions (
    key        TEXT        NOT NULL,
    -- the dot: the storage node that minted the version and its sequence
    node       TEXT        NOT NULL,
    seq        BIGINT      NOT NULL,
    -- hybrid logical clock, packed as (physical_ms << 16) | logical
    hlc        BIGINT      NOT NULL,
    -- the client's JSON, verbatim
    value      JSON        NOT NULL,
    stored_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (key, node, seq)
);

-- Newest-first reads of one key.
CREATE INDEX versions_key_hlc ON versions (key, hlc DESC, node DESC);
-- A node's own dots, newest first: restores its sequence and clock at start.
CREATE INDEX versions_node_seq ON versions (node, seq DESC);

-- Sequence of the dots this node mints. Gaps are harmless; reuse is not,
-- so the node moves it past every dot of its own it finds at start.
CREATE SEQUENCE dot_seq;
