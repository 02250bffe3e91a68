-- The console's actions, for {role}: requeue and purge of dead letters, the statements
-- `outbox-relay dead-letters requeue|purge` run (queries.sql: dead_letters_requeue,
-- dead_letters_purge). Both select dead letters only (dead_lettered_at IS NOT NULL) in
-- the console's code; the database cannot narrow DELETE by a row's state, so grant
-- this only to a console that acts (OUTBOX_RELAY_CONSOLE_TOKEN or a trusted proxy).
GRANT UPDATE (dead_lettered_at, dead_letter_reason, dead_letter_published_at, last_error, attempts, next_attempt_at)
    ON {schema}.messages TO {role};
GRANT DELETE ON {schema}.messages TO {role};
