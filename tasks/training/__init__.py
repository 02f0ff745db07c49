"""How the train stage fits a model: recipe, checkpoints, and the devices it runs on."""
