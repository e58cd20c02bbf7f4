"""Prefect flows and deployments (orchestration only)."""
