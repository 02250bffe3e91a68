-- Least privilege for a consumer's role, {role}: it records message ids through
-- first_time and can do nothing else in {schema}: not read which ids were processed,
-- not delete or change a record (which would let a message take effect twice).
-- Retention (prune) runs as the schema's owner, or a role granted DELETE for it.
-- The REVOKE first makes these statements also narrow an older, wider grant.
GRANT USAGE ON SCHEMA {schema} TO {role};
REVOKE ALL ON {schema}.processed FROM {role};
-- first_time runs with the caller's rights: it needs INSERT of the two columns it
-- fills (processed_at is the transaction's start, never the caller's choice).
GRANT INSERT (consumer, message_id) ON {schema}.processed TO {role};
GRANT SELECT ON {schema}.inbox_version TO {role};
-- Granted by name, not left to PUBLIC's default: a database that revoked EXECUTE
-- from PUBLIC still lets the consumer record its messages.
GRANT EXECUTE ON FUNCTION {schema}.first_time(uuid, text) TO {role};
