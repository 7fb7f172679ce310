-- A checkpoint rewrote every changed key's heads: a delete and an insert,
-- each with its index entry, per head. A key's heads are now one row — the
-- dots and timestamps of its frontier as arrays — updated in place: its
-- primary key does not change, so the update is a heap-only tuple (no
-- index entry), and pages keep room for it.
CREATE TABLE frontiers (
    key   TEXT     PRIMARY KEY,
    nodes TEXT[]   NOT NULL,
    seqs  BIGINT[] NOT NULL,
    hlcs  BIGINT[] NOT NULL
) WITH (fillfactor = 70);
INSERT INTO frontiers (key, nodes, seqs, hlcs)
SELECT key, array_agg(node ORDER BY node, seq), array_agg(seq ORDER BY node, seq),
       array_agg(hlc ORDER BY node, seq)
FROM heads GROUP BY key;
DROP TABLE heads;
