"""Admin API: device profiles and pre-provisioned devices (bearer-token protected)."""
