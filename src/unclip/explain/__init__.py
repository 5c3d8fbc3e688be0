"""Explainers: small, reproducible experiments that show the ideas behind CLIP latents.

The project's source text explains unCLIP with two digressions on handwritten digits; these
modules turn them into tools that run in well under a minute on one CPU core, on scikit-learn's
bundled 8×8 digits (no download). docs/explainers.md walks through the figures and numbers.

- `unclip.explain.distance`: a digit classifier whose last hidden layer, drawn with t-SNE, groups
  the digits; `run_distance` also runs the siamese experiment and writes every figure.
- `unclip.explain.siamese`: "learning to compare", a siamese network trained on digits 0–4 that
  decides "same digit?" for digits 5–9 it never saw, by a similarity threshold.
- `unclip.explain.manifold`: a VAE with a 2-D latent whose decoder, swept over the latent plane,
  draws the manifold of digits; a classifier counts the digits the plane holds.
- `unclip.explain.tsne_html`: a self-contained interactive HTML scatter (hover shows each image).
- `unclip.explain.digits`: the shared data split, seeded initialisation and figure helpers.

The command line is `unclip explain distance|manifold`; `unclip.explain.cli` imports the
modules above (torch, scikit-learn, matplotlib) only when a verb runs. The CLIP explainer
(`unclip explain clip`) comes with the CLIP stage. Requires the `explain` extra.
"""
