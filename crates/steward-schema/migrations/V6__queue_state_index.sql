-- Exact per-queue counts (recompute_dirty_admin_metadata, refresh_admin_metadata) for a few
-- queues at a time: without this, each recount is a sequential scan of jobs. Transitions already
-- change `state`, which every partial index's predicate reads, so they were never HOT updates;
-- this index adds one index insert per transition, and enables index-only counts.
CREATE INDEX jobs_queue_state_idx ON jobs (queue, state);
