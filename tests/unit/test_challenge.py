"""shared/challenge.py: key derivation, the transcript, proofs and signatures, without sockets.
Any change to a field of the transcript makes both the proof and the signature fail."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st

from shared import challenge

TOKEN = "bh_0123456789ab_" + "s" * 43
CN, SN = b"c" * 32, b"n" * 32


def test_fixed_vectors() -> None:
    keys = challenge.derive_keys("token")
    assert len(keys.client_key) == len(keys.server_key) == 32 and keys.client_key != keys.server_key
    assert keys.stored_key == hashlib.sha256(keys.client_key).digest()
    t = challenge.transcript("-", b"\x00" * 32, b"\x01" * 32, b"spki")
    # length-prefixed: moving a byte between fields changes T
    assert t != challenge.transcript("-", b"\x00" * 31, b"\x00\x01" + b"\x01" * 31, b"spki")
    assert challenge.token_id_of(TOKEN) == "0123456789ab" and challenge.token_id_of("plain-shared") == "-"


@pytest.mark.parametrize(
    "key",
    [
        ec.generate_private_key(ec.SECP256R1()),
        rsa.generate_private_key(65537, 2048),
        ed25519.Ed25519PrivateKey.generate(),
    ],
    ids=["ecdsa", "rsa-pss", "ed25519"],
)
def test_signature_round_trip(key: challenge.SigningKey) -> None:
    spki = challenge.spki_of(key)
    t = challenge.transcript("-", CN, SN, spki)
    sig = challenge.sign(key, t)
    assert challenge.verify(spki, t, sig)
    assert not challenge.verify(spki, challenge.transcript("-", CN, b"x" * 32, spki), sig)
    other = challenge.spki_of(ec.generate_private_key(ec.SECP256R1()))
    assert not challenge.verify(other, t, sig)
    assert not challenge.verify(b"not a key", t, sig)


def test_proof_accepts_the_token_only() -> None:
    keys = challenge.derive_keys(TOKEN)
    t = challenge.transcript("0123456789ab", CN, SN, b"spki")
    proof = challenge.client_proof(keys, t)
    assert challenge.check_proof(keys.stored_key, t, proof)
    assert not challenge.check_proof(challenge.derive_keys(TOKEN + "x").stored_key, t, proof)
    assert not challenge.check_proof(keys.stored_key, t, proof[:-1])
    assert TOKEN.encode() not in proof and keys.client_key != proof


@given(st.sampled_from(["id", "cnonce", "snonce", "spki"]), st.binary(min_size=1, max_size=8))
def test_any_changed_field_breaks_the_proof(which: str, extra: bytes) -> None:
    keys = challenge.derive_keys(TOKEN)
    fields = {"id": "0123456789ab", "cnonce": CN, "snonce": SN, "spki": b"spki"}
    t = challenge.transcript(fields["id"], fields["cnonce"], fields["snonce"], fields["spki"])  # type: ignore[arg-type]
    proof = challenge.client_proof(keys, t)
    changed = dict(fields)
    changed[which] = fields[which] + (extra.hex() if which == "id" else extra)  # type: ignore[operator]
    t2 = challenge.transcript(changed["id"], changed["cnonce"], changed["snonce"], changed["spki"])  # type: ignore[arg-type]
    assert not challenge.check_proof(keys.stored_key, t2, proof)


def test_header_round_trip_and_malformed_values() -> None:
    value = challenge.format_header(id="-", cnonce=CN)
    assert value.startswith("challenge-v1 ")
    assert challenge.parse_header(value) == {"id": "-", "cnonce": CN}
    for bad in ("bearer x", "challenge-v1 cnonce", "challenge-v1 c-n=AA", "challenge-v1 cnonce=***"):
        with pytest.raises(ValueError):
            challenge.parse_header(bad)
