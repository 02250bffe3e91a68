-- An application role, {role}, that only enqueues (from SQL or from Python).
GRANT USAGE ON SCHEMA {schema} TO {role};
-- RETURNING message_id needs SELECT on that one column, and nothing more.
GRANT INSERT, SELECT (message_id) ON {schema}.messages TO {role};
GRANT EXECUTE ON FUNCTION {schema}.enqueue(text, text, jsonb, jsonb) TO {role};
GRANT EXECUTE ON FUNCTION {schema}.enqueue_binary(text, text, bytea, jsonb, text) TO {role};
