"""What `make serve` stands on: the services it supervises (services.py), each one's
environment (env.py), the credential and locked job template (security.py), and the team
stores behind them (backing.py: PostgreSQL in postgres.py, S3 in object_store.py)."""
