-- Analytics: the state of the Parquet exports (watermarks, runs) and the prices that turn usage into cost.

-- One row per exported table and exports directory ("target": the UUID in that directory's marker file, so a
-- wiped or different directory starts from scratch). Every id <= last_id is exported, except the ranges in
-- `pending`: [[lo, hi, [virtualxid, ...]], ...] — ids not visible (or not final) when last exported, re-examined
-- once none of the listed transactions (those in flight at that export) is still running.
CREATE TABLE export_watermarks (
    target        text NOT NULL,
    table_name    text NOT NULL,
    last_id       bigint NOT NULL DEFAULT 0 CHECK (last_id >= 0),
    pending       jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(pending) = 'array'),
    rows_exported bigint NOT NULL DEFAULT 0 CHECK (rows_exported >= 0),
    checked_at    timestamptz,          -- the last export attempt, whether or not it found rows
    exported_at   timestamptz,          -- the last export that wrote rows
    PRIMARY KEY (target, table_name)
);

-- Each export or compaction that wrote files. Files are written as *.tmp, this row is committed, then they are
-- renamed (and the files a compaction replaces deleted); `settled` turns true once that is done, so an
-- interrupted run is finished (or its uncommitted files discarded) by the next one.
CREATE TABLE export_runs (
    id          uuid PRIMARY KEY,
    target      text NOT NULL,
    table_name  text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('export', 'compact')),
    rows        bigint NOT NULL CHECK (rows >= 0),
    files       jsonb NOT NULL DEFAULT '[]',      -- paths relative to the exports directory
    replaces    jsonb NOT NULL DEFAULT '[]',      -- compaction: the files it merged
    settled     boolean NOT NULL DEFAULT false,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX export_runs_unsettled ON export_runs (target) WHERE NOT settled;
CREATE INDEX export_runs_recent ON export_runs (target, finished_at DESC);

-- Prices per model: per 1,000 prompt / completion tokens (hosted models) and per compute-second (local models:
-- the generation's wall time). The model name '*' prices every model without a row of its own.
CREATE TABLE model_prices (
    model_name          text PRIMARY KEY CHECK (model_name <> ''),
    prompt_per_1k       double precision NOT NULL DEFAULT 0 CHECK (prompt_per_1k >= 0 AND prompt_per_1k < 'Infinity'),
    completion_per_1k   double precision NOT NULL DEFAULT 0 CHECK (completion_per_1k >= 0 AND completion_per_1k < 'Infinity'),
    per_compute_second  double precision NOT NULL DEFAULT 0 CHECK (per_compute_second >= 0 AND per_compute_second < 'Infinity'),
    updated_by          text NOT NULL DEFAULT '',
    updated_at          timestamptz NOT NULL DEFAULT now()
);
