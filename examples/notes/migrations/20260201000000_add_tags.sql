-- Release 2.0.0, expand: tags on notes. Additive only, so 1.0.0 keeps working.
-- upshift:parents 20260101000000
-- upshift:phase expand
-- upshift:up
CREATE TABLE tags (
    note_id bigint NOT NULL REFERENCES notes (id) ON DELETE CASCADE,
    name text NOT NULL,
    PRIMARY KEY (note_id, name)
);
CREATE INDEX tags_name_idx ON tags (name);
-- upshift:down
DROP INDEX tags_name_idx;
DROP TABLE tags;
