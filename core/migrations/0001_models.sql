-- Foundation: the registry of models and backends the workbench knows.
CREATE TABLE models (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (name <> ''),
    backend     text NOT NULL CHECK (backend IN ('llama_cpp', 'openai')),
    path        text,             -- GGUF file for llama_cpp
    base_url    text,             -- OpenAI-compatible server for openai
    remote_model text,            -- model name on that server
    api_key_env text,             -- name of the environment variable holding its key (never the key)
    chat_format text NOT NULL DEFAULT 'auto',
    n_ctx       integer NOT NULL DEFAULT 4096 CHECK (n_ctx > 0),
    sha256      text,
    is_default  boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CHECK ((backend = 'llama_cpp' AND path IS NOT NULL) OR (backend = 'openai' AND base_url IS NOT NULL AND remote_model IS NOT NULL))
);
CREATE UNIQUE INDEX models_one_default ON models (is_default) WHERE is_default;
