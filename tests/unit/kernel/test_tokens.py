"""The session token verifier: key ids and rotation, the lifetime cap, the channel claim."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from shared.errors import ChannelMismatchError, InvalidSessionError, SessionExpiredError
from shared.settings import CardDeskSettings
from shared.tokens import SessionClaims, TokenSigner, TokenVerifier

NOW = datetime(2026, 11, 29, 8, 0, tzinfo=UTC)
LIFETIME = timedelta(hours=2)


def key_pair() -> tuple[str, str]:
    """A fresh Ed25519 key pair as settings spell it: base64 seed, base64 public key."""
    private = Ed25519PrivateKey.generate()
    seed = private.private_bytes_raw()
    public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(seed).decode(), base64.b64encode(public).decode()


OLD_SEED, OLD_PUBLIC = key_pair()
NEW_SEED, NEW_PUBLIC = key_pair()


def claims(*, channel: str = "wechat-oa", issued_at: datetime = NOW,
           lifetime: timedelta = timedelta(minutes=30)) -> SessionClaims:
    return SessionClaims(kid="ignored: the signer sets it", session_id="s1",
                         citizen_ref="ab" * 32, channel=channel, level="realname",
                         issued_at=issued_at, expires_at=issued_at + lifetime)


def verifier(keys: dict[str, str]) -> TokenVerifier:
    return TokenVerifier(keys, LIFETIME)


def test_a_token_verifies_for_the_channel_that_started_the_session() -> None:
    token = TokenSigner(NEW_SEED, "k2").sign(claims())
    verified = verifier({"k2": NEW_PUBLIC}).verify(token, now=NOW, channel="wechat-oa")
    assert verified.kid == "k2"
    assert verified.channel == "wechat-oa"


def test_a_token_presented_by_another_channel_is_refused_channel_mismatch() -> None:
    token = TokenSigner(NEW_SEED, "k2").sign(claims(channel="wechat-oa"))
    with pytest.raises(ChannelMismatchError) as refused:
        verifier({"k2": NEW_PUBLIC}).verify(token, now=NOW, channel="mobile-app")
    assert refused.value.code == "channel_mismatch"


def test_after_rotation_old_tokens_still_verify_while_their_key_is_listed() -> None:
    old_token = TokenSigner(OLD_SEED, "k1").sign(claims())
    new_token = TokenSigner(NEW_SEED, "k2").sign(claims())
    rotated = verifier({"k1": OLD_PUBLIC, "k2": NEW_PUBLIC})
    assert rotated.verify(old_token, now=NOW, channel="wechat-oa").kid == "k1"
    assert rotated.verify(new_token, now=NOW, channel="wechat-oa").kid == "k2"


def test_a_token_of_a_retired_key_is_refused() -> None:
    old_token = TokenSigner(OLD_SEED, "k1").sign(claims())
    with pytest.raises(InvalidSessionError):
        verifier({"k2": NEW_PUBLIC}).verify(old_token, now=NOW, channel="wechat-oa")


def test_a_token_naming_a_known_kid_but_signed_by_another_key_is_refused() -> None:
    # Signed with the retired key, yet claiming the current key's id.
    forged = TokenSigner(OLD_SEED, "k2").sign(claims())
    with pytest.raises(InvalidSessionError):
        verifier({"k2": NEW_PUBLIC}).verify(forged, now=NOW, channel="wechat-oa")


def test_a_token_claiming_a_lifetime_beyond_the_cap_is_refused_though_correctly_signed() -> None:
    ten_years = TokenSigner(NEW_SEED, "k2").sign(claims(lifetime=timedelta(days=3650)))
    with pytest.raises(InvalidSessionError):
        verifier({"k2": NEW_PUBLIC}).verify(ten_years, now=NOW, channel="wechat-oa")


def test_a_token_issued_in_the_future_is_refused() -> None:
    later = TokenSigner(NEW_SEED, "k2").sign(claims(issued_at=NOW + timedelta(hours=1)))
    with pytest.raises(InvalidSessionError):
        verifier({"k2": NEW_PUBLIC}).verify(later, now=NOW, channel="wechat-oa")


def test_an_expired_token_is_refused_session_expired() -> None:
    token = TokenSigner(NEW_SEED, "k2").sign(claims(issued_at=NOW - timedelta(hours=1)))
    with pytest.raises(SessionExpiredError):
        verifier({"k2": NEW_PUBLIC}).verify(token, now=NOW, channel="wechat-oa")


@pytest.mark.parametrize("token", [
    "", "no-dot", "a.b.c", "!!!.???", "e30.AAAA",  # e30 is `{}`: claims missing
    base64.urlsafe_b64encode(b'{"kid": "k2"').decode() + ".AAAA",
])
def test_garbage_is_refused_invalid_session(token: str) -> None:
    with pytest.raises(InvalidSessionError):
        verifier({"k2": NEW_PUBLIC}).verify(token, now=NOW, channel="wechat-oa")


def test_the_settings_give_the_current_key_under_its_id_and_the_listed_older_ones() -> None:
    settings = CardDeskSettings(session_key_id="k2", session_public_key=NEW_PUBLIC,
                                session_signing_key=NEW_SEED,
                                session_public_keys={"k1": OLD_PUBLIC},
                                session_max_lifetime_seconds=3600)
    built = TokenVerifier.from_settings(settings)
    signer = TokenSigner.from_settings(settings)
    assert built.max_lifetime == timedelta(hours=1)
    assert built.verify(signer.sign(claims()), now=NOW, channel="wechat-oa").kid == "k2"
    old_token = TokenSigner(OLD_SEED, "k1").sign(claims())
    assert built.verify(old_token, now=NOW, channel="wechat-oa").kid == "k1"
    with pytest.raises(InvalidSessionError):
        built.verify(signer.sign(claims(lifetime=timedelta(hours=2))), now=NOW,
                     channel="wechat-oa")


def test_a_repeated_token_is_checked_once_but_still_expires_and_still_binds_its_channel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    check = verifier({"k2": NEW_PUBLIC})
    token = TokenSigner(NEW_SEED, "k2").sign(claims())
    signature_checks = 0
    signed_claims = TokenVerifier._signed_claims

    def counting(self: TokenVerifier, presented: str) -> SessionClaims:
        nonlocal signature_checks
        signature_checks += 1
        return signed_claims(self, presented)

    monkeypatch.setattr(TokenVerifier, "_signed_claims", counting)
    for _ in range(3):
        assert check.verify(token, now=NOW, channel="wechat-oa").session_id == "s1"
    assert signature_checks == 1
    with pytest.raises(ChannelMismatchError):
        check.verify(token, now=NOW, channel="app")
    with pytest.raises(SessionExpiredError):
        check.verify(token, now=NOW + timedelta(hours=1), channel="wechat-oa")
    assert signature_checks == 1


def test_a_token_differing_from_a_remembered_one_in_its_signature_is_checked_and_refused() -> None:
    check = verifier({"k2": NEW_PUBLIC})
    token = TokenSigner(NEW_SEED, "k2").sign(claims())
    check.verify(token, now=NOW, channel="wechat-oa")
    body, signature = token.split(".")
    forged = body + "." + ("A" if signature[0] != "A" else "B") + signature[1:]
    with pytest.raises(InvalidSessionError):
        check.verify(forged, now=NOW, channel="wechat-oa")


def test_only_so_many_tokens_are_remembered() -> None:
    check = TokenVerifier({"k2": NEW_PUBLIC}, LIFETIME, remembered=2)
    signer = TokenSigner(NEW_SEED, "k2")
    tokens = [signer.sign(claims(issued_at=NOW - timedelta(minutes=i))) for i in range(5)]
    for token in tokens:
        check.verify(token, now=NOW, channel="wechat-oa")
    assert list(check._authentic) == tokens[-2:]
