-- Version 6: a key's limit is counted in UTF-8 bytes (1 to 2,048), no longer in
-- characters (1 to 1,024). The key is in the claim's index entries (key, id), which
-- PostgreSQL caps at 2,704 bytes: a legal key of 1,024 CJK characters (3,072 bytes)
-- failed its INSERT with "index row size exceeds btree maximum", aborting the
-- application's transaction. 2,048 bytes always fits, with room to spare.
--
-- The domain's constraint is replaced NOT VALID, and stays so: rows written under the
-- old rule may hold keys of 2,049 to 2,684 bytes (any row: they fitted the index), or
-- up to 4,096 (a row inserted already dispatched, in no key index). Validating would
-- fail this upgrade on the user's own data, or stop every enqueue while it scanned
-- the whole table under a share lock. Nothing re-checks rows already written: no
-- UPDATE of the relay or the CLI assigns `key`, so such a row is still claimed,
-- dispatched, dead-lettered or requeued, and deleted by retention as before; only a new
-- row with such a key is refused (a replay's copy of one, too). Cheap to apply: the
-- catalog only, no scan, no table lock.

ALTER DOMAIN {schema}.message_key DROP CONSTRAINT messages_key_valid;
ALTER DOMAIN {schema}.message_key ADD CONSTRAINT messages_key_valid
    CHECK (octet_length(VALUE) BETWEEN 1 AND 2048) NOT VALID;

CREATE OR REPLACE FUNCTION {schema}.enqueue_binary(
    topic text,
    key text,
    payload bytea,
    headers jsonb DEFAULT '{{}}'::jsonb,
    content_type text DEFAULT 'application/octet-stream'
) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    new_id uuid;
    max_bytes bigint := nullif(current_setting('outbox_relay.max_payload_bytes', true), '')::bigint;
BEGIN
    IF topic IS NULL OR topic !~ '^[A-Za-z0-9._:/-]+$' OR length(topic) > 249 THEN
        RAISE EXCEPTION 'outbox: invalid topic %: use 1 to 249 letters, digits or . _ - : /', quote_nullable(topic)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF key IS NOT NULL AND octet_length(key) NOT BETWEEN 1 AND 2048 THEN
        RAISE EXCEPTION 'outbox: invalid key of % bytes: must be 1 to 2048 bytes of UTF-8 or NULL', octet_length(key)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF payload IS NULL THEN
        RAISE EXCEPTION 'outbox: payload must not be NULL'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- An optional ceiling, set per database or role:
    -- ALTER DATABASE app SET outbox_relay.max_payload_bytes = '1048576';
    IF max_bytes IS NOT NULL AND octet_length(payload) > max_bytes THEN
        RAISE EXCEPTION 'outbox: payload of % bytes exceeds outbox_relay.max_payload_bytes (%)',
            octet_length(payload), max_bytes
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    IF headers IS NOT NULL AND headers <> '{{}}'::jsonb AND NOT {schema}.headers_valid(headers) THEN
        RAISE EXCEPTION 'outbox: invalid headers %: must be a JSON object of non-empty string names (not "message-id") to string values', headers
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO {schema}.messages (topic, key, payload, headers, content_type)
    VALUES (topic, key, payload, coalesce(headers, '{{}}'::jsonb), coalesce(content_type, 'application/octet-stream'))
    RETURNING message_id INTO new_id;
    RETURN new_id;
END
$$;
