"""The shipped EMQX configuration, checked against what EMQX 5 requires (issue 14). EMQX is NOT run here.

Facts from EMQX's documentation and source, as issue 14 lists them:
- since 5.2 the built-in database authenticator refuses a CONNECT without a password, and a refusal ends
  the chain: the HTTP authenticator (broker_auth) must come first;
- HTTP authenticator fields: ``mechanism = password_based``, ``backend = http``, ``method``, ``url``,
  ``headers``, ``body`` (placeholders ``${clientid}``, ``${username}``, ``${password}``, ``${peerhost}``),
  ``request_timeout``; built-in database: ``backend = built_in_database``, ``user_id_type``,
  ``password_hash_algorithm``;
- a shared subscription is authorized on its real topic: an ACL rule for ``$share/...`` never matches;
- the file authorizer's ``path`` should be absolute.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.brokers import hocon

EMQX = Path(__file__).resolve().parents[2] / "deploy" / "brokers" / "emqx"


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return hocon.loads((EMQX / "emqx.conf").read_text())


def test_broker_auth_comes_first_in_the_chain_then_the_built_in_database(config: dict[str, Any]) -> None:
    chain = config["authentication"]
    assert [(a["mechanism"], a["backend"]) for a in chain] == [
        ("password_based", "http"), ("password_based", "built_in_database")]
    assert all(a.get("enable", "true") == "true" for a in chain)


def test_the_http_authenticator_sends_exactly_what_broker_auth_reads(config: dict[str, Any]) -> None:
    http = config["authentication"][0]
    assert http["method"] == "post" and http["url"].endswith("/emqx/auth") and http["url"].startswith("http")
    assert http["body"] == {"clientid": "${clientid}", "username": "${username}", "password": "${password}",
                            "peerhost": "${peerhost}"}
    assert http["headers"]["content-type"] == "application/json"
    assert re.fullmatch(r"Bearer \S+", http["headers"]["authorization"])  # broker_auth's BROKER_AUTH_SECRET
    assert re.fullmatch(r"\d+(ms|s)", http["request_timeout"])
    assert set(http) <= {"mechanism", "backend", "enable", "method", "url", "headers", "body", "request_timeout",
                         "connect_timeout", "pool_size", "enable_pipelining", "ssl"}


def test_the_built_in_database_holds_the_bridges_account(config: dict[str, Any]) -> None:
    db = config["authentication"][1]
    assert db["user_id_type"] == "username"
    assert db["password_hash_algorithm"]["name"] in ("plain", "md5", "sha", "sha256", "sha512", "bcrypt", "pbkdf2")
    assert db["password_hash_algorithm"]["salt_position"] in ("prefix", "suffix", "disable")


def test_the_file_authorizer_denies_what_it_does_not_allow_and_has_an_absolute_path(config: dict[str, Any]) -> None:
    authz = config["authorization"]
    assert authz["no_match"] == "deny"
    [source] = authz["sources"]
    assert source["type"] == "file" and source["enable"] == "true"
    assert source["path"].startswith("/") and source["path"].endswith("provisioning-acl.conf")


def test_acl_rules_name_real_topics_and_no_bare_request_topic() -> None:
    rules = [line for line in (EMQX / "acl.conf").read_text().splitlines() if line.startswith("{")]
    assert rules[-1] == "{deny, all}."
    text = "\n".join(rules)
    assert "$share" not in text  # EMQX authorizes a shared subscription's real topic
    assert '"provision/request"' not in text  # the bare topic vouches for no client id (issue 14)
    assert '{allow, {username, "provisioning-bridge"}, subscribe, [{eq, "provision/request/#"}]}.' in rules
    assert '{allow, {username, "provision"}, publish, ["provision/request/${clientid}"]}.' in rules
    assert '{allow, {username, "provision"}, subscribe, ["provision/response/${clientid}"]}.' in rules


def test_the_reader_refuses_what_it_does_not_understand() -> None:
    assert hocon.loads('a { b = 1, c = "x" }\nd = [ {e = f}, "g" ]  # c\n') == {
        "a": {"b": "1", "c": "x"}, "d": [{"e": "f"}, "g"]}
    for bad in ("a = ${b}", "a.b = 1", "a = 1\na = 2", "include \"x\""):
        with pytest.raises(ValueError):
            hocon.loads(bad)
