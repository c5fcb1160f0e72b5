-- Exact per-queue counts for admin views, kept by refresh_admin_metadata (all queues) and
-- recompute_dirty_admin_metadata (only queues whose jobs changed since the last recompute).
CREATE TABLE queue_counts (
    queue      text        NOT NULL,
    state      job_state   NOT NULL,
    count      bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue, state)
);

CREATE TABLE dirty_queues (
    queue      text        PRIMARY KEY,
    dirtied_at timestamptz NOT NULL DEFAULT now()
);

-- Marks the queues a statement touched. The NOT EXISTS probe keeps the common case (queue
-- already dirty) read-only, so concurrent writers to one queue never wait on each other here.
CREATE FUNCTION mark_queues_dirty() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO dirty_queues (queue)
        SELECT DISTINCT o.queue FROM old_rows o
        WHERE NOT EXISTS (SELECT 1 FROM dirty_queues d WHERE d.queue = o.queue)
        ON CONFLICT DO NOTHING;
    ELSE
        INSERT INTO dirty_queues (queue)
        SELECT DISTINCT n.queue FROM new_rows n
        WHERE NOT EXISTS (SELECT 1 FROM dirty_queues d WHERE d.queue = n.queue)
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER jobs_dirty_insert AFTER INSERT ON jobs
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION mark_queues_dirty();
CREATE TRIGGER jobs_dirty_update AFTER UPDATE ON jobs
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION mark_queues_dirty();
CREATE TRIGGER jobs_dirty_delete AFTER DELETE ON jobs
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION mark_queues_dirty();

-- Latest depth snapshot per queue and state, written by queue_stats.
CREATE TABLE queue_stats (
    queue                      text        NOT NULL,
    state                      job_state   NOT NULL,
    depth                      bigint      NOT NULL,
    oldest_available_age_secs  double precision,
    sampled_at                 timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue, state)
);
