-- upshift:allow index-without-concurrently audit_log holds a few hundred rows and is written once a day
CREATE INDEX audit_happened_at ON audit_log (happened_at);
-- upshift:allow missing-lock-timeout left from an earlier draft of this revision
SELECT 1;
