"""Stage code of the training pipeline: pure cores plus thin file/MLflow shells.

One module per stage at this level (data, preprocess, train, evaluate, register; export
lives in serving/), next to what every stage shares (config, workspace, errors, the
modality seam). The packages hold one concern each: images/ and text/ (the two data
modalities), models/ (builders by name), training/ (checkpoints, recipe, devices),
tracking/ (the MLflow run, the store, the registry and its lock), serving/.
"""
