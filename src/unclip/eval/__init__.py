"""Evaluation (DESIGN §6): the judge network, GenEval-style prompts and scoring, Fréchet distance in
the judge's feature space, diversity, and `unclip eval`."""
