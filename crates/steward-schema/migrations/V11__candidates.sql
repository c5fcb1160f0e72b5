-- Every `steward run` records itself here while it runs, leader or standby, so that
-- `steward status` (and alerts, through it) sees every candidate, not only the leader. A
-- candidate refreshes last_seen about every second; the leader deletes rows not seen for an hour.
CREATE TABLE candidates (
    instance      text        PRIMARY KEY,
    host          text        NOT NULL,
    pid           integer     NOT NULL,
    version       text        NOT NULL,
    loop_mode     text        NOT NULL,
    -- A digest of the candidate's effective configuration: candidates that differ would run the
    -- queue differently after a failover.
    config_digest text        NOT NULL,
    since         timestamptz NOT NULL DEFAULT now(),
    last_seen     timestamptz NOT NULL DEFAULT now()
);

-- What `steward status` shows of a branch besides its last pass: when a rescue is held in its
-- quiet period until, and the term its last error came from. Counters count within the term.
ALTER TABLE branch_health ADD COLUMN class text;
ALTER TABLE branch_health ADD COLUMN held_until timestamptz;
ALTER TABLE branch_health ADD COLUMN last_error_epoch bigint;
