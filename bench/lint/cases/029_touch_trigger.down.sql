DROP TABLE notes;
DROP FUNCTION audit_touch();
