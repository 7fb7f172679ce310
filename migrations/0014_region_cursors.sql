-- Cross-region delivery as a cursor per remote region instead of an outbox
-- row per version and region. An outbox row was inserted with each version
-- and deleted once delivered: two writes per version and remote region.
--
-- Every version this node mints must reach every remote region. A mint
-- statement now also stores one row in `own_changes`: the change's number
-- (its versions' `arrived`) and where its versions are — their sequences
-- (in order), timestamps, keys and tokens, as arrays: one row per batch,
-- whatever its size. A region's cursor is the position (change, seq) in
-- them up to which every version has reached all that region's replicas,
-- or was passed after the outbox window (anti-entropy repairs those). The
-- replay worker reads the positions after the cursor, skips those the
-- write path delivered, sends the rest and moves the cursor; rows every
-- cursor passed are deleted.
CREATE TABLE own_changes (
    change BIGINT   PRIMARY KEY,
    seqs   BIGINT[] NOT NULL,
    hlcs   BIGINT[] NOT NULL,
    keys   TEXT[]   NOT NULL,
    tokens BIGINT[] NOT NULL
);

CREATE TABLE region_cursors (
    region TEXT   PRIMARY KEY,
    change BIGINT NOT NULL,
    seq    BIGINT NOT NULL
);

-- Entries still pending become the changes of their versions (versions
-- stored before 0011 have no arrival: those are left to anti-entropy).
INSERT INTO own_changes (change, seqs, hlcs, keys, tokens)
SELECT v.arrived, array_agg(v.seq ORDER BY v.seq), array_agg(v.hlc ORDER BY v.seq),
       array_agg(v.key ORDER BY v.seq), array_agg(v.token ORDER BY v.seq)
FROM (SELECT DISTINCT key, node, seq, hlc, token FROM outbox) o
JOIN versions v
  ON v.token = o.token AND (v.key, v.hlc, v.node, v.seq) = (o.key, o.hlc, o.node, o.seq)
WHERE v.arrived IS NOT NULL
GROUP BY v.arrived;

-- A region with entries pending starts just before the oldest of them.
INSERT INTO region_cursors (region, change, seq)
SELECT o.region,
       COALESCE(min(v.arrived) - 1, (SELECT COALESCE(max(arrived), 0) FROM versions)),
       9223372036854775807
FROM outbox o
LEFT JOIN versions v
  ON v.token = o.token AND (v.key, v.hlc, v.node, v.seq) = (o.key, o.hlc, o.node, o.seq)
GROUP BY o.region;

DROP TABLE outbox;
