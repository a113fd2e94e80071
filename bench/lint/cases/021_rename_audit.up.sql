SET LOCAL lock_timeout = '5s';
ALTER TABLE audit RENAME TO audit_log;
