"""The device-authentication policy shared by the MQTT gateway and broker_auth: every rule and branch."""

from __future__ import annotations

import pytest
from provisioning_common import device_auth
from provisioning_common.bus import RpcError, RpcTimeout
from provisioning_common.device_auth import Decision, Kind, Plan, Presented, Verdict, accepts, decide, plan
from provisioning_common.models import AuthenticateRequest, AuthenticateResult

LEAF, CA = "bGVhZg==", "Y2E="
DENIED = AuthenticateResult(authenticated=False)


def found(device_id: str = "dev-1") -> AuthenticateResult:
    return AuthenticateResult(authenticated=True, device_id=device_id)


class Credentials:
    """Stands in for the credentials service: answers by request, records what it was asked."""

    def __init__(self, answers: dict[AuthenticateRequest, AuthenticateResult] | None = None,
                 error: RpcError | None = None) -> None:
        self.answers = answers or {}
        self.error = error
        self.asked: list[AuthenticateRequest] = []

    async def __call__(self, request: AuthenticateRequest) -> AuthenticateResult:
        self.asked.append(request)
        if self.error is not None:
            raise self.error
        return self.answers.get(request, DENIED)


class ChainProvisioning:
    def __init__(self, device_id: str | None) -> None:
        self.device_id = device_id
        self.asked: list[list[str]] = []

    async def __call__(self, chain: list[str]) -> str | None:
        self.asked.append(chain)
        return self.device_id


# --- rule 1: provisioning clients ---------------------------------------------------------------------


@pytest.mark.parametrize(("client_id", "username", "expected"), [
    ("dev-1", "provision", True),      # ThingsBoard's documented client
    ("provision", "anything", True),   # ... or the client id (MqttTransportHandler.processConnect)
    ("provision", None, True),
    ("provision", "provision", True),
    ("dev-1", "Provision", False),     # exact, case-sensitive
    ("PROVISION", None, False),
    ("dev-1", "tok", False),
    (None, None, False),
    ("", "", False),
])
def test_provisioning_is_username_or_client_id_exactly_provision(
    client_id: str | None, username: str | None, expected: bool
) -> None:
    assert device_auth.is_provisioning(client_id, username) is expected


@pytest.mark.parametrize("presented", [
    Presented("c", "provision", "pw"),
    Presented("provision", "tok", "pw"),
    Presented("provision", None, None, (LEAF, CA)),  # a certificate is not looked at either
])
def test_a_provisioning_client_is_asked_nothing(presented: Presented) -> None:
    assert plan(presented) == Plan(Kind.PROVISIONING)


# --- rule 2: a TLS client certificate -----------------------------------------------------------------


def test_a_certificate_alone_decides_then_its_chain_may_provision() -> None:
    steps = plan(Presented("c", "tok", "secret", (LEAF, CA)))
    assert steps.kind is Kind.CERTIFICATE
    assert steps.attempts == (AuthenticateRequest(certificate=LEAF),)  # no username, password or token
    assert steps.provision_chain == (LEAF, CA)


# --- rule 3: credentials, in order ----------------------------------------------------------------------


@pytest.mark.parametrize(("presented", "kind", "attempts"), [
    # MQTT_BASIC (with §9's fallback to the username as a token), then Innoway's token as password.
    (Presented("c", "u", "p"), Kind.CREDENTIALS,
     (AuthenticateRequest(client_id="c", username="u", password="p"), AuthenticateRequest(token="p"))),
    (Presented("", "tok", None), Kind.CREDENTIALS, (AuthenticateRequest(username="tok"),)),
    (Presented("c", "tok", None), Kind.CREDENTIALS, (AuthenticateRequest(client_id="c", username="tok"),)),
    # Only a password: nothing for MQTT_BASIC to look up (ThingsBoard needs a client id or username).
    (Presented("", None, "tok"), Kind.CREDENTIALS, (AuthenticateRequest(token="tok"),)),
    (Presented("", "", "tok"), Kind.CREDENTIALS, (AuthenticateRequest(token="tok"),)),
    # A client id alone may be MQTT_BASIC credentials (§9: no username -> sha3(clientId)).
    (Presented("c", None, None), Kind.ANONYMOUS, (AuthenticateRequest(client_id="c"),)),
    (Presented("c", "", ""), Kind.ANONYMOUS, (AuthenticateRequest(client_id="c"),)),
    # Nothing at all: nothing to ask.
    (Presented(), Kind.ANONYMOUS, ()),
])
def test_credentials_are_asked_in_order(presented: Presented, kind: Kind,
                                        attempts: tuple[AuthenticateRequest, ...]) -> None:
    assert plan(presented) == Plan(kind, attempts)


def test_connect_fields_become_text() -> None:
    assert Presented.from_connect("c", "u", b"p\xc3\xa9", [LEAF]) == Presented("c", "u", "pé", (LEAF,))
    assert Presented.from_connect("c", None, None) == Presented("c")
    assert Presented.from_connect("c", "u", b"") == Presented("c", "u", None)
    assert Presented.from_connect("c", "u", b"\xff").password == "\ufffd"  # invalid UTF-8 replaced, as Java does


