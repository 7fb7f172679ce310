-- The cross-region outbox: versions minted on this node that a remote region
-- has not fully received yet. Rows are written in the same statement as the
-- version, deleted once every replica of the remote region acknowledged.
CREATE TABLE outbox (
    id         BIGSERIAL   PRIMARY KEY,
    region     TEXT        NOT NULL,
    key        TEXT        NOT NULL,
    node       TEXT        NOT NULL,
    seq        BIGINT      NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    FOREIGN KEY (key, node, seq) REFERENCES versions (key, node, seq)
);

-- Replay reads each region's entries oldest first.
CREATE INDEX outbox_region_id ON outbox (region, id);
