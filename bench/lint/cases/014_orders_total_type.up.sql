SET LOCAL lock_timeout = '5s';
ALTER TABLE orders ALTER COLUMN total TYPE numeric(14, 2);
