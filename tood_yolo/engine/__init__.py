"""Training and validation: the trainer, the validator, the AMP check and the model class that ties them to
Ultralytics' modes."""
