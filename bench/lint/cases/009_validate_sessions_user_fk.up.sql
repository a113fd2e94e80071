ALTER TABLE sessions VALIDATE CONSTRAINT sessions_user_fk;
