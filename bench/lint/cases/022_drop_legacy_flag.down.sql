ALTER TABLE users ADD COLUMN legacy_flag boolean;
