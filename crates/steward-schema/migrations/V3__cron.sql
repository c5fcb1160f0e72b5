-- Cron schedules: from the config file (source 'config', upserted by cron_sync) or managed
-- directly in this table (source 'table').
CREATE TABLE cron_schedules (
    name          text        PRIMARY KEY,
    expression    text        NOT NULL,
    timezone      text        NOT NULL DEFAULT 'UTC',
    queue         text        NOT NULL DEFAULT 'default',
    kind          text        NOT NULL,
    args          jsonb       NOT NULL DEFAULT '{}',
    priority      smallint    NOT NULL DEFAULT 2 CHECK (priority BETWEEN 1 AND 4),
    max_attempts  integer     NOT NULL DEFAULT 25 CHECK (max_attempts >= 1),
    enabled       boolean     NOT NULL DEFAULT true,
    source        text        NOT NULL DEFAULT 'table' CHECK (source IN ('config', 'table')),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- One row per fire: the primary key makes a fire enqueue exactly once, whoever runs cron_sync.
CREATE TABLE cron_fires (
    schedule_name text        NOT NULL,
    fire_at       timestamptz NOT NULL,
    job_id        bigint      NOT NULL,
    enqueued_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schedule_name, fire_at)
);
-- Pruning old fire records (cron_sync, by age).
CREATE INDEX cron_fires_enqueued_idx ON cron_fires (enqueued_at);
