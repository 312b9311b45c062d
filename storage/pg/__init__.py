"""The PostgreSQL backend (docs/postgresql.md), being built: its connections, its schema and
the receipt path's writes. The rules, the plans and the answers are the SQLite backend's;
what differs is here: row locks per member instead of the one writer, ids from identity
columns, a hash chain per member, idempotency by the receipts' key.
"""
