-- Datasets (items with immutable-once-used revisions) and evaluation runs (definition, queued work items claimed by
-- workers with FOR UPDATE SKIP LOCKED under a lease, one result per work item, one row per evaluator check).
CREATE TABLE datasets (
    id               bigserial PRIMARY KEY,
    name             text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$'),
    description      text NOT NULL DEFAULT '',
    default_template text,            -- a template reference: name, name@label or name@version
    created_by       text NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE dataset_items (
    id         bigserial PRIMARY KEY,
    dataset_id bigint NOT NULL REFERENCES datasets (id) ON DELETE CASCADE,
    revision   integer NOT NULL DEFAULT 1 CHECK (revision >= 1),   -- the current revision
    deleted_at timestamptz,           -- removed from the dataset, kept because a run evaluated it
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dataset_items_dataset ON dataset_items (dataset_id, id) WHERE deleted_at IS NULL;

CREATE TABLE dataset_item_revisions (
    id         bigserial PRIMARY KEY,
    item_id    bigint NOT NULL REFERENCES dataset_items (id) ON DELETE CASCADE
                   DEFERRABLE INITIALLY IMMEDIATE,   -- bulk imports write revisions before their items
    revision   integer NOT NULL CHECK (revision >= 1),
    input      jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(input) = 'object'),
    expected   text,
    tags       text[] NOT NULL DEFAULT '{}',
    metadata   jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metadata) = 'object'),
    created_by text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (item_id, revision)
);

CREATE TABLE eval_runs (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL DEFAULT '',
    dataset_id  bigint NOT NULL REFERENCES datasets (id),
    status      text NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'running', 'done', 'cancelled')),
    model       jsonb NOT NULL,       -- {"registered": name or null, "model_name", "backend", "model_sha256", "base_url"}
    model_key   text NOT NULL,        -- which workers can serve the run
    params      jsonb NOT NULL DEFAULT '{}',
    evaluators  jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(evaluators) = 'array'),
    definition  jsonb NOT NULL,       -- as requested (dataset, template references, tag, ...), for re-runs
    total       integer NOT NULL DEFAULT 0 CHECK (total >= 0),
    source      text NOT NULL DEFAULT 'ui',
    created_by  text NOT NULL DEFAULT '',
    rerun_of    bigint REFERENCES eval_runs (id) ON DELETE SET NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    started_at  timestamptz,
    finished_at timestamptz
);
CREATE INDEX eval_runs_dataset ON eval_runs (dataset_id, id DESC);
CREATE INDEX eval_runs_active ON eval_runs (id) WHERE status IN ('queued', 'running');

CREATE TABLE eval_run_versions (
    run_id              bigint NOT NULL REFERENCES eval_runs (id) ON DELETE CASCADE,
    position            smallint NOT NULL CHECK (position >= 0),
    ref                 text NOT NULL,     -- as requested: name, name@label, name@3
    template_version_id bigint NOT NULL REFERENCES template_versions (id),
    template_name       text NOT NULL,
    version             integer NOT NULL,
    label               text,
    output_schema       jsonb,
    PRIMARY KEY (run_id, position)
);

CREATE TABLE eval_work_items (
    id               bigserial PRIMARY KEY,
    run_id           bigint NOT NULL,
    position         smallint NOT NULL,
    seq              integer NOT NULL,      -- execution order: items sharing a prompt prefix are adjacent
    item_id          bigint NOT NULL REFERENCES dataset_items (id),
    item_revision_id bigint NOT NULL REFERENCES dataset_item_revisions (id),
    messages         jsonb,                 -- the rendered messages (null when rendering failed)
    render_error     text,
    params           jsonb NOT NULL DEFAULT '{}',
    status           text NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'running', 'done', 'cancelled')),
    attempts         integer NOT NULL DEFAULT 0,   -- also the fencing token of the current claim
    claimed_by       text,
    claimed_at       timestamptz,
    lease_until      timestamptz,
    FOREIGN KEY (run_id, position) REFERENCES eval_run_versions (run_id, position) ON DELETE CASCADE,
    UNIQUE (run_id, position, item_revision_id)
);
CREATE INDEX eval_work_items_todo ON eval_work_items (run_id, seq) WHERE status IN ('queued', 'running');
CREATE INDEX eval_work_items_revision ON eval_work_items (item_revision_id);
CREATE INDEX eval_work_items_item ON eval_work_items (item_id);

CREATE TABLE eval_results (
    work_item_id      bigint PRIMARY KEY REFERENCES eval_work_items (id) ON DELETE CASCADE,  -- one per work item
    run_id            bigint NOT NULL,
    position          smallint NOT NULL,
    item_id           bigint NOT NULL,
    execution_id      bigint REFERENCES executions (id) ON DELETE SET NULL,
    output            text,
    error             text,
    passed            boolean NOT NULL,
    score             double precision,
    prompt_tokens     integer,
    completion_tokens integer,
    latency_ms        double precision,
    worker            text,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX eval_results_run ON eval_results (run_id, position, item_id);

CREATE TABLE eval_checks (
    work_item_id bigint NOT NULL REFERENCES eval_results (work_item_id) ON DELETE CASCADE,
    idx          smallint NOT NULL,
    origin       text NOT NULL CHECK (origin IN ('run', 'item')),   -- the run's evaluators or the item's own
    name         text NOT NULL,
    type         text NOT NULL,
    passed       boolean NOT NULL,
    score        double precision NOT NULL,
    weight       double precision NOT NULL,
    reason       text NOT NULL DEFAULT '',
    execution_id bigint REFERENCES executions (id) ON DELETE SET NULL,   -- the judge's generation
    PRIMARY KEY (work_item_id, idx)
);

-- A revision that a run evaluated never changes: an edit makes a new revision instead.
CREATE FUNCTION dataset_item_revisions_frozen() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM eval_work_items WHERE item_revision_id = OLD.id) THEN
        RAISE EXCEPTION 'dataset item revision % was used by an evaluation run and cannot change', OLD.id;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER dataset_item_revisions_no_update_when_used BEFORE UPDATE ON dataset_item_revisions
    FOR EACH ROW EXECUTE FUNCTION dataset_item_revisions_frozen();
