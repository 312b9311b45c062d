"""`audit verify` on PostgreSQL: the members' chains and the anchors over them in place of
SQLite's one chain, then the same checks of balances, rule totals, receipts, returns and
accounts (storage.audit.LEDGER_CHECKS), all reading one snapshot."""
from __future__ import annotations

from storage.audit import LEDGER_CHECKS, AuditReport
from storage.pg import anchors
from storage.pg.connection import Connection
from storage.pg.ledger import verify_chains


def verify(conn: Connection, problems_max: int = 20) -> AuditReport:
    def in_snapshot(c: Connection) -> AuditReport:
        # Every check reads the same moment, as on SQLite, while servers keep writing.
        c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        return check(c, problems_max)
    return conn.transaction(in_snapshot, retries=0)


def check(conn: Connection, problems_max: int = 20) -> AuditReport:
    """verify's checks in the caller's transaction: `migrate sqlite-to-postgres` checks its
    copy before committing it."""
    report = AuditReport()
    report.postings = conn.execute("SELECT COUNT(*) FROM postings").fetchone()[0]
    report.problems += verify_chains(conn, problems_max)
    if len(report.problems) < problems_max:
        report.problems += anchors.verify(conn, problems_max - len(report.problems))
    for ledger_check in LEDGER_CHECKS:
        if len(report.problems) >= problems_max:
            break
        ledger_check(conn, report)
    report.chain_head = _anchor_head(conn)
    return report


def _anchor_head(conn: Connection) -> str:
    """The newest anchor's hash: what an operator writes down to compare later, as SQLite's
    chain head (none yet: the genesis hash)."""
    row = conn.execute("SELECT hash FROM chain_anchors ORDER BY id DESC LIMIT 1").fetchone()
    return bytes(row[0]).hex() if row else AuditReport().chain_head
