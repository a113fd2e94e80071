ALTER TABLE orders DROP CONSTRAINT orders_created_past;
