SET LOCAL lock_timeout = '5s';
ALTER TABLE users DROP COLUMN legacy_flag;
