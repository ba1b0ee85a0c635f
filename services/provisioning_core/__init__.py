"""provisioning-core: applies a device profile's strategy and writes devices in one transaction."""
