-- The one definition of when a producer wakes the promoter: a job due at `run_at` before the
-- promoter's own published wake-up (`leader.promote_wakeup_at`, see promote_scheduled) gets a
-- NOTIFY on the promoter's channel, `<schema>_due` (steward_queue::due_channel), and the
-- function returns true; NULL or a later time sends nothing and returns false.
-- The queue client's enqueues and cron_sync call it, and so may producers in other languages or
-- triggers, from sessions whose search_path does not name this schema: the function therefore
-- keeps the search_path it was created with (migrations run with it pinned to this schema), so
-- that `leader` and current_schema(), and with it the channel, are this schema's.
CREATE FUNCTION wake_promoter(run_at timestamptz) RETURNS boolean
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF run_at IS NULL
       OR NOT EXISTS (SELECT FROM leader WHERE id = 1 AND promote_wakeup_at > run_at) THEN
        RETURN false;
    END IF;
    PERFORM pg_notify(current_schema() || '_due', '');
    RETURN true;
END $$;
