-- Accounts (core/accounts.py): the people who use the workbench, their browser sessions, every login attempt (the
-- rate limits count them; they are also the record of who signed in from where) and the one-time links that create
-- the first admin. Projects, roles and API keys reference users (id) when they come.
CREATE TABLE users (
    id                   bigserial PRIMARY KEY,
    username             text NOT NULL UNIQUE CHECK (username ~ '^[a-z0-9][a-z0-9._-]{0,63}$'),
    display_name         text NOT NULL CHECK (length(display_name) BETWEEN 1 AND 200),
    password_hash        text NOT NULL,                 -- Argon2id, in the PHC string format
    active               boolean NOT NULL DEFAULT true,
    is_admin             boolean NOT NULL DEFAULT false, -- an instance admin: creates, deactivates and resets users
    created_at           timestamptz NOT NULL DEFAULT now(),
    created_by           bigint REFERENCES users (id) ON DELETE SET NULL,  -- NULL: the command line or a setup link
    last_login_at        timestamptz,
    password_changed_at  timestamptz NOT NULL DEFAULT now()
);

-- A browser session: the SHA-256 of the random token its cookie holds (the token itself is never stored). It ends
-- when revoked (logout, deactivation, a password reset), after an idle period (last_seen_at) or at expires_at.
CREATE TABLE user_sessions (
    token_hash    bytea PRIMARY KEY CHECK (length(token_hash) = 32),
    user_id       bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    revoked_at    timestamptz,
    address       text
);
CREATE INDEX user_sessions_user ON user_sessions (user_id) WHERE revoked_at IS NULL;
CREATE INDEX user_sessions_expires ON user_sessions (expires_at);

-- Every login attempt, with the name as typed (lower-cased) whether or not such a user exists.
CREATE TABLE login_attempts (
    id        bigserial PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    username  text NOT NULL,
    user_id   bigint REFERENCES users (id) ON DELETE SET NULL,
    address   text,
    outcome   text NOT NULL CHECK (outcome IN ('ok', 'bad_password', 'unknown_user', 'inactive', 'rate_limited'))
);
CREATE INDEX login_attempts_username ON login_attempts (username, at);
CREATE INDEX login_attempts_address ON login_attempts (address, at);

-- One-time links that create an admin (the first one, at first start): the SHA-256 of the token, valid once.
CREATE TABLE setup_tokens (
    token_hash  bytea PRIMARY KEY CHECK (length(token_hash) = 32),
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  text NOT NULL,
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz,
    used_by     bigint REFERENCES users (id) ON DELETE SET NULL
);
