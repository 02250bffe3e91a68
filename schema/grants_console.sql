-- Least privilege for the operator console's role, {role} (`outbox-relay console`):
-- it reads what its pages show, and never a payload (grants_console_payloads.sql adds
-- that column where console.show_payloads is on). Nothing outside {schema}.
GRANT USAGE ON SCHEMA {schema} TO {role};
GRANT SELECT ON {schema}.schema_version, {schema}.settings, {schema}.relays, {schema}.relay_samples,
    {schema}.replays, {schema}.backfills, {schema}.wal_receipts TO {role};
GRANT SELECT (id, message_id, topic, key, content_type, headers, created_at, attempts, next_attempt_at,
    last_error, dispatched_at, dead_lettered_at, dead_letter_reason, receipt, dead_letter_published_at)
    ON {schema}.messages TO {role};
