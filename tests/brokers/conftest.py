"""Broker tests (issue 14): the shipped broker configurations on real brokers started privately.

The e2e stack fixtures (a private database and bus namespace per module, every service as a process) are
the e2e suite's, imported here; the brokers themselves are private instances on free ports, stopped by PID.
"""

from __future__ import annotations

from tests.e2e.conftest import admin, env, http, profile, stack, tls_files  # noqa: F401  (fixtures)
