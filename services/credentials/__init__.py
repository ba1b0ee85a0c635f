"""credentials service: mints tokens, hashes certificates and passwords, authenticates devices."""
