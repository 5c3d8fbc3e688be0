"""`unclip explain distance|manifold|clip`: run an explainer, write its figures and metrics.json.

Thin: parse, pick the preset, call `run_distance` / `run_manifold`, print what they measured.
The explainer modules (torch, scikit-learn, matplotlib) are imported only when a verb runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from unclip.argtypes import int_range, output_folder, threads

# scikit-learn (the split, t-SNE) takes seeds below 2^32; a larger one crashed after the work began.
_seed = int_range(0, 2**32 - 1, " (scikit-learn takes 32-bit seeds)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `explain` verb and its sub-verbs to the main CLI's subparsers."""
    explain = subparsers.add_parser(
        "explain", help="the explainers: distance learning and t-SNE on digits, the VAE manifold, CLIP's shared space",
        description=("Small, reproducible experiments on scikit-learn's 8×8 handwritten digits that show "
                     "the ideas behind CLIP latents (docs/explainers.md). Each runs in under a minute on "
                     "one CPU core and writes figures plus metrics.json. `unclip explain clip` shows how "
                     "CLIP's shared image-caption space extends the idea, with a trained CLIP."))
    sub = explain.add_subparsers(dest="explainer", metavar="EXPLAINER", required=True)
    verbs = (
        ("distance", _distance, "t-SNE of a classifier's hidden layer; a siamese net judging unseen digits",
         "Train a digit classifier and draw its last hidden layer with t-SNE (PNG and interactive HTML), "
         "then train a siamese network on pairs of digits 0-4 and measure how well it answers "
         "'same digit?' for digits 5-9 it never saw."),
        ("manifold", _manifold, "a VAE with a 2-D latent: the manifold of digits",
         "Train a VAE with a 2-D latent, sweep its decoder over a grid of the latent plane (PNG and SVG), "
         "draw reconstructions and the latent means, and count the digits the grid holds with a classifier."),
    )
    for name, func, help_text, description in verbs:
        verb = sub.add_parser(name, help=help_text, description=description)
        verb.add_argument("--out", default=f"out/explain/{name}", type=output_folder,
                          help=f"output folder (default: out/explain/{name})")
        verb.add_argument("--seed", type=_seed, default=0, help="seed of the data split and the weights "
                          f"{'and pairs ' if name == 'distance' else ''}(default: 0)")
        verb.add_argument("--quick", action="store_true", help="a few seconds: fewer epochs" +
                          (", a smaller t-SNE" if name == "distance" else "") + "; its numbers show that it runs, "
                          "not what the full run measures")
        _threads(verb)
        verb.set_defaults(func=func)
    clip = sub.add_parser(
        "clip", help="CLIP's shared space: images and captions compared by cosine, t-SNE of both",
        description="With a trained CLIP model: a similarity matrix of images against captions, zero-shot "
                    "colour and shape classification as the nearest caption (seen and held-out pairs, English "
                    "and Thai), and a t-SNE of image and caption embeddings together (PNG and interactive HTML).")
    clip.add_argument("--model", help="model directory holding a CLIP (e.g. runs/shapes/clip/model; default: the "
                                      "shipped shapes-world model's CLIP, docs/model_card.md)")
    clip.add_argument("--out", default="out/explain/clip", type=output_folder,
                      help="output folder (default: out/explain/clip)")
    clip.add_argument("--seed", type=_seed, default=0, help="t-SNE seed (default: 0)")
    clip.add_argument("-n", type=int_range(10, 5000, " (t-SNE needs more points than its neighbours)"), default=150,
                      help="scenes in the t-SNE (default: 150)")
    _threads(clip)
    clip.set_defaults(func=_clip)


def _threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=threads, default=1,
                        help="torch CPU threads (default: 1: these networks are so small that more threads only "
                             "wait on each other, and the figures are the same only at one thread count; 0: "
                             "torch's choice)")


