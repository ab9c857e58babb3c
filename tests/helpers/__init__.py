"""Shared test helpers: real image artifacts (OCI layouts, docker-save archives) and bundle tampering."""
