"""Provisioning strategies: which request creates, claims, rotates or is refused.

Spec ``shared/spec/thingsboard-provisioning.md``: §4 (validation order, "first hit wins"; the switch on
``provisionType``: ALLOW_CREATE_NEW_DEVICES, CHECK_PRE_PROVISIONED_DEVICES, DISABLED, X509_CERTIFICATE_CHAIN),
§6 (pre-provisioned claim), §8.4 (X.509 chain: rotate, create, refuse) and "Our deviations" (a JSON request
against an X509_CERTIFICATE_CHAIN profile is NOT_FOUND; wrong secrets are rate-limited).
Rules under test: ``provisioning_core.rules``.
"""

from __future__ import annotations

import uuid

import pytest
from provisioning_common.db.repository import ProfileRow
from provisioning_common.models import (
    MSG_FAILURE,
    MSG_NOT_FOUND,
    CredentialsType,
    ProvisionResult,
    ProvisionStatus,
    ProvisionStrategy,
    SuppliedCredentials,
    VerifyChainResult,
)
from provisioning_common.secretbox import SecretBox, generate_key
from provisioning_core import rules
from provisioning_core.rate_limit import ProvisionLimits, RateLimiter
from provisioning_core.rules import (
    ClaimDevice,
    ClaimPreProvisioned,
    CreateDevice,
    CreateX509Device,
    Proceed,
    Refusal,
    RotateX509Credentials,
)
from provisioning_core.service import ProvisioningCore

from .factories import KEY, SECRET, device, profile, request

ALLOW = ProvisionStrategy.ALLOW_CREATE_NEW_DEVICES
CHECK = ProvisionStrategy.CHECK_PRE_PROVISIONED_DEVICES
DISABLED = ProvisionStrategy.DISABLED
CHAIN = ProvisionStrategy.X509_CERTIFICATE_CHAIN

NOT_FOUND_GUESS = Refusal(ProvisionStatus.NOT_FOUND, MSG_NOT_FOUND, failed_attempt=True)
FAILURE = Refusal(ProvisionStatus.FAILURE, MSG_FAILURE)


def _fixed_name() -> str:
    return "GeneratedName0000001"


# --- §4.1-4.2: checks before the profile is read -----------------------------------------------------


def test_a_complete_request_proceeds_with_its_trimmed_name() -> None:
    assert rules.check_request(request(device_name="  dev-1 ")) == Proceed("dev-1")
    assert rules.check_request(request()) == Proceed("")


@pytest.mark.parametrize(("key", "secret"), [("", SECRET), (KEY, ""), ("", "")])
def test_an_empty_key_or_secret_is_not_found_and_not_a_guess(key: str, secret: str) -> None:
    decision = rules.check_request(request(provision_key=key, provision_secret=secret))
    assert decision == Refusal(ProvisionStatus.NOT_FOUND, MSG_NOT_FOUND, failed_attempt=False)


def test_a_blank_name_beats_an_empty_key() -> None:
    # §4.1: "checked before key/secret, so a blank name beats a wrong key".
    decision = rules.check_request(request(device_name=" \t", provision_key=""))
    assert decision == FAILURE


def test_an_empty_key_is_not_found() -> None:
    assert rules.check_request(request(provision_key="")) == rules.not_found()


# --- §4.3: the profile --------------------------------------------------------------------------------


def test_no_profile_for_the_key_is_not_found_and_counts_as_a_guess() -> None:
    assert rules.decide_strategy(request(), None, "dev") == NOT_FOUND_GUESS


@pytest.mark.parametrize("strategy", [ALLOW, CHECK])
def test_a_profile_without_a_secret_is_not_found(strategy: ProvisionStrategy) -> None:
    unconfigured = profile(strategy, provision_secret=None)
    assert rules.decide_strategy(request(), unconfigured, "dev") == NOT_FOUND_GUESS


# --- §4.5: ALLOW_CREATE_NEW_DEVICES -------------------------------------------------------------------


