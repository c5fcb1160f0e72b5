-- What workers need from the queue beyond claim and complete.
--
-- Waking workers: whoever makes jobs of a queue available (an enqueue of a job due now, the
-- promoter, a worker handing runs back) calls wake_workers with the queue names, which sends one
-- NOTIFY per queue on `<schema>_available` (steward_queue::available_channel), the payload
-- being the queue. Workers listen there and claim at once instead of polling; NOTIFYs of one
-- transaction with the same payload are delivered once. Like wake_promoter, it keeps the
-- search_path it was created with, so that the channel is this schema's whoever calls it.
CREATE FUNCTION wake_workers(queues text[]) RETURNS integer
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    woken integer := 0;
    queue text;
BEGIN
    FOR queue IN SELECT DISTINCT q FROM unnest(queues) AS q WHERE q IS NOT NULL LOOP
        PERFORM pg_notify(current_schema() || '_available', queue);
        woken := woken + 1;
    END LOOP;
    RETURN woken;
END $$;

-- The staleness after which the leader rescues a run whose heartbeat stopped, published when a
-- term starts (NULL while that rescue is disabled), so that a worker can check that it
-- heartbeats often enough.
ALTER TABLE leader ADD COLUMN heartbeat_staleness interval;
