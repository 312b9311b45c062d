"""The two backends' schemas side by side: what SQLite's migrations (storage/schema.py) and
PostgreSQL's (storage/pg/schema.py) build, read back from each database's catalog and
compared table by table.

Compared: tables, columns in order, their types (through TYPE_TWINS), NOT NULL, which
columns have a default, primary keys, indexes (by table, columns, uniqueness and whether
partial; names may differ, a UNIQUE constraint is an index), foreign keys, which events
are refused by an append-only guard and which insert triggers keep other tables up to
date. Each difference is one line of words; schema.INTENDED_DIFFERENCES lists those the
PostgreSQL design chose. sqlite_origins says which SQLite migration made each table,
column and index, so a missing twin is named with the migration that lacks one.
"""
from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass, field

import sqlite_utils
from sqlite_utils.migrations import Migrations

# SQLite's declared type -> PostgreSQL's (information_schema's data_type); INTEGER is bigint
# unless the column is in schema.SMALL_INTEGER_COLUMNS.
TYPE_TWINS = {"INTEGER": "bigint", "TEXT": "text", "BLOB": "bytea", "REAL": "double precision"}
# Bookkeeping of each backend's migration runner, not the application's schema.
RUNNER_TABLES = {"_sqlite_migrations", "sqlite_sequence", "_loyalty_migrations"}
EXPRESSION = "(expression)"
_TRIGGER = re.compile(r"\b(?:BEFORE|AFTER|INSTEAD\s+OF)\s+(INSERT|UPDATE|DELETE)\b.*?\bON\s+(\w+)",
                      re.IGNORECASE | re.DOTALL)
# pg_trigger.tgtype's bits for the events compared (TRUNCATE has no SQLite twin).
_PG_EVENTS = {4: "INSERT", 8: "DELETE", 16: "UPDATE"}


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    not_null: bool
    has_default: bool


@dataclass(frozen=True)
class Index:
    name: str
    columns: tuple[str, ...]
    unique: bool
    partial: bool

    def signature(self) -> tuple:
        return self.columns, self.unique, self.partial

    def __str__(self) -> str:
        kinds = [k for k, on in (("unique", self.unique), ("partial", self.partial)) if on]
        return f"({', '.join(self.columns)}){''.join(' ' + k for k in kinds)}"


@dataclass
class Table:
    columns: list[Column] = field(default_factory=list)
    primary_key: tuple[str, ...] = ()
    indexes: list[Index] = field(default_factory=list)
    foreign_keys: set[tuple[tuple[str, ...], str]] = field(default_factory=set)
    guarded: set[str] = field(default_factory=set)      # events refused (UPDATE, DELETE)
    upkeep: set[str] = field(default_factory=set)       # events whose trigger writes elsewhere


Shape = dict[str, Table]


def sqlite_shape(conn: sqlite3.Connection) -> Shape:
    names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    shape = {name: _sqlite_table(conn, name) for name in names if name not in RUNNER_TABLES}
    for (sql,) in conn.execute("SELECT sql FROM sqlite_master WHERE type = 'trigger'"):
        match = _TRIGGER.search(sql)
        if match and match.group(2) in shape:
            target = shape[match.group(2)].guarded if "RAISE(ABORT" in sql.upper() else shape[match.group(2)].upkeep
            target.add(match.group(1).upper())
    return shape


def _sqlite_table(conn: sqlite3.Connection, name: str) -> Table:
    info = conn.execute(f"PRAGMA table_info({name})").fetchall()
    # A primary key column counts as NOT NULL: PostgreSQL makes it so, and SQLite's rowid
    # alias cannot be NULL (its other keys could, a quirk nothing here relies on).
    table = Table(columns=[Column(n, t.upper(), bool(nn) or pk > 0, d is not None) for _, n, t, nn, d, pk in info],
                  primary_key=tuple(n for *_, n in sorted((pk, n) for _, n, _, _, _, pk in info if pk)))
    for _, index, unique, origin, partial in conn.execute(f"PRAGMA index_list({name})"):
        if origin != "pk":
            columns = tuple(c if c is not None else EXPRESSION
                            for _, _, c in conn.execute(f"PRAGMA index_info({index})"))
            table.indexes.append(Index(index, columns, bool(unique), bool(partial)))
    keys: dict[int, tuple[str, list[str]]] = {}
    for key_id, _, parent, column, *_ in conn.execute(f"PRAGMA foreign_key_list({name})"):
        keys.setdefault(key_id, (parent, []))[1].append(column)
    table.foreign_keys = {(tuple(columns), parent) for parent, columns in keys.values()}
    return table


