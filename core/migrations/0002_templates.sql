-- Templates: named prompt templates with immutable numbered versions, movable labels and their history.
CREATE TABLE templates (
    id             bigserial PRIMARY KEY,
    name           text NOT NULL UNIQUE CHECK (name ~ '^[a-z0-9][a-z0-9._-]{0,99}$'),
    description    text NOT NULL DEFAULT '',
    category       text NOT NULL DEFAULT '',
    tags           text[] NOT NULL DEFAULT '{}',
    owner          text NOT NULL DEFAULT '',
    active         boolean NOT NULL DEFAULT true,
    latest_version integer NOT NULL DEFAULT 0 CHECK (latest_version >= 0),  -- the implicit `latest` label
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX templates_updated ON templates (updated_at DESC, id DESC);
CREATE INDEX templates_category ON templates (category);
CREATE INDEX templates_tags ON templates USING gin (tags);

CREATE TABLE template_versions (
    id                 bigserial PRIMARY KEY,
    template_id        bigint NOT NULL REFERENCES templates (id) ON DELETE CASCADE,
    version            integer NOT NULL CHECK (version >= 1),
    kind               text NOT NULL CHECK (kind IN ('chat', 'text')),
    messages           jsonb,          -- chat: [{"role": ..., "content": ...}, ...]
    text               text,           -- text: the single prompt
    params             jsonb NOT NULL DEFAULT '{}',
    input_schema       jsonb,
    output_schema      jsonb,
    variables          text[] NOT NULL DEFAULT '{}',
    content_sha256     text NOT NULL CHECK (content_sha256 ~ '^[0-9a-f]{64}$'),
    created_by         text NOT NULL DEFAULT '',
    created_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    change_description text NOT NULL DEFAULT '',
    rollback_of        integer,
    git_commit         text,
    UNIQUE (template_id, version),
    UNIQUE (id, template_id),
    CHECK ((kind = 'chat' AND jsonb_typeof(messages) = 'array' AND text IS NULL)
        OR (kind = 'text' AND text IS NOT NULL AND messages IS NULL)),
    CHECK (rollback_of IS NULL OR (rollback_of >= 1 AND rollback_of < version))
);
CREATE INDEX template_versions_sha ON template_versions (template_id, content_sha256);

-- Versions are immutable: any UPDATE is refused.
CREATE FUNCTION template_versions_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'template versions are immutable';
END $$;
CREATE TRIGGER template_versions_no_update BEFORE UPDATE ON template_versions
    FOR EACH ROW EXECUTE FUNCTION template_versions_immutable();

CREATE TABLE template_labels (
    template_id bigint NOT NULL REFERENCES templates (id) ON DELETE CASCADE,
    label       text NOT NULL CHECK (label ~ '^[a-z][a-z0-9._-]{0,62}$' AND label <> 'latest'),
    version_id  bigint NOT NULL,
    moved_by    text NOT NULL DEFAULT '',
    moved_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (template_id, label),
    FOREIGN KEY (version_id, template_id) REFERENCES template_versions (id, template_id)
);
CREATE INDEX template_labels_version ON template_labels (version_id);

CREATE TABLE template_label_events (
    id           bigserial PRIMARY KEY,
    template_id  bigint NOT NULL REFERENCES templates (id) ON DELETE CASCADE,
    label        text NOT NULL,
    from_version integer,   -- NULL: the label was created
    to_version   integer,   -- NULL: the label was removed
    moved_by     text NOT NULL DEFAULT '',
    moved_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    CHECK (from_version IS NOT NULL OR to_version IS NOT NULL)
);
CREATE INDEX template_label_events_template ON template_label_events (template_id, id);
