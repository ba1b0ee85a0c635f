"""Each provisioning decision's reason code (rules.py names it once) and the core's one event per decision."""

from __future__ import annotations

from provisioning_common.events import EventSink, Outcome, ProvisionEvent, Reason
from provisioning_common.models import ProvisionStrategy, VerifyChainResult
from provisioning_common.secretbox import SecretBox, generate_key
from provisioning_core import rules
from provisioning_core.rate_limit import ProvisionLimits, RateLimiter
from provisioning_core.service import ProvisioningCore

from .factories import SECRET, device, profile, request

ALLOW = ProvisionStrategy.ALLOW_CREATE_NEW_DEVICES
CHECK = ProvisionStrategy.CHECK_PRE_PROVISIONED_DEVICES


def reason(decision: object) -> Reason:
    assert isinstance(decision, rules.Refusal), decision
    return decision.reason


def test_not_found_reasons_are_kept_apart() -> None:
    assert reason(rules.check_request(request(provision_key=""))) is Reason.MISSING_KEY_OR_SECRET
    assert reason(rules.decide_strategy(request(), None, "d")) is Reason.UNKNOWN_KEY
    assert reason(rules.decide_strategy(request(provision_secret="bad"), profile(ALLOW), "d")) is Reason.WRONG_SECRET
    assert reason(rules.decide_strategy(request(), profile("DISABLED"), "d")) is Reason.PROFILE_DISABLED
    assert reason(rules.decide_strategy(request(), profile(ALLOW, provision_secret=None), "d")) \
        is Reason.PROFILE_DISABLED
    chain = profile(ProvisionStrategy.X509_CERTIFICATE_CHAIN, provision_secret=None)
    assert reason(rules.decide_strategy(request(), chain, "d")) is Reason.X509_CHAIN_ONLY
    # ...while the device hears the same NOT_FOUND for each.
    assert rules.decide_strategy(request(provision_secret="bad"), profile(ALLOW), "d").result() == (
        rules.decide_strategy(request(), None, "d").result())  # type: ignore[union-attr]


def test_failure_reasons() -> None:
    assert reason(rules.check_request(request(device_name="  "))) is Reason.BLANK_NAME
    assert reason(rules.decide_strategy(request(), profile(ALLOW), "x" * 256)) is Reason.INVALID_NAME
    assert reason(rules.decide_strategy(request(), profile(CHECK), "")) is Reason.NAME_REQUIRED
    owner = profile(CHECK)
    assert reason(rules.decide_claim(owner, None)) is Reason.NOT_PRE_PROVISIONED
    assert reason(rules.decide_claim(owner, device(profile(CHECK)))) is Reason.NOT_PRE_PROVISIONED
    assert reason(rules.decide_claim(owner, device(owner, provision_state="provisioned"))) \
        is Reason.ALREADY_PROVISIONED
    assert reason(rules.conflict("name")) is Reason.NAME_TAKEN
    assert reason(rules.conflict("device_key")) is Reason.DEVICE_KEY_TAKEN
    assert reason(rules.conflict("credentials")) is Reason.CREDENTIALS_IN_USE
    assert reason(rules.prepare_failure("Invalid X.509 certificate")) is Reason.INVALID_CERTIFICATE
    assert reason(rules.prepare_failure("Access token is too weak: ...")) is Reason.TOO_WEAK_TOKEN
    assert reason(rules.prepare_failure(None)) is Reason.INVALID_CREDENTIALS
    assert reason(rules.issue_refusal(request(), profile(ALLOW))) is Reason.NO_SIGNING_CA
    assert reason(rules.issue_failure("bad csr")) is Reason.CSR_REFUSED
    assert rules.too_many_reason(failures=True) is Reason.TOO_MANY_FAILURES
    assert rules.too_many_reason(failures=False) is Reason.TOO_MANY_PROVISIONS