def sqlite_origins(migrations: Migrations) -> dict[tuple[str, ...], str]:
    """("table", t), ("column", t, c), ("index", t, name) -> the SQLite migration that made it,
    found by applying the migrations one at a time to an empty database."""
    db = sqlite_utils.Database(sqlite3.connect(":memory:"))
    origins: dict[tuple[str, ...], str] = {}
    for step in migrations.pending(db):
        step.fn(db)
        for element in _elements(sqlite_shape(db.conn)):
            origins.setdefault(element, step.name)
    return origins


def _elements(shape: Shape):
    for name, table in shape.items():
        yield ("table", name)
        for column in table.columns:
            yield ("column", name, column.name)
        for index in table.indexes:
            yield ("index", name, index.name)


def pg_shape(conn) -> Shape:
    """The shape of the current schema of a PostgreSQL connection (storage.pg.connection)."""
    shape: Shape = {}
    for table, column, data_type, nullable, default in conn.execute(
            "SELECT table_name, column_name, data_type, is_nullable, column_default FROM information_schema.columns "
            "WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position"):
        if table not in RUNNER_TABLES:
            shape.setdefault(table, Table()).columns.append(Column(column, data_type, nullable == "NO",
                                                                   default is not None))
    _pg_indexes(conn, shape)
    _pg_foreign_keys(conn, shape)
    _pg_triggers(conn, shape)
    return shape


def _pg_indexes(conn, shape: Shape) -> None:
    # indkey lists every column an index holds, INCLUDE ones too (what SQLite's covering
    # indexes hold as key columns); 0 is an expression.
    for table, index, unique, primary, partial, attnums in conn.execute(
            "SELECT t.relname, c.relname, i.indisunique, i.indisprimary, i.indpred IS NOT NULL, i.indkey::int2[] "
            "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid "
            "JOIN pg_namespace n ON n.oid = t.relnamespace WHERE n.nspname = current_schema() ORDER BY c.relname"):
        if table not in shape:
            continue
        names = _pg_column_names(conn, table)
        columns = tuple(names[a] if a else EXPRESSION for a in attnums)
        if primary:
            shape[table].primary_key = columns
        else:
            shape[table].indexes.append(Index(index, columns, unique, partial))


def _pg_column_names(conn, table: str) -> dict[int, str]:
    return dict(conn.execute("SELECT attnum, attname FROM pg_attribute WHERE attrelid = ?::regclass AND attnum > 0 "
                             "AND NOT attisdropped", (table,)).fetchall())


def _pg_foreign_keys(conn, shape: Shape) -> None:
    for table, parent, attnums in conn.execute(
            "SELECT t.relname, p.relname, c.conkey FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid "
            "JOIN pg_class p ON p.oid = c.confrelid JOIN pg_namespace n ON n.oid = t.relnamespace "
            "WHERE c.contype = 'f' AND n.nspname = current_schema()"):
        if table in shape:
            names = _pg_column_names(conn, table)
            shape[table].foreign_keys.add((tuple(names[a] for a in attnums), parent))


def _pg_triggers(conn, shape: Shape) -> None:
    for table, tgtype, source in conn.execute(
            "SELECT c.relname, t.tgtype, p.prosrc FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE NOT t.tgisinternal AND n.nspname = current_schema()"):
        if table not in shape:
            continue
        target = shape[table].guarded if "RAISE EXCEPTION" in source.upper() else shape[table].upkeep
        target.update(event for bit, event in _PG_EVENTS.items() if tgtype & bit)


