"""CoAP transport gateway: ThingsBoard/Innoway provisioning and telemetry over CoAP (RFC 7252, aiocoap)."""
