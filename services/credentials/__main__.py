"""``python -m credentials``: serve the credentials RPC queue until SIGTERM."""

from __future__ import annotations

from provisioning_common import runtime
from provisioning_common.contract import CREDENTIALS
from provisioning_common.secretbox import SecretBox

from .service import CredentialsService


async def start(context: runtime.Context) -> runtime.Running:
    key = context.settings.data_encryption_key
    service = CredentialsService(await context.pool(), SecretBox(key.get_secret_value()) if key else None)
    return runtime.Running(serve=CREDENTIALS, handlers=service.handlers())


if __name__ == "__main__":
    runtime.run_service(CREDENTIALS.name, start)
