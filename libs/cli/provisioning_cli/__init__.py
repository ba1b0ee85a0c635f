"""``provisioning``: the operator's command line for the admin API (profiles, devices, bulk import and export)."""
