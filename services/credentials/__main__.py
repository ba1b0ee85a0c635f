"""``python -m credentials``: serve the credentials RPC queues until SIGTERM.

Two queues, one process: ``credentials`` (``authenticate``: device logins, for the gateways and
broker_auth) and ``credentials.internal`` (preparing and minting credentials, verifying chains and
signing certificates), whose exchange only provisioning-core and admin-api may write to.
"""

from __future__ import annotations

from provisioning_common import runtime
from provisioning_common.contract import CREDENTIALS, CREDENTIALS_INTERNAL
from provisioning_common.secretbox import SecretBox

from .service import CredentialsService


async def start(context: runtime.Context) -> runtime.Running:
    key = context.settings.data_encryption_key
    service = CredentialsService(await context.pool(), SecretBox(key.get_secret_value()) if key else None)
    handlers = list(service.handlers())
    public = [handler for handler in handlers if handler.method.service is CREDENTIALS]
    internal = [handler for handler in handlers if handler.method.service is not CREDENTIALS]
    return runtime.Running(serve=CREDENTIALS, handlers=public, also_serve=[(CREDENTIALS_INTERNAL, internal)])


if __name__ == "__main__":
    runtime.run_service(CREDENTIALS.name, start)
