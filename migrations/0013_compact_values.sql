-- A version row's value and context were parsed by PostgreSQL on every
-- replica (the value checked as JSON, the context built as JSONB) and the
-- context serialized to and from JSON text by the storage node per row.
-- The gateway validates a value once where it enters geolog; here it is
-- the client's text, stored as is. The context is the dots its writer had
-- seen, stored as the storage node encodes them: protobuf
-- `geolog.storage.v1.StoredContext` (`repeated Dot dots = 1`, a Dot being
-- `string node = 1; uint64 seq = 2`). Rows written before are converted
-- here, by the same encoding (nodes in order, as the JSON object held them).
CREATE FUNCTION geolog_varint(n bigint) RETURNS bytea LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    out bytea := ''::bytea;
BEGIN
    LOOP
        IF n < 128 THEN
            RETURN out || set_byte('\x00'::bytea, 0, n::int);
        END IF;
        out := out || set_byte('\x00'::bytea, 0, ((n & 127) | 128)::int);
        n := n >> 7;
    END LOOP;
END
$$;

CREATE FUNCTION geolog_context_bytes(c jsonb) RETURNS bytea LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    out bytea := ''::bytea;
    dot bytea;
    node bytea;
    e record;
BEGIN
    FOR e IN SELECT key, value FROM jsonb_each_text(c) ORDER BY key COLLATE "C" LOOP
        node := convert_to(e.key, 'UTF8');
        dot := '\x0a'::bytea || geolog_varint(octet_length(node)) || node
               || '\x10'::bytea || geolog_varint(e.value::bigint);
        out := out || '\x0a'::bytea || geolog_varint(octet_length(dot)) || dot;
    END LOOP;
    RETURN out;
END
$$;

ALTER TABLE versions
    ALTER COLUMN value TYPE text USING value::text,
    ALTER COLUMN context DROP DEFAULT,
    ALTER COLUMN context TYPE bytea USING geolog_context_bytes(context);

DROP FUNCTION geolog_context_bytes(jsonb);
DROP FUNCTION geolog_varint(bigint);
