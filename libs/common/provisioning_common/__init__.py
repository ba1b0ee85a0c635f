"""Shared contract of the provisioning services: models, wire dialects, bus RPC, settings, schema."""
