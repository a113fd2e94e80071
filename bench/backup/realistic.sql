-- bench/backup's realistic dataset: rows an application writes (hex digests, JSON documents,
-- timestamps, several indexes), so compression costs what it costs on real data; pgbench's
-- blank-padded filler makes gzip nearly free. :rows events (3,000,000 by default: about
-- 870 MB with indexes) over 200,000 accounts. Deterministic: the same rows every run.
SELECT setseed(0.19);

CREATE TABLE accounts (
    id integer PRIMARY KEY,
    email text NOT NULL UNIQUE,
    name text NOT NULL,
    plan text NOT NULL,
    created_at timestamptz NOT NULL
);
INSERT INTO accounts
SELECT i,
       'user' || i || '.' || substr(md5(i::text), 1, 8) || '@example.org',
       initcap(substr(md5('n' || i), 1, 7)) || ' ' || initcap(substr(md5('s' || i), 1, 9)),
       (ARRAY['free', 'team', 'business', 'enterprise'])[1 + (i % 4)],
       timestamptz '2020-01-01' + (i * interval '7 minutes')
FROM generate_series(1, 200000) AS i;

CREATE TABLE events (
    id bigint PRIMARY KEY,
    account_id integer NOT NULL REFERENCES accounts (id),
    kind text NOT NULL,
    payload jsonb NOT NULL,
    body text NOT NULL,
    created_at timestamptz NOT NULL
);
INSERT INTO events
SELECT i,
       1 + ((i::bigint * 7919) % 200000)::int,
       (ARRAY['page.view', 'invoice.paid', 'session.start', 'session.end', 'export.done'])[1 + (i % 5)],
       jsonb_build_object(
           'ip', '10.' || (i % 256) || '.' || ((i / 256) % 256) || '.' || (random() * 255)::int,
           'request_id', md5('r' || i),
           'amount', round((random() * 1000)::numeric, 2),
           'tags', jsonb_build_array(substr(md5('t' || i), 1, 6), substr(md5('u' || i), 1, 6))),
       md5(i::text) || ' ' || md5((i * 31)::text),
       timestamptz '2024-01-01' + random() * interval '700 days'
FROM generate_series(1, :rows) AS i;
CREATE INDEX events_account_created ON events (account_id, created_at);

CREATE TABLE audit_log (
    id bigserial PRIMARY KEY,
    actor text NOT NULL,
    action text NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO audit_log (actor, action, at)
SELECT 'user' || (i % 5000), 'changed ' || md5(i::text), timestamptz '2024-06-01' + i * interval '1 second'
FROM generate_series(1, 300000) AS i;
