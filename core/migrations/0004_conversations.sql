-- Conversations: one per end user, its ordered messages, key-value memory, operator interventions (audit trail),
-- guardrail rules and every guardrail hit, and the retention runs that purged old conversations.
CREATE TABLE conversations (
    id                bigserial PRIMARY KEY,
    user_id           text NOT NULL UNIQUE CHECK (user_id = btrim(user_id) AND length(user_id) BETWEEN 1 AND 200),
    state             text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'halted')),
    halted_reason     text,
    halted_by         text,
    halted_at         timestamptz,
    -- The template assigned by an operator; NULL: the configured default template (production label, else latest).
    template_name     text,
    template_label    text,
    template_version  integer CHECK (template_version IS NULL OR template_version >= 1),
    last_seq          integer NOT NULL DEFAULT 0,   -- the sequence number of the newest message (assigned under a row lock)
    created_at        timestamptz NOT NULL DEFAULT now(),
    last_activity     timestamptz NOT NULL DEFAULT now(),
    CHECK (template_label IS NULL OR template_version IS NULL),
    CHECK (template_name IS NOT NULL OR (template_label IS NULL AND template_version IS NULL)),
    CHECK ((state = 'halted') = (halted_at IS NOT NULL))
);
CREATE INDEX conversations_last_activity ON conversations (last_activity DESC);

CREATE TABLE conversation_messages (
    id              bigserial PRIMARY KEY,
    conversation_id bigint NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq             integer NOT NULL CHECK (seq >= 1),
    role            text NOT NULL CHECK (role IN ('user', 'assistant', 'system')),
    -- message: a user's message; reply: the model's answer; injection: an operator's message the AI sees;
    -- paused: the notice sent while the conversation is halted; blocked: the safe reply a guardrail substituted;
    -- error: the notice sent when generation failed.
    kind            text NOT NULL CHECK (kind IN ('message', 'reply', 'injection', 'paused', 'blocked', 'error')),
    content         text NOT NULL,
    in_context      boolean NOT NULL DEFAULT true,   -- whether later turns show it to the model
    reply_to        bigint REFERENCES conversation_messages (id) ON DELETE CASCADE,
    execution_id    bigint REFERENCES executions (id) ON DELETE SET NULL,
    status          text CHECK (status IN ('ok', 'cancelled', 'error', 'blocked', 'paused')),
    operator        text,
    flagged         boolean NOT NULL DEFAULT false,
    reviewed_by     text,
    reviewed_at     timestamptz,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (conversation_id, seq),
    CHECK ((kind = 'message') = (role = 'user')),
    CHECK ((kind = 'injection') = (role = 'system')),
    CHECK (kind <> 'injection' OR operator IS NOT NULL)
);
CREATE INDEX conversation_messages_flagged ON conversation_messages (conversation_id) WHERE flagged;
CREATE INDEX conversation_messages_execution ON conversation_messages (execution_id);
CREATE INDEX conversation_messages_created ON conversation_messages (created_at);

CREATE TABLE conversation_memory (
    conversation_id bigint NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    key             text NOT NULL CHECK (key ~ '^[A-Za-z_][A-Za-z0-9_]{0,63}$'),
    value           jsonb NOT NULL,
    updated_by      text NOT NULL DEFAULT '',
    updated_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (conversation_id, key)
);

-- The audit trail: every operator action on a conversation.
CREATE TABLE conversation_interventions (
    id              bigserial PRIMARY KEY,
    conversation_id bigint NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    action          text NOT NULL CHECK (action IN ('halt', 'resume', 'inject', 'assign_template', 'set_memory',
                                                     'delete_memory', 'review')),
    operator        text NOT NULL CHECK (operator <> ''),
    reason          text NOT NULL DEFAULT '',
    detail          jsonb NOT NULL DEFAULT '{}',
    message_id      bigint REFERENCES conversation_messages (id) ON DELETE SET NULL,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX conversation_interventions_conversation ON conversation_interventions (conversation_id, id);

CREATE TABLE guardrail_rules (
    id            bigserial PRIMARY KEY,
    name          text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9 ._-]{0,79}$'),
    kind          text NOT NULL CHECK (kind IN ('words', 'regex', 'max_length', 'email', 'phone', 'card')),
    words         text[],          -- words: the blocked words or phrases
    pattern       text,            -- regex: the regular expression (Python syntax, checked when saved)
    max_length    integer CHECK (max_length IS NULL OR max_length >= 1),
    template_name text,            -- NULL: every conversation; else only conversations on this template
    direction     text NOT NULL CHECK (direction IN ('input', 'output', 'both')),
    action        text NOT NULL CHECK (action IN ('block', 'redact', 'flag', 'halt')),
    replacement   text NOT NULL DEFAULT '[redacted]',
    enabled       boolean NOT NULL DEFAULT true,
    created_by    text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    CHECK ((kind = 'words') = (words IS NOT NULL AND cardinality(words) > 0)),
    CHECK ((kind = 'regex') = (pattern IS NOT NULL AND pattern <> '')),
    CHECK ((kind = 'max_length') = (max_length IS NOT NULL))
);

-- Every rule hit, with the message and the execution it concerned.
CREATE TABLE guardrail_events (
    id              bigserial PRIMARY KEY,
    rule_id         bigint REFERENCES guardrail_rules (id) ON DELETE SET NULL,
    rule_name       text NOT NULL,
    kind            text NOT NULL,
    direction       text NOT NULL CHECK (direction IN ('input', 'output')),
    action          text NOT NULL CHECK (action IN ('block', 'redact', 'flag', 'halt')),
    matches         integer NOT NULL CHECK (matches >= 1),
    excerpt         text,          -- what matched (left out when the rule redacts, so redacted text is not kept)
    user_id         text,
    conversation_id bigint REFERENCES conversations (id) ON DELETE CASCADE,
    message_id      bigint REFERENCES conversation_messages (id) ON DELETE CASCADE,
    execution_id    bigint REFERENCES executions (id) ON DELETE SET NULL,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX guardrail_events_conversation ON guardrail_events (conversation_id, id);
CREATE INDEX guardrail_events_message ON guardrail_events (message_id);

-- Purges of old conversations (on request or by the worker's hourly schedule).
CREATE TABLE conversation_purges (
    id              bigserial PRIMARY KEY,
    trigger         text NOT NULL CHECK (trigger IN ('manual', 'schedule')),
    operator        text NOT NULL DEFAULT '',
    older_than_days integer NOT NULL CHECK (older_than_days >= 1),
    conversations   integer NOT NULL,
    messages        integer NOT NULL,
    memory          integer NOT NULL,
    ran_at          timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX conversation_purges_trigger ON conversation_purges (trigger, ran_at DESC);