def test_allow_create_with_the_right_secret_creates_the_named_device() -> None:
    assert rules.decide_strategy(request(), profile(ALLOW), "dev-1") == CreateDevice("dev-1", generated=False)


def test_allow_create_without_a_name_creates_a_device_with_a_generated_name() -> None:
    decision = rules.decide_strategy(request(), profile(ALLOW), "", new_name=_fixed_name)
    assert decision == CreateDevice("GeneratedName0000001", generated=True)


@pytest.mark.parametrize("strategy", [ALLOW, CHECK])
@pytest.mark.parametrize("secret", ["wrong", SECRET.upper(), SECRET + " ", SECRET[:-1], " " + SECRET])
def test_a_wrong_secret_is_not_found_and_counts_as_a_guess(strategy: ProvisionStrategy, secret: str) -> None:
    # String.equals: exact and case-sensitive, no trimming.
    assert rules.decide_strategy(request(provision_secret=secret), profile(strategy), "dev") == NOT_FOUND_GUESS


def test_the_secret_of_another_profile_does_not_open_this_one() -> None:
    other = profile(ALLOW, provision_secret="another-secret-00000")
    assert rules.decide_strategy(request(), other, "dev") == NOT_FOUND_GUESS


# --- §4.5: CHECK_PRE_PROVISIONED_DEVICES ---------------------------------------------------------------


def test_check_pre_provisioned_with_the_right_secret_claims_the_named_device() -> None:
    assert rules.decide_strategy(request(), profile(CHECK), "dev-1") == ClaimDevice("dev-1")


def test_check_pre_provisioned_without_a_name_is_failure() -> None:
    decision = rules.decide_strategy(request(), profile(CHECK), "", new_name=_fixed_name)
    assert decision == FAILURE and decision.failed_attempt is False


def test_check_pre_provisioned_checks_the_secret_before_the_name() -> None:
    assert rules.decide_strategy(request(provision_secret="bad"), profile(CHECK), "") == NOT_FOUND_GUESS


# --- §4.5: DISABLED, X509_CERTIFICATE_CHAIN, anything else ------------------------------------------------


@pytest.mark.parametrize("name", ["dev", ""])
def test_disabled_is_not_found_even_with_the_right_secret(name: str) -> None:
    assert rules.decide_strategy(request(), profile(DISABLED), name) == NOT_FOUND_GUESS


def test_a_json_request_against_an_x509_chain_profile_is_not_found() -> None:
    # Our deviation: ThingsBoard throws "Invalid provision strategy type!" and never answers.
    chain = profile(CHAIN, provision_key="ab" * 32, provision_secret="MIIB...")
    assert rules.decide_strategy(request(provision_key="ab" * 32, provision_secret="MIIB..."), chain, "d") == (
        NOT_FOUND_GUESS
    )
    # As the admin API stores it: no secret at all.
    assert rules.decide_strategy(request(), profile(CHAIN, provision_secret=None), "d") == NOT_FOUND_GUESS


def test_an_unknown_strategy_is_not_found() -> None:
    # The Java switch has no default: it falls through to NOT_FOUND.
    assert rules.decide_strategy(request(), profile("SOMETHING_NEW"), "dev") == NOT_FOUND_GUESS


# --- §6: the pre-provisioned claim --------------------------------------------------------------------


def test_an_unclaimed_device_of_the_profile_is_claimed_with_its_stored_credentials() -> None:
    owner = profile(CHECK)
    stored = device(owner, value_enc=b"sealed")
    assert rules.decide_claim(owner, stored) == ClaimPreProvisioned(stored, b"sealed")


def test_an_absent_device_is_failure() -> None:
    assert rules.decide_claim(profile(CHECK), None) == FAILURE


def test_a_device_of_another_profile_is_failure() -> None:
    assert rules.decide_claim(profile(CHECK), device(profile(CHECK))) == FAILURE


@pytest.mark.parametrize("state", ["provisioned", "", "PROVISIONED", "pending"])
def test_any_provision_state_is_failure(state: str) -> None:
    # "provisioned" -> FAILURE (since 9f48acf05d); any other value -> FAILURE too (since b1bffdfd58).
    owner = profile(CHECK)
    assert rules.decide_claim(owner, device(owner, provision_state=state)) == FAILURE


