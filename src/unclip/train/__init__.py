"""Training: one trainer for every stage (`trainer.train`) and the data feeds it reads."""
