-- upshift:phase contract
-- The check validated in 017 lets SET NOT NULL skip its scan (PostgreSQL 12+).
SET LOCAL lock_timeout = '5s';
ALTER TABLE users ALTER COLUMN name SET NOT NULL;
ALTER TABLE users DROP CONSTRAINT users_name_not_null;
