"""Does a VLM bind colour to shape, or only notice both? (docs/vlm.md, "Hallucination: binding in yes/no probes").

POPE's adversarial probes (:func:`difflab.data.vqa.pope_cases`) ask an attribute swap of the scene: 'is there
a red square?' beside a red circle and a blue square. ``data.existence_swaps`` trains on such questions, so
the probe alone cannot tell binding learned from the probe's form learned. This asks the same swaps in a form
the swaps never train: 'how many red squares?' (truth 0), beside the same count of a shown pair (truth its
number), and the existence probes themselves, on held-out scenes of one evaluation seed:

    run                      swap: 'is there?'   swap: 'how many?'   shown: 'how many?'
    runs/grounded            0.984 (n=500)       0.886               0.984

Each column is an accuracy as ``difflab eval`` reads answers: 'no' to the swapped existence probe (POPE's
reading), '0' to its count and the true number to the shown pair's count (exact match).

    python benchmarks/vlm_binding.py runs/grounded runs/llava --n 1000 --seed 5
"""

from __future__ import annotations

import argparse

import torch

from difflab.data.vqa import VQAItem, pope_cases
from difflab.models import vlm
from difflab.models.vlm_eval import batched, score_pope, score_vqa
from difflab.world.language import Question, answer
from difflab.world.parse import parse_question


def binding(run: str, n: int, seed: int) -> dict:
    """Accuracies on ``n`` adversarial POPE cases (half shown pairs, half swaps) and their counts, read as
    the evaluator reads them (:func:`score_pope`, :func:`score_vqa`)."""
    model, cfg = vlm.load_model(run)
    probes = pope_cases(cfg.data.world_config(), n, seed=seed, setting="adversarial", heldout=cfg.data.pairs())
    counts = []
    for c in probes:
        question = Question("count", parse_question(c.question).spec)
        counts.append(VQAItem(c.image, c.scene, question.text(), answer(question, c.scene), "count", c.heldout_pair))

    def answer_fn(images, questions):
        return vlm.answer(model, cfg, images, questions)

    with torch.no_grad():
        said_exists, said_count = batched(answer_fn, probes, 100, True), batched(answer_fn, counts, 100, True)
    swap = [k for k, c in enumerate(probes) if c.answer == "no"]
    shown = [k for k, c in enumerate(probes) if c.answer == "yes"]

    def count_accuracy(ks) -> float:
        return score_vqa([counts[k] for k in ks], [said_count[k] for k in ks])["overall"]["accuracy"]

    return {
        "run": run,
        "n": len(swap),
        "swap_exists": score_pope([probes[k] for k in swap], [said_exists[k] for k in swap])["adversarial"]["accuracy"],
        "swap_count": count_accuracy(swap),
        "shown_count": count_accuracy(shown),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="vlm runs")
    p.add_argument("--n", type=int, default=1000, help="adversarial POPE cases (even; half of them swaps)")
    p.add_argument("--seed", type=int, default=5, help="evaluation seed (default 5: one no choice was made on)")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"{'run':40s} swap: 'is there?'   swap: 'how many?'   shown: 'how many?'")
    for run in args.runs:
        r = binding(run, args.n, args.seed)
        print(f"{run:40s} {r['swap_exists']:.3f} (n={r['n']})".ljust(61)
              + f"{r['swap_count']:.3f}".ljust(20) + f"{r['shown_count']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