def differences(sqlite: Shape, pg: Shape, small_integers: frozenset[str] = frozenset()) -> list[str]:
    """Every way the two shapes differ, one line each; small_integers: the table.column of
    INTEGER columns PostgreSQL keeps as integer."""
    out = [f"table {t}: only on {side}" for t, side in _one_sided(sqlite, pg)]
    for name in sorted(set(sqlite) & set(pg)):
        out += _table_differences(name, sqlite[name], pg[name], small_integers)
    return out


def _one_sided(sqlite, pg) -> list[tuple[str, str]]:
    return sorted([(k, "SQLite") for k in set(sqlite) - set(pg)] + [(k, "PostgreSQL") for k in set(pg) - set(sqlite)])


def _table_differences(name: str, s: Table, p: Table, small_integers) -> list[str]:
    out = _column_differences(name, s, p, small_integers)
    if s.primary_key != p.primary_key:
        out.append(f"primary key of {name}: SQLite ({', '.join(s.primary_key)}), "
                   f"PostgreSQL ({', '.join(p.primary_key)})")
    out += _index_differences(name, s, p)
    for columns, parent in sorted(s.foreign_keys ^ p.foreign_keys):
        side = "SQLite" if (columns, parent) in s.foreign_keys else "PostgreSQL"
        out.append(f"foreign key {name}({', '.join(columns)}) -> {parent}: only on {side}")
    for kind, a, b in (("append-only guard", s.guarded, p.guarded), ("insert trigger", s.upkeep, p.upkeep)):
        for event in sorted(a ^ b):
            out.append(f"{kind} of {name} on {event}: only on {'SQLite' if event in a else 'PostgreSQL'}")
    return out


def _column_differences(name: str, s: Table, p: Table, small_integers) -> list[str]:
    sc, pc = {c.name: c for c in s.columns}, {c.name: c for c in p.columns}
    out = [f"column {name}.{c}: only on {side}" for c, side in _one_sided(sc, pc)]
    common_s = [c.name for c in s.columns if c.name in pc]
    common_p = [c.name for c in p.columns if c.name in sc]
    if common_s != common_p:
        out.append(f"columns of {name}: SQLite's order ({', '.join(common_s)}), PostgreSQL's ({', '.join(common_p)})")
    for c in common_s:
        a, b = sc[c], pc[c]
        twin = "integer" if a.type == "INTEGER" and f"{name}.{c}" in small_integers else TYPE_TWINS.get(a.type)
        if b.type != twin:
            out.append(f"column {name}.{c}: SQLite's {a.type} is PostgreSQL's {b.type}, not {twin}")
        if a.not_null != b.not_null:
            out.append(f"column {name}.{c}: NOT NULL only on {'SQLite' if a.not_null else 'PostgreSQL'}")
        if a.has_default != b.has_default:
            out.append(f"column {name}.{c}: a default only on {'SQLite' if a.has_default else 'PostgreSQL'}")
    return out


def _index_differences(name: str, s: Table, p: Table) -> list[str]:
    ps = {i.signature() for i in p.indexes}
    ss = {i.signature() for i in s.indexes}
    out = [f"index {i.name} on {name} {i}: only on SQLite" for i in s.indexes if i.signature() not in ps]
    return out + [f"index {i.name} on {name} {i}: only on PostgreSQL" for i in p.indexes if i.signature() not in ss]


def origin_of(difference: str, origins: dict[tuple[str, ...], str]) -> str | None:
    """The SQLite migration that made what a difference names, when it names something of SQLite's."""
    for pattern, kind in ((r"^table (\w+):", "table"), (r"^column (\w+)\.(\w+):", "column"),
                          (r"^index (\w+) on (\w+) ", "index")):
        match = re.match(pattern, difference)
        if match:
            key = ("index", match.group(2), match.group(1)) if kind == "index" else (kind, *match.groups())
            return origins.get(key)
    return None
