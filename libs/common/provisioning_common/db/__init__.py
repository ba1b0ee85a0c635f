"""Postgres schema (versioned migrations) and the queries shared by the services that own data."""
