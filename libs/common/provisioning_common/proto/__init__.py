"""Protobuf message classes generated from ``transport.proto`` (ThingsBoard's field numbers)."""
