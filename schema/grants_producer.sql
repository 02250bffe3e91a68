-- An application role, {role}, that only enqueues (from SQL or from Python).
GRANT USAGE ON SCHEMA {schema} TO {role};
GRANT INSERT ON {schema}.messages TO {role};
GRANT EXECUTE ON FUNCTION {schema}.enqueue(text, text, jsonb, jsonb) TO {role};
GRANT EXECUTE ON FUNCTION {schema}.enqueue_binary(text, text, bytea, jsonb, text) TO {role};