def test_secrets_stay_out_of_repr() -> None:
    text = repr(Presented("c", "u", "hunter2", (LEAF,))) + repr(plan(Presented("c", "u", "hunter2", (LEAF,))))
    assert "hunter2" not in text and LEAF not in text


# --- rule 4: verdicts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("result", "ok"), [
    (found(), True),
    (AuthenticateResult(authenticated=True), False),  # no device to open a session for
    (AuthenticateResult(authenticated=True, device_id=""), False),
    (DENIED, False),
])
def test_a_result_counts_only_when_it_names_a_device(result: AuthenticateResult, ok: bool) -> None:
    assert accepts(result) is ok


async def test_provisioning_asks_nobody() -> None:
    credentials, chain = Credentials(), ChainProvisioning("x")
    assert await decide(Presented("provision", "u", "p", (LEAF,)), credentials, chain) == Decision(Verdict.PROVISIONING)
    assert credentials.asked == [] and chain.asked == []


async def test_the_first_device_found_wins() -> None:
    basic = AuthenticateRequest(client_id="c", username="u", password="p")
    credentials = Credentials({basic: found("basic"), AuthenticateRequest(token="p"): found("innoway")})
    assert await decide(Presented("c", "u", "p"), credentials) == Decision(Verdict.AUTHENTICATED, "basic")
    assert credentials.asked == [basic]


async def test_innoway_token_as_password_after_mqtt_basic() -> None:
    credentials = Credentials({AuthenticateRequest(token="tok"): found("innoway")})
    assert await decide(Presented("c", "anyone", "tok"), credentials) == Decision(Verdict.AUTHENTICATED, "innoway")
    assert credentials.asked == [AuthenticateRequest(client_id="c", username="anyone", password="tok"),
                                 AuthenticateRequest(token="tok")]


async def test_a_result_without_a_device_does_not_stop_the_search() -> None:
    credentials = Credentials({
        AuthenticateRequest(client_id="c", username="u", password="p"): AuthenticateResult(authenticated=True),
        AuthenticateRequest(token="p"): found("innoway"),
    })
    assert await decide(Presented("c", "u", "p"), credentials) == Decision(Verdict.AUTHENTICATED, "innoway")


async def test_unknown_credentials_are_denied() -> None:
    credentials = Credentials()
    assert await decide(Presented("c", "u", "p"), credentials) == Decision(Verdict.DENIED)
    assert len(credentials.asked) == 2


async def test_a_client_id_alone_is_anonymous_unless_it_is_mqtt_basic() -> None:
    assert await decide(Presented("c"), Credentials()) == Decision(Verdict.ANONYMOUS)
    basic = Credentials({AuthenticateRequest(client_id="c"): found("by-client-id")})
    assert await decide(Presented("c"), basic) == Decision(Verdict.AUTHENTICATED, "by-client-id")
    nobody = Credentials()
    assert await decide(Presented(), nobody) == Decision(Verdict.ANONYMOUS) and nobody.asked == []


async def test_an_unreachable_credentials_service_is_unavailable_not_denied() -> None:
    credentials = Credentials(error=RpcTimeout("credentials.authenticate did not answer"))
    chain = ChainProvisioning("x")
    decision = await decide(Presented("c", "u", "p", (LEAF,)), credentials, chain)
    assert decision == Decision(Verdict.UNAVAILABLE, detail="credentials.authenticate did not answer")
    assert len(credentials.asked) == 1 and chain.asked == []  # stops at once, provisions nothing
    assert (await decide(Presented("c", "u", "p"), Credentials(error=RpcError("boom")))).verdict is Verdict.UNAVAILABLE


async def test_a_known_certificate_needs_no_chain_provisioning() -> None:
    credentials, chain = Credentials({AuthenticateRequest(certificate=LEAF): found("x509")}), ChainProvisioning("new")
    assert await decide(Presented("c", None, None, (LEAF, CA)), credentials, chain) == Decision(
        Verdict.AUTHENTICATED, "x509")
    assert chain.asked == []


async def test_an_unknown_leaf_offers_its_chain_to_provisioning() -> None:
    chain = ChainProvisioning("provisioned")
    assert await decide(Presented("c", "u", "p", (LEAF, CA)), Credentials(), chain) == Decision(
        Verdict.AUTHENTICATED, "provisioned")
    assert chain.asked == [[LEAF, CA]]


async def test_a_chain_no_profile_takes_is_denied() -> None:
    assert await decide(Presented("c", None, None, (LEAF,)), Credentials(), ChainProvisioning(None)) == Decision(
        Verdict.DENIED)
    # Without chain provisioning (broker_auth never sees certificates), an unknown leaf is just denied.
    assert await decide(Presented("c", None, None, (LEAF,)), Credentials()) == Decision(Verdict.DENIED)


async def test_credentials_without_a_certificate_never_reach_chain_provisioning() -> None:
    chain = ChainProvisioning("x")
    assert await decide(Presented("c", "u", "p"), Credentials(), chain) == Decision(Verdict.DENIED)
    assert chain.asked == []
