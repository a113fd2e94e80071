SET LOCAL lock_timeout = '5s';
ALTER TABLE orders RENAME TO purchases;
-- The old code keeps reading and writing orders through a simple view.
CREATE VIEW orders AS SELECT * FROM purchases;
