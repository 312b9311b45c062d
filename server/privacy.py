"""Card numbers and phones are kept as keyed HMAC-SHA256 plus their last four digits.

The key comes from the environment (privacy.hmac_key_env, LOYALTY_HMAC_KEY by default) or
privacy.hmac_key; it is never written to the database, so a copy of the database alone
does not give the numbers back, not even by trying every possible card number. Look-ups
compute the HMAC of the number presented and search for that.

Key rotation. An HMAC cannot be recomputed under a new key without the number, which is
never stored, so a new key wraps the old hashes instead: under rotation `k2` a card's hash
is `~k2~` + HMAC(k2, its hash under the key before). The id in front says which key a
stored hash is under (a bare hash is under the first key); `loyalty privacy rotate-key`
wraps every stored card, phone and coupon code hash up to the key in force, the card
hash inside each stored receipt body and the hashes of the codes a receipt's row keeps it
used (storage/receipt_takes.py), beside the serving server; the fingerprints of
adjustments and offers taken under an earlier key become digests of their rows' fields.
Meanwhile look-ups try the hash under the key in force, then under each earlier key. A
copy of the database together with an earlier key (a leaked one) no longer gives the
numbers back: every key listed is needed, and none alone is enough.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
from datetime import datetime, timezone

import msgspec

from server.config import Config, ConfigError
from server.startup import StartupError, take_serve_lock
from storage import coupons, member_care, receipt_takes
from storage.ledger import digest_hex, iso, pack, unpack
from storage.sql import integrity_errors

log = logging.getLogger("loyalty.privacy")

# A server whose config sets clock.start is a test or demo server (the API contract says
# so); with no key configured it uses this one, and says so in its log.
TEST_CLOCK_KEY = "test-clock-only-not-a-secret-key"


ROTATED_MARK = "~"   # sorts after every hex digit: the hashes under one key are one range of an index


def marked(digest: str, key_id: str) -> str:
    """A digest taken under key `key_id` ("" the first key), marked with it as hashes are."""
    return f"{ROTATED_MARK}{key_id}{ROTATED_MARK}{digest}" if key_id else digest


class Digest(str):
    """A hash under the key in force that also carries the hashes of the same number under
    the earlier keys, newest first (`older`): rows the rotation has not wrapped yet."""
    older: tuple[str, ...] = ()


def candidates(digest: str) -> tuple[str, ...]:
    """The hashes to look a number up by, the key in force first."""
    return (digest, *getattr(digest, "older", ()))


_SHA256_BLOCK_BYTES = 64
_IPAD = bytes(b ^ 0x36 for b in range(256))   # RFC 2104's pads, as translation tables
_OPAD = bytes(b ^ 0x5C for b in range(256))


class KeyedSha256:
    """HMAC-SHA256 (RFC 2104) under one key, keyed once. `hmac.digest` sets the key up
    again on every call, which costs as much as hashing a card number: every receipt hashes
    its card and its body, and each code it carries. Copying the two keyed states is cheap."""

    def __init__(self, key: bytes):
        if len(key) > _SHA256_BLOCK_BYTES:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_SHA256_BLOCK_BYTES, b"\0")
        self._inner = hashlib.sha256(key.translate(_IPAD))
        self._outer = hashlib.sha256(key.translate(_OPAD))

    def digest(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


class Privacy:
    def __init__(self, key: bytes, rotations: list[tuple[str, bytes]] | tuple = ()):
        """rotations: (id, key) of each key rotation, oldest first; the last is in force."""
        for k in (key, *(k for _, k in rotations)):
            if len(k) < 16:
                raise ValueError("the HMAC key must be at least 16 bytes")
        self._first = KeyedSha256(key)
        self._rotations = [(key_id, KeyedSha256(k)) for key_id, k in rotations]
        self._key = self._rotations[-1][1] if self._rotations else self._first
        self.key_ids = ["", *(i for i, _ in self._rotations)]   # "" names the first key

    @property
    def key_in_force(self) -> str:
        return self.key_ids[-1]

    def _wrap(self, kind: bytes, digest: str, rotation: int) -> str:
        key_id, key = self._rotations[rotation]
        return marked(key.digest(kind + b"\0" + digest.encode()).hex(), key_id)

    def _mac(self, kind: bytes, value: str) -> str:
        digest = self._first.digest(kind + b"\0" + value.encode()).hex()
        if not self._rotations:
            return digest
        chain = [digest]
        for i in range(len(self._rotations)):
            chain.append(self._wrap(kind, chain[-1], i))
        out = Digest(chain[-1])
        out.older = tuple(reversed(chain[:-1]))
        return out

    def key_of(self, stored: str) -> int | None:
        """The position in key_ids of the key a stored hash is under; None for a key not listed."""
        if not stored.startswith(ROTATED_MARK):
            return 0
        key_id = stored[1:stored.find(ROTATED_MARK, 1)]
        return self.key_ids.index(key_id) if key_id and key_id in self.key_ids else None

    def rewrap(self, kind: str, stored: str) -> str | None:
        """A stored card or phone hash wrapped up to the key in force; None when it is under
        a key not listed (it cannot be found any more, nor wrapped)."""
        if self.key_of(stored) is None:
            return None
        return self.forms(kind, stored)[-1]

    def forms(self, kind: str, stored: str) -> tuple[str, ...]:
        """A stored card or phone hash and the same wrapped under each later key, the key in
        force last: every hash of the same number a row written since may hold (what is
        written is under the key in force; `rotate-key` wraps coupon codes' cards before the
        cards, so no row holds a hash under an earlier key than the card's row). Only the
        stored hash for one under a key not listed."""
        position = self.key_of(stored)
        if position is None:
            return (stored,)
        chain = [stored]
        for rotation in range(position, len(self._rotations)):
            chain.append(self._wrap(kind.encode(), chain[-1], rotation))
        return tuple(chain)

    def key_checks(self) -> list[tuple[str, str]]:
        """(id, check value) of each key, in order: an HMAC of a fixed text, which tells two
        keys apart without giving either back."""
        keys = [self._first, *(k for _, k in self._rotations)]
        return [(key_id, key.digest(b"key check").hex()[:32]) for key_id, key in zip(self.key_ids, keys)]

    def in_force_range(self) -> tuple[str, str] | None:
        """[low, high) holding exactly the hashes under the key in force, when it is a rotation."""
        if not self._rotations:
            return None
        key_id = self.key_in_force
        return f"{ROTATED_MARK}{key_id}{ROTATED_MARK}", f"{ROTATED_MARK}{key_id}\x7f"

    def card(self, card: str) -> str:
        return self._mac(b"card", card)

    def coupon(self, code: str) -> str:
        """code: as storage/coupons.normalize gives it."""
        return self._mac(b"coupon", code)

    def phone(self, phone: str) -> str:
        return self._mac(b"phone", normalize_phone(phone))

    def body_digest(self, body: bytes) -> str:
        """A keyed digest of a request body: bodies with card numbers in them cannot be guessed back."""
        return self._key.digest(b"body\0" + body).hex()

    @staticmethod
    def card_last4(card: str) -> str:
        return card[-4:]

    @staticmethod
    def phone_last4(phone: str) -> str:
        return normalize_phone(phone)[-4:]


def normalize_phone(phone: str) -> str:
    """`+380 (50) 123-45-67` and `+380501234567` are the same phone."""
    digits = "".join(ch for ch in phone if ch.isdigit())
    return digits or phone


def privacy_from_config(config: Config, environ=None) -> Privacy:
    environ = os.environ if environ is None else environ
    p = config.privacy
    source, key = None, environ.get(p.hmac_key_env) or None
    if key:
        source = f"environment variable {p.hmac_key_env}"
    elif p.hmac_key:
        source, key = "privacy.hmac_key", p.hmac_key
    elif p.demo_insecure_hmac_key:
        source, key = "privacy.demo_insecure_hmac_key (a demo key: set a real one in production)", \
            p.demo_insecure_hmac_key
    elif config.clock.start is not None:
        source, key = "the built-in test key (clock.start marks a test or demo server)", TEST_CLOCK_KEY
    if key is None:
        raise ConfigError("config", "privacy", f"no HMAC key for card numbers and phones: set the environment "
                          f"variable {p.hmac_key_env} (at least 16 characters) or privacy.hmac_key")
    if len(key.encode()) < 16:
        raise ConfigError("config", "privacy", f"the HMAC key from {source} is shorter than 16 bytes")
    if "demo" in source or "test" in source:
        log.warning("card numbers and phones are protected with %s", source)
    return Privacy(key.encode(), _rotations(p.hmac_key_rotations, environ))


def _rotations(listed, environ) -> list[tuple[str, bytes]]:
    out, seen = [], set()
    for i, r in enumerate(listed):
        where = f"privacy.hmac_key_rotations[{i}]"
        if r.id in seen:
            raise ConfigError("config", where, f"id {r.id} is listed twice")
        if (r.key_env is None) == (r.key is None):
            raise ConfigError("config", where, "give the key in exactly one of key_env and key")
        key = environ.get(r.key_env) if r.key_env else r.key
        if not key:
            raise ConfigError("config", where, f"the environment variable {r.key_env} is not set: without "
                              f"key {r.id} no card or phone hashed under it can be found")
        if len(key.encode()) < 16:
            raise ConfigError("config", where, f"key {r.id} is shorter than 16 bytes")
        seen.add(r.id)
        out.append((r.id, key.encode()))
    return out


# ---------------------------------------------------------------- loyalty privacy rotate-key

ROTATE_BATCH_ROWS = 1_000       # rows wrapped per write transaction: a few ms of the write lock
ROTATE_BATCH_ROWS_MAX = 10_000


class KeyNotListed(Exception):
    """Stored hashes under a key privacy does not list: they can be neither found nor wrapped."""


def rotate_key_command(config_path: str, batch_rows: int = ROTATE_BATCH_ROWS) -> int:
    """Wraps every stored card, phone and coupon code hash (and each receipt body's card hash)
    up to the key in force, in batches of their own transactions, beside the serving servers
    (or alone). Run again, it goes on where it stopped."""
    from server import databases
    try:
        config = databases.config_for_command(config_path)
        privacy = privacy_from_config(config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except databases.CannotOpen as e:
        print(e, file=sys.stderr)
        return 2
    if not 1 <= batch_rows <= ROTATE_BATCH_ROWS_MAX:
        print(f"--batch-rows must be 1 to {ROTATE_BATCH_ROWS_MAX}", file=sys.stderr)
        return 2
    lock = None
    if config.database.url is None and config.resolve(config.database.path).exists():
        try:
            lock = take_serve_lock(config.resolve(config.database.path))   # none may start on the old key meanwhile
        except StartupError:
            pass                            # a server serves: it must already use the key in force
    # PostgreSQL's servers share the database and take no such lock: one of them, started
    # on this config, must have recorded its keys (_check_keys), as beside a SQLite server.
    try:
        db = databases.open_existing(config)
    except databases.CannotOpen as e:
        print(e, file=sys.stderr)
        return 2
    try:
        return _rotate(db, privacy, batch_rows, alone=lock is not None)
    finally:
        db.close()
        if lock is not None:
            lock.release()


def _rotate(db, privacy: Privacy, batch_rows: int, alone: bool) -> int:
    from server.interrupt import INTERRUPTED_STATUS, Interrupted, StopBeforeWrites, stop_between_batches
    try:
        with stop_between_batches() as stop:
            return _rotate_all(StopBeforeWrites(db, stop), privacy, batch_rows, alone)
    except Interrupted:
        print("interrupted (Ctrl-C): the hashes counted above are wrapped; run it again, it goes on where it "
              "stopped", file=sys.stderr)
        return INTERRUPTED_STATUS


def _rotate_all(db, privacy: Privacy, batch_rows: int, alone: bool) -> int:
    try:
        refused = _check_keys(db, privacy, alone)
        if refused:
            print(refused, file=sys.stderr, flush=True)
            return 2
        # The cards codes are bound to first: a card taken out of use meanwhile takes its codes
        # along by the card's stored hash wrapped up to the key in force (Privacy.forms),
        # which a code's card under an earlier key than the card's row would not match.
        total = _rotate_table(db, privacy, "coupon_codes", "card", "card", batch_rows)
        for table, column, kind in member_care.REKEYED:
            total += _rotate_table(db, privacy, table, column, kind, batch_rows)
        total += _rotate_table(db, privacy, "coupon_codes", "code", "coupon", batch_rows, coupons.rewrap_codes)
        total += _rotate_bodies(db, privacy, batch_rows)
        for table, key, columns in member_care.FINGERPRINTED:
            total += _rotate_fingerprints(db, privacy, table, key, columns, batch_rows)
        print(f"done: {total} hash(es) wrapped; every card, phone and coupon code hash is under "
              f"{_key_name(privacy.key_in_force)}", flush=True)
        return 0
    except KeyNotListed as e:
        print(e, file=sys.stderr, flush=True)
        return 1


def _check_keys(db, privacy: Privacy, alone: bool) -> str | None:
    """Why the hashes cannot be wrapped now, or None. Beside a serving server, only once it
    has taken up the key in force: it would not find the wrapped hashes otherwise."""
    if alone:
        now = iso(datetime.now(timezone.utc))
        return db.write_sync(lambda c: member_care.record_keys(c, privacy.key_checks(), now))
    recorded = db.read_sync(member_care.recorded_keys)
    if recorded != privacy.key_checks():
        return (f"the serving server does not use the keys of this config (in force: "
                f"{_key_name(recorded[-1][0]) if recorded else 'none recorded'}): restart it with this "
                "config first, so that it finds the hashes this wraps")
    return None


def command_keys_problem(conn, privacy: Privacy) -> str | None:
    """Why a command may not hash cards, phones or codes with this config's keys on this
    database, or None. The server records its keys at start (record_keys); a command must use
    exactly those: without one of them it would not find a stored card and would enrol it
    again, and with one the server has not taken up its hashes would be ones no server finds.
    A database no server has started on yet has none recorded and is not judged."""
    recorded = member_care.recorded_keys(conn)
    if not recorded:
        return None
    if refused := member_care.keys_problem(recorded, privacy.key_checks()):
        return refused
    if len(privacy.key_checks()) > len(recorded):
        return (f"{_key_name(privacy.key_in_force)} is not in use on this database yet: restart the server "
                "with this config first, so that it finds the hashes made under it")
    return None


def _key_name(key_id: str) -> str:
    return f"key {key_id}" if key_id else "the first key (privacy.hmac_key_env or hmac_key)"


def _rotate_table(db, privacy: Privacy, table: str, column: str, kind: str, batch_rows: int,
                  rewrap=None) -> int:
    """rewrap(conn, pairs): writes each (stored, wrapped) pair; by default in place."""
    if rewrap is None:
        def rewrap(conn, pairs):
            return member_care.rewrap(conn, table, column, pairs)
    in_force = privacy.in_force_range()
    left = db.read_sync(lambda c: member_care.count_stale(c, table, column, in_force))
    done = 0
    while left:
        try:
            wrapped = db.write_sync(lambda c: _rotate_batch(c, privacy, table, column, kind, batch_rows, rewrap))
        except integrity_errors():
            raise KeyNotListed(_already_wrapped(db, privacy, table, column, kind, batch_rows)) from None
        if not wrapped:
            break
        done += wrapped
        print(f"{table}.{column}: {done} of {left} wrapped", flush=True)
    return done


def _already_wrapped(db, privacy: Privacy, table: str, column: str, kind: str, batch_rows: int) -> str:
    """Why a batch could not be wrapped: the wrapped hash is stored already, which only a card
    enrolled again under the new key while its row was still under an earlier one makes (as
    versions before this one allowed). Names both members, so that they can be merged."""
    def read(conn):
        stale = member_care.stale_hashes(conn, table, column, privacy.in_force_range(), batch_rows)
        if table not in ("cards", "retired_cards"):
            return []
        pairs = []
        for old in dict.fromkeys(stale):
            new = _wrapped(privacy, kind, old, f"{table}.{column}")
            row = conn.execute(f"SELECT (SELECT member_id FROM {table} WHERE {column} = ?), "
                               f"(SELECT member_id FROM {table} WHERE {column} = ?)", (old, new)).fetchone()
            if row[1] is not None:
                pairs.append(f"m_{row[0]} (under the earlier key) and m_{row[1]}")
        return pairs
    pairs = db.read_sync(read)
    if not pairs:
        return f"{table}.{column}: a wrapped hash is stored already; nothing of this batch was written"
    return (f"{table}.{column}: the same card is stored under an earlier key and under the key in force, enrolled "
            f"twice during the rotation: {'; '.join(pairs[:10])}{' ...' if len(pairs) > 10 else ''}. Merge the "
            "second member of each pair into the first (POST /v1/admin/members/merge), then run this again")


def _rotate_batch(conn, privacy: Privacy, table: str, column: str, kind: str, batch_rows: int, rewrap) -> int:
    stale = member_care.stale_hashes(conn, table, column, privacy.in_force_range(), batch_rows)
    pairs = [(old, _wrapped(privacy, kind, old, f"{table}.{column}")) for old in dict.fromkeys(stale)]
    return rewrap(conn, pairs)


def _wrapped(privacy: Privacy, kind: str, stored: str, where: str) -> str:
    new = privacy.rewrap(kind, stored)
    if new is None:
        key_id = stored[1:stored.find(ROTATED_MARK, 1)]
        raise KeyNotListed(f"{where}: hashes under key {key_id!r}, which privacy.hmac_key_rotations "
                           "does not list: list it again (in its place) so they can be found and wrapped")
    return new


def _rotate_bodies(db, privacy: Privacy, batch_rows: int) -> int:
    """Each stored receipt body's card hash wrapped like the card's, its fingerprint taken
    again from the new body (a retry is then compared under the key in force first), and
    the codes' hashes its takes keep wrapped like the codes'. Bodies are not indexed by the
    hash in them, so every receipt with a card is read, a batch of rows at a time in rowid
    order; a run again reads them all again and rewrites none twice."""
    after, done = 0, 0
    while (batch := db.write_sync(lambda c: _rotate_bodies_batch(c, privacy, after, batch_rows))) is not None:
        after, wrapped = batch
        if wrapped:
            done += wrapped
            print(f"receipts (bodies, codes used): {done} wrapped", flush=True)
    return done


def _rotate_bodies_batch(conn, privacy: Privacy, after: int, batch_rows: int) -> tuple[int, int] | None:
    rows = member_care.receipt_bodies(conn, after, batch_rows)
    if not rows:
        return None
    changed, recorded = [], []
    for rowid, packed, fingerprint, used in rows:
        body = unpack(packed)
        new_body = _rekeyed_body(privacy, body)
        if new_body is not None:
            changed.append((pack(new_body), _fingerprint_again(fingerprint, body, new_body), rowid))
        new_takes = _rekeyed_takes(privacy, used)
        if new_takes is not None:
            recorded.append((new_takes, rowid))
    member_care.rewrite_bodies(conn, changed)
    member_care.rewrite_takes(conn, recorded)
    return rows[-1][0], len({row[-1] for row in changed} | {row[-1] for row in recorded})   # receipts rewritten


def _rekeyed_takes(privacy: Privacy, stored: bytes | None) -> bytes | None:
    """A receipt's takes (storage/receipt_takes.py) with its codes' hashes wrapped up to the key in
    force, as their rows are; None when there is nothing to wrap."""
    record = receipt_takes.decode(stored)
    last = len(privacy.key_ids) - 1
    if all(privacy.key_of(code) == last for code in record.codes):
        return None
    return receipt_takes.encode([_wrapped(privacy, "coupon", code, "receipts.takes") for code in record.codes],
                                record.charges)


def _rotate_fingerprints(db, privacy: Privacy, table: str, key: str, columns: tuple[str, ...],
                         batch_rows: int) -> int:
    """Fingerprints of adjustments or offers taken under an earlier key: a body with a card's
    hash under that key, which cannot be taken again without the card, so each becomes the
    digest of its row's fields that m031 made of the unkeyed ones, which a retry is then
    compared by."""
    in_force, done = privacy.in_force_range(), 0
    while in_force and (changed := db.write_sync(
            lambda c: member_care.fingerprints_to_fields(c, table, key, columns, in_force, batch_rows))):
        done += changed
        print(f"{table}.body_sha256: {done} replaced", flush=True)
    return done


def _rekeyed_body(privacy: Privacy, body: bytes) -> bytes | None:
    """The canonical body (server/schema.py canonical) with its card's hash wrapped up to the
    key in force; None when it is under that key already or has no card."""
    card = msgspec.json.decode(body).get("card")
    if card is None or privacy.key_of(card) == len(privacy.key_ids) - 1:
        return None
    field = b'"card":' + msgspec.json.encode(card)
    return body.replace(field, b'"card":' + msgspec.json.encode(_wrapped(privacy, "card", card, "receipts.body")), 1)


def _fingerprint_again(stored: bytes | str, body: bytes, new_body: bytes) -> bytes | str:
    """The fingerprint of the new body taken as the stored one was taken from the old body:
    a confirm's (its SHA-256) or an import's (server/import_cli.py imported_fingerprint)."""
    from server.import_cli import imported_fingerprint
    old = digest_hex(stored)
    if old == hashlib.sha256(body).hexdigest():
        new = hashlib.sha256(new_body).digest()
    elif old == imported_fingerprint(body).hex():
        new = imported_fingerprint(new_body)
    else:
        return stored       # taken some other way: kept (a retry of it is compared under every key's hash)
    return new if isinstance(stored, bytes) else new.hex()