def test_credentials_already_handed_out_are_failure() -> None:
    owner = profile(CHECK)
    assert rules.decide_claim(owner, device(owner, value_enc=None)) == FAILURE


def test_the_claim_answers_the_stored_credentials_and_ignores_the_request_ones() -> None:
    owner = profile(CHECK)
    stored = device(owner, credentials_type="MQTT_BASIC", credentials_id="u1")
    value = {"clientId": "c1", "userName": "u1", "password": "p1"}
    result = rules.claimed_result(stored, "dev-1", value)
    assert result == ProvisionResult(
        status=ProvisionStatus.SUCCESS, device_id=str(stored.id), device_name="dev-1",
        credentials_type=CredentialsType.MQTT_BASIC, credentials_value=value, credentials_id="u1",
    )


def test_provisioned_is_the_state_written() -> None:
    assert rules.PROVISIONED == "provisioned"


# --- §8.4: X.509 certificate chain ---------------------------------------------------------------------


LEAF_ID = "f" * 64


def verified(**fields: object) -> VerifyChainResult:
    values: dict[str, object] = {"ok": True, "profile_id": str(uuid.uuid4()), "leaf_common_name": "sensor-1",
                                 "leaf_body": "MIIBleaf", "leaf_credentials_id": LEAF_ID, **fields}
    return VerifyChainResult.model_validate(values)


def test_a_verified_chain_gives_the_profile_cn_and_leaf_credentials() -> None:
    answer = verified()
    identity = rules.verified_identity(answer)
    assert isinstance(identity, rules.X509Identity)
    assert str(identity.profile_id) == answer.profile_id and identity.common_name == "sensor-1"
    assert identity.credentials.credentials_type is CredentialsType.X509_CERTIFICATE
    assert (identity.credentials.credentials_id, identity.credentials.response_value) == (LEAF_ID, "MIIBleaf")


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (verified(ok=False, profile_id=None, error_message="no device profile holds the CA of this chain"),
         "no device profile holds the CA of this chain"),
        (verified(ok=False, error_message=None), MSG_FAILURE),
        (verified(profile_id=None), MSG_FAILURE),
        (verified(leaf_body=None), MSG_FAILURE),
        (verified(leaf_credentials_id=""), MSG_FAILURE),
        (verified(profile_id="not-a-uuid"), MSG_FAILURE),
    ],
)
def test_an_unverified_chain_is_failure_with_its_reason(answer: VerifyChainResult, message: str) -> None:
    assert rules.verified_identity(answer) == Refusal(ProvisionStatus.FAILURE, message)


def test_the_chain_profile_and_cn_give_the_device_name() -> None:
    chain = profile(CHAIN, certificate_regex=r"^(sensor-\d+)$")
    assert rules.x509_target(chain, "sensor-1") == rules.X509Target(chain, "sensor-1")


@pytest.mark.parametrize("other", [None, profile(ALLOW), profile(CHECK), profile(DISABLED)])
def test_a_chain_reaching_no_chain_profile_is_failure(other: ProfileRow | None) -> None:
    assert rules.x509_target(other, "sensor-1") == FAILURE


def test_a_cn_that_gives_no_name_is_failure_with_our_reason() -> None:
    chain = profile(CHAIN, certificate_regex=r"^(sensor-\d+)$")
    refusal = Refusal(ProvisionStatus.FAILURE, "Certificate CN does not match the device profile's pattern")
    assert rules.x509_target(chain, "camera-1") == refusal
    assert rules.x509_target(chain, None) == refusal


def test_the_existing_x509_device_of_the_profile_is_rotated() -> None:
    chain = profile(CHAIN)
    existing = device(chain, credentials_type="X509_CERTIFICATE", provision_state="provisioned")
    assert rules.decide_x509_device(chain, "sensor-1", existing) == RotateX509Credentials(existing.id)


