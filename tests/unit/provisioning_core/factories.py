"""Rows and requests for the provisioning-rules tests (no database: the rules are pure functions)."""

from __future__ import annotations

import uuid
from typing import Any

from provisioning_common.db.repository import NamedDevice, ProfileRow
from provisioning_common.models import ProvisionRequest, ProvisionStrategy

KEY = "u7piawkboq8v32dmcmpp"
SECRET = "jpmwdn8ptlswmf4m29bw"


def profile(
    strategy: ProvisionStrategy | str = ProvisionStrategy.ALLOW_CREATE_NEW_DEVICES, **fields: Any
) -> ProfileRow:
    """A device profile row; ``provision_key``/``provision_secret`` default to KEY/SECRET."""
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "name": "thermostats",
        "provision_strategy": strategy.value if isinstance(strategy, ProvisionStrategy) else strategy,
        "provision_key": KEY,
        "provision_secret": SECRET,
        **fields,
    }
    return ProfileRow(**values)


def request(**fields: Any) -> ProvisionRequest:
    """A ThingsBoard request carrying KEY and SECRET unless told otherwise."""
    return ProvisionRequest(**{"provision_key": KEY, "provision_secret": SECRET, **fields})


def device(owner: ProfileRow, **fields: Any) -> NamedDevice:
    """An unclaimed pre-provisioned ACCESS_TOKEN device of ``owner`` with encrypted credentials."""
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "profile_id": owner.id,
        "provision_state": None,
        "credentials_type": "ACCESS_TOKEN",
        "credentials_id": "0" * 64,
        "value_enc": b"encrypted",
        **fields,
    }
    return NamedDevice(**values)
