"""Reading an uploaded import file (routers.imports): encodings, delimiters, header mapping, line numbers and
the per-row checks, without a server."""

from __future__ import annotations

import tempfile
import uuid
from typing import IO

import pytest
from admin_api.routers.imports import BadFile, Candidate, RawRow, read_rows, scan, validate_row
from provisioning_common.db.repository import ImportRowError
from provisioning_common.models import CredentialsType

PROFILE = uuid.uuid4()


def spooled(data: bytes) -> IO[bytes]:
    tmp = tempfile.TemporaryFile()  # noqa: SIM115 - returned open, closed with the test
    tmp.write(data)
    return tmp


def rows(data: bytes, kind: str = "csv", **options: object) -> list[RawRow]:
    tmp = spooled(data)
    plan = scan(tmp, kind, options.get("delimiter"), options.get("columns"), bool(options.get("header", True)))  # type: ignore[arg-type]
    found = list(read_rows(tmp, plan))
    assert plan.total == len(found)
    return found


def test_a_spreadsheet_export_bom_semicolons_crlf_and_a_multi_line_pem() -> None:
    data = ("\ufeffDevice name;Type;Certificate\r\nA;t;\"-----BEGIN\r\nx\r\n-----END\"\r\n\r\nB;t;\r\n").encode()
    found = rows(data)
    assert [(r.line, r.values) for r in found] == [
        (2, {"name": "A", "x509": "-----BEGIN\r\nx\r\n-----END"}),
        (6, {"name": "B"}),  # line 5 is blank, the PEM spanned 2-4
    ]


@pytest.mark.parametrize("delimiter", [",", ";", "\t", "|"])
def test_the_delimiter_is_found_from_the_header(delimiter: str) -> None:
    data = delimiter.join(["name", "token", "Device key"]).encode() + b"\n" + delimiter.join(["n", "t", "k"]).encode()
    assert rows(data)[0].values == {"name": "n", "accessToken": "t", "deviceKey": "k"}


def test_columns_map_a_file_without_header_and_empty_entries_are_ignored() -> None:
    found = rows(b"n1,ignored,tok1\nn2,x,tok2\n", columns="name,,accessToken", header=False)
    assert [(r.line, r.values) for r in found] == [(1, {"name": "n1", "accessToken": "tok1"}),
                                                   (2, {"name": "n2", "accessToken": "tok2"})]


@pytest.mark.parametrize(("data", "options", "message"), [
    (b"name,colour\n", {}, "column 2 ('colour') is not a known field"),
    (b"name,token,Access Token\n", {}, "more than one column is mapped to accessToken"),
    (b"label\n", {}, "no column is mapped to name"),
    (b"", {}, "the file is empty"),
    (b"name\n\xff\n", {}, "not UTF-8"),
    (b"name\n\"open\n", {}, "line"),
    (b"x\n", {"header": False}, "header=false needs columns="),
])
def test_unreadable_files_are_refused_whole(data: bytes, options: dict[str, object], message: str) -> None:
    with pytest.raises(BadFile, match=message.replace("(", r"\(").replace(")", r"\)")):
        rows(data, **options)


def test_json_lines_rows_and_their_problems() -> None:
    data = b'{"name": "a", "token": "t"}\n\n[1]\n{"name": "b", "colour": 1}\n{"name": "c", "deviceKey": 42}\nnope\n'
    found = rows(data, "ndjson")
    assert [(r.line, r.values, r.problem) for r in found] == [
        (1, {"name": "a", "accessToken": "t"}, None),
        (3, {}, ("line", "not a JSON object")),
        (4, {}, ("colour", "unknown field")),
        (5, {"name": "c", "deviceKey": "42"}, None),
        (6, {}, ("line", "not a JSON object")),
    ]


def test_a_csv_row_longer_than_its_header_is_rejected() -> None:
    assert rows(b"name\na,b\n")[0].problem == ("line", "2 columns where the header has 1")


@pytest.mark.parametrize(("values", "field", "reason"), [
    ({}, "name", "must not be empty"),
    ({"name": "  "}, "name", "must not be blank"),
    ({"name": "n" * 256}, "name", "255"),
    ({"name": "a\x01b"}, "name", "control characters"),
    ({"name": "a", "deviceKey": "k" * 300}, "deviceKey", "255"),
    ({"name": "a", "accessToken": "t", "x509": "pem"}, "credentials", "more than one kind"),
    ({"name": "a", "mqttUserName": "u\x02"}, "mqttUserName", "control characters"),
])
def test_row_checks_name_the_field(values: dict[str, str], field: str, reason: str) -> None:
    checked = validate_row(RawRow(7, values), PROFILE)
    assert isinstance(checked, ImportRowError), checked
    assert (checked.line, checked.field) == (7, field)
    assert reason in checked.reason
    assert all(v not in checked.reason for v in values.values() if len(v) > 3)  # never the value


def test_valid_rows_carry_their_credentials() -> None:
    token = validate_row(RawRow(2, {"name": " a ", "accessToken": "tok"}), PROFILE)
    assert isinstance(token, Candidate)
    assert (token.name, token.credentials_type, token.supplied and token.supplied.token) == \
        ("a", CredentialsType.ACCESS_TOKEN, "tok")
    mqtt = validate_row(RawRow(3, {"name": "b", "mqttClientId": "c", "mqttUserName": "u", "mqttPassword": "p"}),
                        PROFILE)
    assert isinstance(mqtt, Candidate) and mqtt.credentials_type is CredentialsType.MQTT_BASIC
    assert mqtt.supplied is not None and (mqtt.supplied.client_id, mqtt.supplied.username) == ("c", "u")
    bare = validate_row(RawRow(4, {"name": "c", "deviceKey": "SN-1"}), PROFILE)
    assert isinstance(bare, Candidate) and bare.supplied is None and bare.device_key == "SN-1"
