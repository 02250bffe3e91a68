-- A role, {role}, that handles outcomes (schema.sql, outcomes): what became of messages,
-- with a copy of each, so of every application that enqueues into this outbox. Granted
-- apart from enqueueing (grants_producer.sql): the application that compensates, and
-- only it. It reads the rows and deletes those it has handled, in its own transactions
-- (take_outcomes); it writes none (a forged row would look like the relay's word).
GRANT USAGE ON SCHEMA {schema} TO {role};
REVOKE INSERT, UPDATE, TRUNCATE ON {schema}.outcomes FROM {role};
GRANT SELECT, DELETE ON {schema}.outcomes TO {role};
GRANT EXECUTE ON FUNCTION {schema}.take_outcomes(integer, text, text[]) TO {role};