def _use_threads(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def _print_files(paths: dict[str, Path]) -> None:
    print("  files:")
    for path in paths.values():
        print(f"    {path}")


def _distance(args: argparse.Namespace) -> int:
    _use_threads(args)
    from unclip.explain.digits import require_explain_deps

    require_explain_deps()
    from unclip.explain.distance import DistanceConfig, run_distance

    config = DistanceConfig.preset("quick" if args.quick else "full", seed=args.seed)
    report = run_distance(args.out, config=config, progress=True)
    m = report.metrics
    s = m["siamese"]

    def pair(space: str) -> str:
        return f"{s[space]['cosine']['unseen_accuracy']:.3f} / {s[space]['euclidean']['unseen_accuracy']:.3f}"

    print(f"Distance explainer ({'quick' if args.quick else 'full'}, seed {args.seed}) in {report.seconds:.1f} s")
    print(f"  digit classifier: test accuracy {m['classifier']['test_accuracy']:.3f} "
          f"on {m['classifier']['n_test']} held-out images")
    print(f"  t-SNE of its last hidden layer: a point's 5 nearest neighbours share its digit "
          f"{m['tsne']['01']['knn5_label_agreement']:.1%} (digits 0 and 1), "
          f"{m['tsne']['all']['knn5_label_agreement']:.1%} (all ten)")
    print(f"  siamese net trained on digits 0-4, {s['n_unseen_pairs']} balanced pairs of unseen digits 5-9, "
          f"accuracy cosine / euclidean:")
    print(f"    learned representation {pair('learned')}   (raw pixels {pair('pixels')}, "
          f"untrained network {pair('untrained')}, head output {pair('learned_head')})")
    if args.quick:  # a few epochs on few pairs: the learned space may not yet beat pixels (it does in a full run)
        print("  (--quick trains for seconds: these numbers show that it runs, not what distance learning buys; "
              "run without --quick for them, docs/explainers.md)")
    _print_files(report.paths)
    return 0


def _manifold(args: argparse.Namespace) -> int:
    _use_threads(args)
    from unclip.explain.digits import require_explain_deps

    require_explain_deps()
    from unclip.explain.manifold import ManifoldConfig, run_manifold

    config = ManifoldConfig.preset("quick" if args.quick else "full", seed=args.seed)
    report = run_manifold(args.out, config=config, progress=True)
    m = report.metrics
    print(f"Manifold explainer ({'quick' if args.quick else 'full'}, seed {args.seed}) in {report.seconds:.1f} s")
    print(f"  VAE with a 2-D latent: test negative ELBO {m['vae']['test_loss']:.2f} nats per image "
          f"(reconstruction {m['vae']['test_recon']:.2f} + KL {m['vae']['test_kl']:.2f}); the classifier "
          f"reads {m['vae']['test_recon_classified_as_original']:.1%} of test reconstructions as the original digit")
    print(f"  the {m['grid']['cells']}-cell manifold grid decodes to {m['grid']['distinct_classes']} distinct digits "
          f"({m['grid']['distinct_confident']} with probability >= 0.9), judged by a classifier with "
          f"test accuracy {m['judge']['test_accuracy']:.3f}")
    _print_files(report.paths)
    return 0


def _clip(args: argparse.Namespace) -> int:
    _use_threads(args)
    from unclip.explain.digits import require_explain_deps

    require_explain_deps()
    from unclip.explain.clipspace import run_clip_space

    if args.model is None:
        from unclip.pipeline import default_model_dir

        args.model = default_model_dir()
    report = run_clip_space(args.out, model_dir=args.model, n=args.n, seed=args.seed)
    m = report.metrics
    zs = m["zero_shot"]
    print(f"CLIP explainer in {report.seconds:.1f} s")
    print(f"  similarity matrix: {m['similarity_diagonal_wins']} of 8 images are closest to their own caption")
    print(f"  cosine of matched image-caption pairs {m['cosine_matched']:.3f}, unmatched {m['cosine_unmatched']:.3f}")
    for split in ("test", "unseen"):
        print(f"  zero-shot on {split} scenes, colour / shape: "
              + ", ".join(f"{lang} {zs[split][lang]['colour']:.3f} / {zs[split][lang]['shape']:.3f}" for lang in zs[split]))
    print(f"  t-SNE: a point's 5 nearest neighbours share its shape {m['tsne_neighbour_agreement_by_shape']:.1%}")
    _print_files(report.paths)
    return 0
