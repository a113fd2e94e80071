SET LOCAL lock_timeout = '5s';
ALTER TABLE purchases ADD COLUMN token uuid NOT NULL DEFAULT gen_random_uuid();
