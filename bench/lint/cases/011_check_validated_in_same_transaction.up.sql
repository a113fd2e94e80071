SET LOCAL lock_timeout = '5s';
ALTER TABLE orders ADD CONSTRAINT orders_created_past CHECK (created_at <= now()) NOT VALID;
ALTER TABLE orders VALIDATE CONSTRAINT orders_created_past;
