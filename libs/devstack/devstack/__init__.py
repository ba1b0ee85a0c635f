"""Runs the whole stack as local processes: used by ``make up`` and by the e2e tests."""

from .stack import SERVICES, ServiceProcess, Stack, free_port

__all__ = ["SERVICES", "ServiceProcess", "Stack", "free_port"]
