"""The image modality: IDX/TFDS arrays in, DALI augmentation, classifiers out."""
