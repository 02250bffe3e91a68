-- Version 7: the role that recorded each replay and backfill. A resume acts on what its
-- record says (the table a backfill copies, the messages a replay copies) with the
-- privileges of the role that resumes it, so a record must name its creator truly: the
-- database fills `created_by` (current_user), and the roles' GRANTs let them insert
-- every column but this one. A resume by another role names that role and the table
-- and asks first. Rows recorded before this version hold NULL (creator unknown) and are
-- asked about like another role's. Cheap to apply: two columns, no table rewrite.

ALTER TABLE {schema}.replays ADD COLUMN created_by name;
ALTER TABLE {schema}.replays ALTER COLUMN created_by SET DEFAULT current_user;
ALTER TABLE {schema}.backfills ADD COLUMN created_by name;
ALTER TABLE {schema}.backfills ALTER COLUMN created_by SET DEFAULT current_user;
