-- Finished jobs moved out of the hot table by cleanup, partitioned by day of finalized_at so
-- that expiring them is a DROP of a whole partition (rotate_archive), not a DELETE.
CREATE TABLE job_archive (
    id                bigint      NOT NULL,
    queue             text        NOT NULL,
    kind              text        NOT NULL,
    state             job_state   NOT NULL,
    priority          smallint    NOT NULL,
    attempt           integer     NOT NULL,
    max_attempts      integer     NOT NULL,
    run_at            timestamptz NOT NULL,
    created_at        timestamptz NOT NULL,
    attempted_at      timestamptz,
    finalized_at      timestamptz NOT NULL,
    unique_key        text,
    args              jsonb       NOT NULL,
    errors            jsonb       NOT NULL,
    archived_at       timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (finalized_at);

-- Partitions are whole UTC days, whatever the session's TimeZone.
-- Partition management runs as the table owner so that the maintenance role needs no DDL
-- rights of its own (SECURITY DEFINER, with a pinned search_path).
CREATE FUNCTION create_archive_partition(day date) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    part text := format('job_archive_p%s', to_char(day, 'YYYYMMDD'));
    schema_name text := (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                          WHERE c.oid = 'job_archive'::regclass);
BEGIN
    IF to_regclass(format('%I.%I', schema_name, part)) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE IF NOT EXISTS %I.%I PARTITION OF %I.job_archive FOR VALUES FROM (%L) TO (%L)',
                   schema_name, part, schema_name,
                   day::timestamp AT TIME ZONE 'UTC', (day + 1)::timestamp AT TIME ZONE 'UTC');
    RETURN true;
END $$;

-- Drops whole-day partitions that end on or before `before`; returns how many were dropped.
CREATE FUNCTION drop_archive_partitions_before(before date) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    r record;
    dropped integer := 0;
BEGIN
    FOR r IN
        SELECT n.nspname AS schema_name, c.relname AS part
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE i.inhparent = 'job_archive'::regclass
          AND c.relname ~ '^job_archive_p[0-9]{8}$'
          AND to_date(substring(c.relname from 14), 'YYYYMMDD') < before
    LOOP
        EXECUTE format('DROP TABLE IF EXISTS %I.%I', r.schema_name, r.part);
        dropped := dropped + 1;
    END LOOP;
    RETURN dropped;
END $$;

-- SECURITY DEFINER functions must not resolve names through the caller's search_path.
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION create_archive_partition(date) SET search_path = %I, pg_temp', current_schema());
    EXECUTE format('ALTER FUNCTION drop_archive_partitions_before(date) SET search_path = %I, pg_temp', current_schema());
END $$;

-- Functions are executable by PUBLIC by default; these two must be granted explicitly.
REVOKE EXECUTE ON FUNCTION create_archive_partition(date) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION drop_archive_partitions_before(date) FROM PUBLIC;
