-- Release 2.0.0, contract: 2.0.0 no longer reads or writes notes.title; 1.0.0 does, so
-- this runs only once 2.0.0 is verified. The down section brings the column back with
-- its default (the titles themselves are gone: restore a backup to get them back).
-- upshift:parents 20260201000000
-- upshift:phase contract
-- upshift:allow missing-lock-timeout the example runs on SQLite too, which has no SET LOCAL, and holds no long transactions
-- upshift:up
ALTER TABLE notes DROP COLUMN title;
-- upshift:down
ALTER TABLE notes ADD COLUMN title text NOT NULL DEFAULT '';
