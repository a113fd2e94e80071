ALTER TABLE users VALIDATE CONSTRAINT users_name_not_null;
