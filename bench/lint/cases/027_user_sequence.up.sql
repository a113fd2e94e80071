SET LOCAL lock_timeout = '5s';
ALTER TABLE users ADD COLUMN seq bigserial;
