-- Causality: every version carries its causal context (what its writer had
-- seen, node -> highest sequence), and the key's frontier — the versions no
-- other version supersedes — is the rows with superseded = false.
ALTER TABLE versions ADD COLUMN context JSONB NOT NULL DEFAULT '{}'::jsonb;
ALTER TABLE versions ADD COLUMN superseded BOOLEAN NOT NULL DEFAULT false;

-- Rows written before causality were newest-wins: keep exactly that view.
UPDATE versions v SET superseded = true
WHERE EXISTS (
    SELECT 1 FROM versions w
    WHERE w.key = v.key AND (w.hlc, w.node, w.seq) > (v.hlc, v.node, v.seq)
);

CREATE INDEX versions_frontier ON versions (key) WHERE NOT superseded;
-- History pages: newest first by (hlc, node, seq).
CREATE INDEX versions_history ON versions (key, hlc DESC, node DESC, seq DESC);
DROP INDEX versions_key_hlc;
