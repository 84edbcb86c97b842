"""relay.json_body without I/O: RFC 8259 decides, not orjson."""

from __future__ import annotations

from decimal import Decimal

import pytest

from relay.json_body import MAX_DEPTH, BodyRefused, parse_object


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"name":"Nora \\ud83d"}', {"name": "Nora \ufffd"}),
        (b'{"\\udc00k":"v"}', {"\ufffdk": "v"}),
        (
            b'{"pair":"\\ud83d\\ude00","lone":["\\ud800"]}',
            {"pair": "\U0001f600", "lone": ["\ufffd"]},
        ),
        (b'{"n":1e400}', {"n": float("inf")}),
        (b'{"n":-1e400}', {"n": float("-inf")}),
        (b'{"n":' + b"7" * 5000 + b"}", {"n": Decimal("7" * 5000)}),
        (b'{"n":' + b"9" * 400 + b"}", {"n": int("9" * 400)}),
    ],
    ids=[
        "lone-high",
        "lone-in-key",
        "pair-and-lone",
        "1e400",
        "-1e400",
        "5000-digits",
        "400-digits",
    ],
)
def test_json_orjson_refuses_is_read(raw: bytes, expected: dict[str, object]) -> None:
    """Valid RFC 8259 that orjson refuses is read; lone surrogates read as U+FFFD."""
    assert parse_object(raw) == expected


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b'{"n":NaN,"s":"\\ud800"}', "invalid_json"),
        (b'{"n":Infinity,"s":"\\ud800"}', "invalid_json"),
        (b'{"n":-Infinity,"m":1e400}', "invalid_json"),
        (b'{"s":"\\ud800"', "invalid_json"),
        (b'{"s":"\xed\xa0\x80"}', "invalid_json"),  # a surrogate encoded in the bytes: not UTF-8
        (b"\xff\xfe{\x00}\x00", "invalid_json"),  # UTF-16
        (b'["\\ud800"]', "not_object"),
        (b"[" * (MAX_DEPTH + 1) + b'"\\ud800"' + b"]" * (MAX_DEPTH + 1), "too_deep"),
        (b'{"a":' + b"[" * MAX_DEPTH + b'"\\ud800"' + b"]" * MAX_DEPTH + b"}", "too_deep"),
        (b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}", "too_deep"),
    ],
    ids=["nan", "infinity", "minus-infinity", "truncated", "utf8-surrogate", "utf16", "array",
         "deep-array", "513-levels", "5001-levels"],
)  # fmt: skip
def test_what_rfc_8259_forbids_is_refused(raw: bytes, code: str) -> None:
    """NaN and the infinities, bytes that are not UTF-8, truncation, a non-object, and
    nesting beyond the limit are refused with their code, whichever parser read them."""
    with pytest.raises(BodyRefused) as refused:
        parse_object(raw)
    assert refused.value.code == code


def test_the_limit_is_512_levels_for_the_second_parser() -> None:
    """An object holding 511 nested arrays (512 levels) with a lone surrogate is read."""
    raw = b'{"a":' + b"[" * (MAX_DEPTH - 1) + b'"\\ud800"' + b"]" * (MAX_DEPTH - 1) + b"}"
    body = parse_object(raw)
    inner = body["a"]
    for _ in range(MAX_DEPTH - 2):
        inner = inner[0]
    assert inner == ["\ufffd"]
