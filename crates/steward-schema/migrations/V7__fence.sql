-- The fence every branch transaction opens with (see steward-branches' FENCE). It raises when
-- the caller's leadership term is over, rather than returning the current epoch for the client
-- to compare, so that a transaction whose statements and COMMIT were sent in one round trip
-- fails on the server: every statement after it fails too, and the COMMIT rolls back.
-- FOR KEY SHARE on the one-row `leader` conflicts with the FOR UPDATE a new term's start takes.
-- It also sets the transaction's statement and lock timeouts (first, so that they bound the
-- wait for the leader row too) and, when `relaxed`, lets the commit return before its WAL flush. SQLSTATE ST001 carries the current epoch in DETAIL.
CREATE FUNCTION fence(expected bigint, statement_timeout text, lock_timeout text, relaxed boolean)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    current bigint;
BEGIN
    PERFORM set_config('statement_timeout', statement_timeout, true),
            set_config('lock_timeout', lock_timeout, true);
    IF relaxed THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    SELECT epoch INTO current FROM leader WHERE id = 1 FOR KEY SHARE;
    IF current IS DISTINCT FROM expected THEN
        RAISE EXCEPTION 'leadership term % is over (the current term is %)', expected, current
            USING ERRCODE = 'ST001', DETAIL = coalesce(current::text, '');
    END IF;
    RETURN current;
END $$;
