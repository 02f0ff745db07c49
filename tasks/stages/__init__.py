"""The pipeline's stages, one module each, as dvc.yaml lists them: each `run(cfg, ws)` owns
its MLflow run, its files and its errors, and picks its modality's part."""
