-- Version 7: the role that recorded each replay and backfill. A resume acts on what its
-- record says (the table a backfill copies, the messages a replay copies) with the
-- privileges of the role that resumes it, so a record must name its creator truly and
-- keep what it selects: the trigger (schema.sql says how) fills `created_by` and refuses
-- any change but progress, whatever a role's GRANTs say. An upgrade keeps the GRANTs of
-- older versions (table-wide INSERT on backfills, INSERT and UPDATE on replays), and
-- the chart's hook runs `schema install` only: the guarantee cannot rest on GRANTs. A
-- resume by another role names that role and the table and asks first. Rows recorded
-- before this version hold NULL (creator unknown) and are asked about like another
-- role's. And `replays.skipped`: rows a replay did not copy because their key is over
-- the limit of version 6 (written before it). Cheap to apply: three columns, two
-- triggers, no table rewrite, no lock on messages.

ALTER TABLE {schema}.replays ADD COLUMN created_by name;
ALTER TABLE {schema}.backfills ADD COLUMN created_by name;
ALTER TABLE {schema}.replays ADD COLUMN skipped bigint NOT NULL DEFAULT 0;

CREATE FUNCTION {schema}.record_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    changed text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.created_by := current_user;
        RETURN NEW;
    END IF;
    SELECT string_agg(n.key, ', ' ORDER BY n.key) INTO changed
    FROM jsonb_each(to_jsonb(NEW)) AS n
    WHERE n.key <> ALL (TG_ARGV) AND n.value IS DISTINCT FROM to_jsonb(OLD) -> n.key;
    IF changed IS NOT NULL THEN
        RAISE EXCEPTION 'outbox: % of %.% cannot change once recorded: only its progress (%) does',
            changed, TG_TABLE_SCHEMA, TG_TABLE_NAME, array_to_string(TG_ARGV, ', ')
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER replays_record_guard
    BEFORE INSERT OR UPDATE ON {schema}.replays
    FOR EACH ROW EXECUTE FUNCTION {schema}.record_guard('copied', 'cursor_id', 'skipped', 'finished_at');

CREATE TRIGGER backfills_record_guard
    BEFORE INSERT OR UPDATE ON {schema}.backfills
    FOR EACH ROW EXECUTE FUNCTION {schema}.record_guard('copied', 'cursor_key', 'finished_at');
