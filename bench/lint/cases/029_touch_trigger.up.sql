-- Function bodies are strings: the DROP TABLE inside is not run here.
CREATE FUNCTION audit_touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE 'DROP TABLE IF EXISTS scratch; ALTER TABLE users DROP COLUMN bio';
    NEW.happened_at := now();
    RETURN NEW;
END
$$;
CREATE TABLE notes (id bigint PRIMARY KEY, body text NOT NULL, author bigint);
ALTER TABLE notes ADD COLUMN title text NOT NULL;
CREATE INDEX notes_author ON notes (author);
ALTER TABLE notes ADD CONSTRAINT notes_author_fk FOREIGN KEY (author) REFERENCES users (id);
