"""Stage code of the training pipeline: pure cores plus thin file/MLflow shells."""
