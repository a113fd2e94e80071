-- The schema the later revisions change.
CREATE TABLE users (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email text,
    login text,
    name text,
    legacy_flag boolean,
    nickname text,
    bio text
);
CREATE INDEX users_login_lower ON users (lower(login));
CREATE TABLE audit (id bigint PRIMARY KEY, happened_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE sessions (token text PRIMARY KEY, user_id bigint NOT NULL REFERENCES users (id));
