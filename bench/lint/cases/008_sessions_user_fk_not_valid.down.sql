ALTER TABLE sessions DROP CONSTRAINT sessions_user_fk;
