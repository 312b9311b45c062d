"""Card, phone and code hashes stay HMAC-SHA256 exactly: a database written by any earlier
version finds its members by the same hashes, and an auditor can recompute one with any
HMAC tool."""
from __future__ import annotations

import hashlib
import hmac

import pytest

from server.privacy import KeyedSha256, Privacy

KEY = b"a-key-of-at-least-sixteen-bytes"


@pytest.mark.parametrize("key, message, expected", [
    # RFC 4231, test cases 2 and 6 (a key shorter than a block; one longer, hashed first)
    (b"Jefe", b"what do ya want for nothing?",
     "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"),
    (b"\xaa" * 131, b"Test Using Larger Than Block-Size Key - Hash Key First",
     "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"),
])
def test_the_keyed_hash_is_rfc_hmac_sha256(key, message, expected):
    assert KeyedSha256(key).digest(message).hex() == expected


@pytest.mark.parametrize("key_bytes", [16, 63, 64, 65, 200])
def test_every_key_length_hashes_as_the_standard_library_does(key_bytes):
    key = bytes(range(256))[:key_bytes]
    keyed = KeyedSha256(key)
    for message in (b"", b"card\x007000000000042", b"x" * 5000):
        assert keyed.digest(message) == hmac.digest(key, message, "sha256")


def test_stored_hashes_are_those_of_the_key_and_its_rotations():
    second = b"the-second-key-of-these-tests"
    first_only, rotated = Privacy(KEY), Privacy(KEY, [("k2", second)])
    under_first = hmac.digest(KEY, b"card\x007000000000042", "sha256").hex()
    assert first_only.card("7000000000042") == under_first
    wrapped = hmac.digest(second, b"card\x00" + under_first.encode(), "sha256").hex()
    assert rotated.card("7000000000042") == f"~k2~{wrapped}"
    assert rotated.body_digest(b"{}") == hmac.digest(second, b"body\x00{}", "sha256").hex()
    assert hashlib.sha256(b"").digest() != KeyedSha256(KEY).digest(b"")   # keyed, not a plain hash