def test_x509_refusal_reasons() -> None:
    assert reason(rules.verified_identity(VerifyChainResult(ok=False, error_message="expired"))) \
        is Reason.CHAIN_INVALID
    assert reason(rules.x509_target(profile(ALLOW), "cn")) is Reason.NOT_CHAIN_PROFILE
    chain = profile(ProvisionStrategy.X509_CERTIFICATE_CHAIN, certificate_regex=r"^(s-\d+)$")
    assert reason(rules.x509_target(chain, "other")) is Reason.CN_MISMATCH
    assert reason(rules.decide_x509_device(chain, "s-1", device(profile(ALLOW)))) is Reason.NAME_TAKEN
    assert reason(rules.decide_x509_device(profile(ProvisionStrategy.X509_CERTIFICATE_CHAIN,
                                                   allow_create_by_x509=False), "s-1", None)) \
        is Reason.CREATION_NOT_ALLOWED


class Sink(EventSink):
    enabled = True

    def __init__(self) -> None:
        self.events: list[ProvisionEvent] = []

    def emit(self, event: ProvisionEvent) -> None:
        self.events.append(event)


class _Profiles:
    def __init__(self, row: object) -> None:
        self.row = row

    async def get(self, key: str) -> object:
        return self.row


def _core(row: object, sink: EventSink, limiter: RateLimiter | None = None) -> ProvisioningCore:
    core = ProvisioningCore(None, None, SecretBox(generate_key()), limiter or RateLimiter.in_memory(),  # type: ignore[arg-type]
                            events=sink)
    core._profiles = _Profiles(row)  # type: ignore[assignment]
    return core


async def test_the_core_emits_one_event_per_decision_without_the_secret() -> None:
    sink = Sink()
    row = profile(CHECK)
    core = _core(row, sink, RateLimiter.in_memory(ProvisionLimits(failures_per_source_key=1)))
    await core.provision(request(provision_secret="bad-guess-1", device_name=" d1 ", source_address="10.0.0.9"))
    await core.provision(request(device_name="d2", source_address="10.0.0.9"))  # now over the wrong-secret limit
    assert [(e.outcome, e.reason) for e in sink.events] == [(Outcome.NOT_FOUND, Reason.WRONG_SECRET),
                                                            (Outcome.RATE_LIMITED, Reason.TOO_MANY_FAILURES)]
    first = sink.events[0]
    assert first.device_name == "d1" and first.device_profile_id == row.id and first.source_address == "10.0.0.9"
    assert first.request_id and first.latency_ms >= 0 and first.device_id is None
    text = "".join(e.model_dump_json() for e in sink.events)
    assert SECRET not in text and "bad-guess-1" not in text


async def test_a_disabled_sink_gets_nothing_and_the_answer_is_the_same() -> None:
    quiet = _core(None, EventSink())
    loud_sink = Sink()
    loud = _core(None, loud_sink)
    assert await quiet.provision(request(device_name="d")) == await loud.provision(request(device_name="d"))
    assert [(e.outcome, e.reason, e.device_profile_id) for e in loud_sink.events] == [
        (Outcome.NOT_FOUND, Reason.UNKNOWN_KEY, None)]


async def test_gateways_may_report_time_outs_only() -> None:
    sink = Sink()
    core = _core(None, sink)
    from provisioning_common.models import Transport

    timed_out = ProvisionEvent(outcome=Outcome.TIMED_OUT, reason=Reason.NO_ANSWER, transport=Transport.MQTT)
    await core.report_timeout(timed_out)
    await core.report_timeout(timed_out.model_copy(update={"outcome": Outcome.SUCCESS}))
    assert sink.events == [timed_out]


def test_every_refusal_in_the_rules_names_its_reason() -> None:
    """Each failure(...) / not_found(...) that rules.py decides passes a reason (none is left unspecified)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(rules))
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
             and node.func.id in ("failure", "not_found")]
    assert len(calls) >= 20
    unnamed = [node.lineno for node in calls
               if not any(k.arg == "reason" for k in node.keywords)
               and not (node.func.id == "not_found" and node.args)]  # type: ignore[union-attr]
    assert not unnamed, f"rules.py lines without a reason: {unnamed}"
