"""Key layout: hash tags that survive any user id, one slot per user, an injective escaping."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from feature_store.keys import KeySpace, decode_user_id, encode_user_id

ODD_IDS = [
    "",
    "u42",
    "{",
    "}",
    "{}",
    "a{b}c",
    "}{",
    "%",
    "%7B",
    "a b",
    "a\tb",
    "\x00",
    "ü",
    "用户",
    "\ud800",
    "x" * 1000,
    "dare:fm:active",
]


@pytest.mark.parametrize("user_id", ODD_IDS)
def test_tag_is_non_empty_brace_free_and_reversible(user_id: str) -> None:
    tag = encode_user_id(user_id)
    assert tag and b"{" not in tag and b"}" not in tag
    assert decode_user_id(tag) == user_id


@pytest.mark.parametrize("user_id", ODD_IDS)
def test_all_keys_of_a_user_share_its_slot(user_id: str) -> None:
    keys = KeySpace("dare")
    seq, fm, history = keys.sequence(user_id), keys.fm(user_id), keys.fm_history(user_id)
    tag = encode_user_id(user_id)
    assert seq == b"dare:seq:{" + tag + b"}" and fm == b"dare:fm:{" + tag + b"}"
    assert history == b"dare:fmh:{" + tag + b"}"
    assert key_slot(seq) == key_slot(fm) == key_slot(history) == key_slot(b"{" + tag + b"}")


def test_escaping_is_injective_and_readable() -> None:
    tags = [encode_user_id(u) for u in ODD_IDS]
    assert len(set(tags)) == len(ODD_IDS)
    assert encode_user_id("user-42") == b"user-42"
    assert encode_user_id("a{b}") == b"a%7Bb%7D"
    assert encode_user_id("%7B") == b"%257B"
    assert encode_user_id("ü") == "ü".encode()
    # The pointer key has no tag, so no user key can ever equal it.
    assert KeySpace().fm_active() == b"dare:fm:active"


@pytest.mark.parametrize("namespace", ["", "a{b}", "has space", "x" * 65, "ü"])
def test_namespace_that_could_break_tags_is_refused(namespace: str) -> None:
    with pytest.raises(ValueError):
        KeySpace(namespace)


def test_log_keys_are_in_the_namespace() -> None:
    keys = KeySpace("prod")
    assert keys.log("impressions") == b"prod:log:impressions"
    assert keys.log("events") == b"prod:log:events"
    with pytest.raises(ValueError, match="no log stream"):
        keys.log("seq")
