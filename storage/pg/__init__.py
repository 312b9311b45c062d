"""The PostgreSQL backend (docs/postgresql.md): its connections and the storage interface over
a pool of them, its schema and the parity check against SQLite's, what its ledger writes
differently (ids from identity columns, a hash chain per member with anchors), audit, the
jobs' lock and the copy from SQLite. The operations, rules, plans and answers are the same
code as on SQLite; the storage functions choose through storage/sql.py where the two differ.
"""
