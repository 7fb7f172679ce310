-- Idempotency: the durable record of a client's idempotency key travels
-- with the version it created (replicated like any version), with a hash of
-- the request body so a reused key with a different body is refused.
ALTER TABLE versions ADD COLUMN idempotency_key TEXT;
ALTER TABLE versions ADD COLUMN body_hash TEXT;
CREATE INDEX versions_idempotency ON versions (key, idempotency_key) WHERE idempotency_key IS NOT NULL;
