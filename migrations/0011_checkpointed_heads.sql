-- A key's frontier is no longer written with every version: the storage
-- node owns the keys' states in memory and checkpoints the heads of the
-- keys that changed (every few seconds), instead of inserting and deleting
-- a head row per version stored — half of PostgreSQL's time per version.
-- Each version row records when it arrived here (a node-local sequence,
-- increasing); a checkpoint records that the heads reflect every version
-- that arrived up to a point. At start the node merges the versions that
-- arrived after it into the heads — frontier(A ∪ B) = frontier(frontier(A)
-- ∪ B) — so the heads are exact again before anything is served.
-- Rows from before this migration have no arrival: the heads were exact.
ALTER TABLE versions ADD COLUMN arrived BIGINT;
-- Rows are appended in arrival order: a block range index is enough to
-- find those after a checkpoint, and costs almost nothing per row.
CREATE INDEX versions_arrived ON versions USING brin (arrived);
CREATE TABLE heads_checkpoint (
    singleton BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
    -- The heads reflect every version with arrived <= this.
    arrived   BIGINT NOT NULL
);
INSERT INTO heads_checkpoint (arrived) VALUES (0);
