-- The execution ledger: every generation, from every source, with everything needed to reproduce it.
CREATE TABLE executions (
    id                  bigserial PRIMARY KEY,
    created_at          timestamptz NOT NULL DEFAULT now(),
    finished_at         timestamptz,
    status              text NOT NULL CHECK (status IN ('queued', 'running', 'ok', 'error', 'blocked', 'cancelled')),
    source              text NOT NULL CHECK (source IN ('playground', 'chat', 'evaluation', 'judge', 'cli', 'api', 'rerun', 'bench')),
    user_id             text,
    template_version_id bigint REFERENCES template_versions (id),
    template_name       text,
    template_version    integer,
    label               text,
    model_id            bigint REFERENCES models (id),
    model_name          text NOT NULL,
    model_sha256        text,
    backend             text NOT NULL,
    base_url            text,
    params              jsonb NOT NULL DEFAULT '{}',
    seed                bigint,
    variables           jsonb NOT NULL DEFAULT '{}',
    messages            jsonb,          -- the rendered chat messages sent (null for a raw prompt)
    prompt              text,           -- the exact prompt text the model saw
    output              text,
    finish_reason       text,
    prompt_tokens       integer,
    completion_tokens   integer,
    ttft_ms             double precision,
    total_ms            double precision,
    error               text,
    rerun_of            bigint REFERENCES executions (id),
    worker              text,
    claimed_at          timestamptz
);
CREATE INDEX executions_created_at ON executions (created_at DESC);
CREATE INDEX executions_template ON executions (template_name, template_version, created_at DESC);
CREATE INDEX executions_queued ON executions (id) WHERE status = 'queued';
