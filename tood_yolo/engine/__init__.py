"""Training and validation: assigners, the loss, the recipes, the trainer, the validator, the AMP check and the model
class that ties them to Ultralytics' modes."""
