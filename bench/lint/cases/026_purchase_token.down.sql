ALTER TABLE purchases DROP COLUMN token;
