DROP INDEX audit_happened_at;
