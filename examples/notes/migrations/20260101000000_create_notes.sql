-- Release 1.0.0: the notes table.
-- Ids are assigned by the service (max(id) + 1 under a write lock), which is portable
-- between SQLite and PostgreSQL; `title` has a default so that 2.0.0, which never
-- writes it, can insert while the column still exists.
-- upshift:phase expand
-- upshift:up
CREATE TABLE notes (
    id bigint NOT NULL PRIMARY KEY,
    title text NOT NULL DEFAULT '',
    body text NOT NULL,
    created_at timestamp NOT NULL DEFAULT CURRENT_TIMESTAMP
);
-- upshift:down
DROP TABLE notes;
