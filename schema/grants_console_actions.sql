-- The console's actions, for {role}: requeue and purge of dead letters, through the
-- functions `outbox-relay dead-letters requeue|purge` call (schema.sql). They touch dead
-- letters only, so this role can change nothing else in messages: no UPDATE or DELETE
-- on the table itself.
GRANT EXECUTE ON FUNCTION {schema}.requeue_dead_letters(uuid[], text, timestamptz) TO {role};
GRANT EXECUTE ON FUNCTION {schema}.purge_dead_letters(uuid[], text, timestamptz, integer) TO {role};
