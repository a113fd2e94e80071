ALTER TABLE users DROP CONSTRAINT users_login_key;
