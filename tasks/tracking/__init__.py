"""MLflow as the pipeline uses it: one run per pipeline execution shared by the stages
(runs.py), reaching the store in bounded time and telling transient failures from others
(store.py, artifacts.py), what a version is tagged with to be rebuilt (lineage.py), the
registry's rules (registry.py) and the lock that serializes them (registry_lock.py)."""
