"""HTTP transport gateway: ThingsBoard/Innoway provisioning and telemetry over HTTP (FastAPI)."""
