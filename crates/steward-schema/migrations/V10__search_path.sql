-- Every function that names Steward's tables keeps the search_path it was created with
-- (migrations run with it pinned to this schema), so that producers and workers in any language
-- can use the schema from sessions whose search_path does not name it: an INSERT INTO
-- <schema>.jobs fires mark_queues_dirty, which must find <schema>.dirty_queues.
-- retry_backoff names no table (its functions are pg_catalog's, always found) and stays
-- inlinable without a SET clause.
ALTER FUNCTION mark_queues_dirty() SET search_path FROM CURRENT;
ALTER FUNCTION fence(bigint, text, text, boolean) SET search_path FROM CURRENT;
