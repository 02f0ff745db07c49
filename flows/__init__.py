"""Prefect flows and the command-line entry points that dvc.yaml calls."""
