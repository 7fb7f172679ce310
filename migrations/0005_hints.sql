-- Hinted handoff: versions a replica of this region missed (down, timed
-- out, circuit open), kept on the node that minted them until the target
-- answers again. Hints older than the window are dropped (anti-entropy's
-- job then).
CREATE TABLE hints (
    id         BIGSERIAL   PRIMARY KEY,
    target     TEXT        NOT NULL,
    key        TEXT        NOT NULL,
    node       TEXT        NOT NULL,
    seq        BIGINT      NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    FOREIGN KEY (key, node, seq) REFERENCES versions (key, node, seq)
);
CREATE INDEX hints_target_id ON hints (target, id);
