DROP TABLE sessions, audit, users;