def test_rotation_ignores_allow_create() -> None:
    chain = profile(CHAIN, allow_create_by_x509=False)
    existing = device(chain, credentials_type="X509_CERTIFICATE")
    assert rules.decide_x509_device(chain, "sensor-1", existing) == RotateX509Credentials(existing.id)


def test_a_device_of_another_profile_is_never_taken_over() -> None:
    existing = device(profile(CHAIN), credentials_type="X509_CERTIFICATE")
    assert rules.decide_x509_device(profile(CHAIN), "sensor-1", existing) == FAILURE


@pytest.mark.parametrize("ctype", ["ACCESS_TOKEN", "MQTT_BASIC", "LWM2M_CREDENTIALS"])
def test_a_device_without_x509_credentials_is_not_rotated(ctype: str) -> None:
    chain = profile(CHAIN)
    assert rules.decide_x509_device(chain, "sensor-1", device(chain, credentials_type=ctype)) == FAILURE


def test_an_unknown_device_is_created_when_the_profile_allows_it() -> None:
    assert rules.decide_x509_device(profile(CHAIN), "sensor-1", None) == CreateX509Device("sensor-1")


def test_an_unknown_device_is_failure_when_the_profile_does_not_allow_creation() -> None:
    assert rules.decide_x509_device(profile(CHAIN, allow_create_by_x509=False), "sensor-1", None) == FAILURE


# --- the service applies the decisions: wrong guesses feed the limiter -----------------------------------


class _Profiles:
    def __init__(self, row: object) -> None:
        self.row = row

    async def get(self, key: str) -> object:
        return self.row


def _core(row: object, limiter: RateLimiter) -> ProvisioningCore:
    core = ProvisioningCore(None, None, SecretBox(generate_key()), limiter)  # type: ignore[arg-type]
    core._profiles = _Profiles(row)  # type: ignore[assignment]
    return core


async def test_the_service_counts_wrong_secrets_and_then_refuses_that_source_whatever_its_secret() -> None:
    limiter = RateLimiter.in_memory(ProvisionLimits(failures_per_source_key=2))
    core = _core(profile(CHECK), limiter)
    for _ in range(2):
        wrong = await core.provision(request(provision_secret="bad", device_name="d", source_address="10.0.0.1"))
        assert wrong == ProvisionResult.not_found()
    for secret in ("bad", SECRET):
        refused = await core.provision(request(provision_secret=secret, device_name="d", source_address="10.0.0.1"))
        assert refused.error_message == "Too many failed provisioning attempts; retry later"
        assert refused.retry_after_s is not None and 0 < refused.retry_after_s <= 30
    # Another source with the right secret is not refused.
    assert (await limiter.right_secret(request(device_name="d", source_address="10.0.0.2"), "p")).admitted


async def test_the_service_does_not_count_refusals_that_are_not_guesses() -> None:
    core = _core(profile(CHECK), RateLimiter.in_memory(ProvisionLimits(failures_per_source_key=1)))
    for _ in range(3):
        assert await core.provision(request(provision_key="", device_name="d", source_address="10.0.0.1")) == (
            ProvisionResult.not_found())
        assert await core.provision(request(device_name=" ", source_address="10.0.0.1")) == ProvisionResult.failure()
        # CHECK_PRE needs a name
        assert await core.provision(request(device_name="", source_address="10.0.0.1")) == ProvisionResult.failure()


async def test_the_service_answers_disabled_and_chain_profiles_not_found() -> None:
    for row in (profile(DISABLED), profile(CHAIN, provision_secret=None), None):
        core = _core(row, RateLimiter.in_memory())
        assert await core.provision(request(device_name="d")) == ProvisionResult.not_found()


def test_supplied_credentials_do_not_change_the_strategy() -> None:
    req = request(credentials_type=CredentialsType.MQTT_BASIC, credentials=SuppliedCredentials(client_id="c"))
    assert rules.decide_strategy(req, profile(CHECK), "dev") == ClaimDevice("dev")
    assert rules.decide_strategy(req, profile(ALLOW), "dev") == CreateDevice("dev")
