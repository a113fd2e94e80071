CREATE TABLE sessions (token text PRIMARY KEY, user_id bigint NOT NULL);
