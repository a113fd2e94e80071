-- upshift:no-transaction
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS users_login_idx ON users (login);
SET lock_timeout = '5s';
ALTER TABLE users ADD CONSTRAINT users_login_key UNIQUE USING INDEX users_login_idx;
