"""Device names: Java's trim, blank names, generated names, limits, names from certificate CNs.

Spec ``shared/spec/thingsboard-provisioning.md`` §4.1 (a non-empty ``deviceName`` is ``trim()``-ed: chars
<= U+0020 at both ends; empty after trim -> FAILURE, before the key is looked at), §5 (no name ->
``randomAlphanumeric(20)``; ``DeviceDataValidator``: non-blank, no 0x00, <= 255 chars -> else FAILURE),
§6 (lookup by the exact trimmed name), §8.4 (X.509: ``Pattern.compile(regex).matcher(CN).find()`` then
``group(1)``; no match / no group / null CN -> FAILURE), §10 (generated names: 20 chars [A-Za-z0-9]).
"""

from __future__ import annotations

import re

import pytest
from provisioning_common.models import ProvisionStrategy
from provisioning_core import rules
from provisioning_core.rules import ClaimDevice, CreateDevice, Proceed, java_trim

from .factories import profile, request

ALLOW = ProvisionStrategy.ALLOW_CREATE_NEW_DEVICES
CHECK = ProvisionStrategy.CHECK_PRE_PROVISIONED_DEVICES

# --- java_trim --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("  name  ", "name"),
        ("\t\n\r\x0b\x0cname\x00\x1f ", "name"),
        ("\x00\x01\x02 \x20", ""),
        ("in ner\tspace", "in ner\tspace"),
        ("!x!", "!x!"),  # U+0021 is the first character kept
        ("", ""),
    ],
)
def test_java_trim_strips_chars_up_to_u0020(value: str, expected: str) -> None:
    assert java_trim(value) == expected


@pytest.mark.parametrize(
    "value",
    ["\u00a0name\u00a0", "\u2003name\u2003", "\u3000name", "name\u2028", "\x7fname\x7f", "\x85name\x85", "\ufeffname"],
)
def test_java_trim_keeps_non_ascii_and_del_whitespace(value: str) -> None:
    # Unlike str.strip(), Java's trim() only removes chars <= U+0020.
    assert java_trim(value) == value


def test_java_trim_mixed() -> None:
    assert java_trim(" \u00a0 name \u00a0 ") == "\u00a0 name \u00a0"


# --- request names (§4.1) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "name"),
    [("dev-1", "dev-1"), ("  dev-1\t", "dev-1"), ("\x00dev\x1f", "dev"), ("a b", "a b"), ("\u00a0x", "\u00a0x"),
     ("", "")],
)
def test_a_request_name_is_used_trimmed(raw: str, name: str) -> None:
    assert rules.normalise_name(raw) == name
    assert rules.check_request(request(device_name=raw)) == Proceed(name)


@pytest.mark.parametrize("blank", [" ", "\t\r\n", "\x00", " \x00\x1f ", "\x20" * 300])
def test_a_blank_name_is_failure(blank: str) -> None:
    assert rules.normalise_name(blank) == rules.failure()
    assert rules.check_request(request(device_name=blank)) == rules.failure()


@pytest.mark.parametrize("blank", ["\u00a0", "\u3000", "\x7f"])
def test_a_name_of_non_java_whitespace_is_not_blank(blank: str) -> None:
    assert rules.normalise_name(blank) == blank


def test_the_claim_looks_up_the_exact_trimmed_name() -> None:
    assert rules.decide_strategy(request(), profile(CHECK), "Dev 1") == ClaimDevice("Dev 1")


# --- generated names (§5, §10) ----------------------------------------------------------------------


def test_a_generated_name_is_20_alphanumerics() -> None:
    names = {rules.generated_name() for _ in range(200)}
    assert all(re.fullmatch("[A-Za-z0-9]{20}", n) for n in names)
    assert len(names) == 200  # random, not a counter


def test_an_unnamed_request_gets_a_generated_name_only_when_creating() -> None:
    decision = rules.decide_strategy(request(), profile(ALLOW), "")
    assert isinstance(decision, CreateDevice) and decision.generated
    assert re.fullmatch("[A-Za-z0-9]{20}", decision.name)
    assert rules.decide_strategy(request(), profile(CHECK), "") == rules.failure()


def test_a_named_request_keeps_its_name() -> None:
    assert rules.decide_strategy(request(), profile(ALLOW), "dev", new_name=lambda: "x") == CreateDevice("dev")


# --- limits of a stored name (§5 DeviceDataValidator) -----------------------------------------------


@pytest.mark.parametrize("name", ["n" * 255, "\u00e9" * 255, "tab\tinside", "ctl\x01inside", "\U0001f600" * 255])
def test_names_up_to_255_characters_without_nul_are_created(name: str) -> None:
    assert rules.decide_strategy(request(), profile(ALLOW), name) == CreateDevice(name)


@pytest.mark.parametrize("name", ["n" * 256, "nul\x00inside", "\U0001f600" * 256])
def test_longer_names_or_nul_are_failure(name: str) -> None:
    assert rules.decide_strategy(request(), profile(ALLOW), name) == rules.failure()


def test_the_length_is_measured_after_trim() -> None:
    trimmed = rules.check_request(request(device_name="  " + "n" * 255 + "  "))
    assert isinstance(trimmed, Proceed)
    assert rules.decide_strategy(request(), profile(ALLOW), trimmed.name) == CreateDevice("n" * 255)


# --- names from X.509 common names (§8.4) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "common_name", "expected"),
    [
        (r"^(sensor-[0-9]+)\.example\.com$", "sensor-12.example.com", "sensor-12"),
        (r"^(sensor-[0-9]+)\.example\.com$", "other.example.com", None),
        (r"(\d+)", "device 42 of 7", "42"),  # find(): the first partial match
        ("(.*)", "  padded  ", "padded"),
        ("(.*)", "x" * 255, "x" * 255),
        ("(.*)", "x" * 256, None),  # longer than a device name may be
        ("(.*)", "nul\x00inside", None),  # Postgres cannot store it
        ("(.*)", "   ", None),  # blank after trim
        ("(.*)", "", None),
        ("(.*)", None, None),
        ("no-group", "no-group", None),  # group(1) does not exist
        ("(a)|(b)", "b", None),  # group(1) did not take part
        ("([", "x", None),  # not a valid pattern
    ],
)
def test_device_name_from_common_name(pattern: str, common_name: str | None, expected: str | None) -> None:
    assert rules.name_from_common_name(pattern, common_name) == expected


def test_a_chain_profile_without_a_pattern_uses_the_whole_cn() -> None:
    chain = profile(ProvisionStrategy.X509_CERTIFICATE_CHAIN, certificate_regex=None)
    assert rules.x509_target(chain, "sensor-1.example.com") == rules.X509Target(chain, "sensor-1.example.com")
