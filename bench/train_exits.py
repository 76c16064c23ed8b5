"""Exit-head training throughput: frozen backbone against joint training, on the same data in one run.

    python bench/train_exits.py                       # 2,000 demo training samples, SDN heads at every exit
    python bench/train_exits.py --samples 500 --repeat 1   # quicker

A frozen backbone runs forward only (no_grad, eval mode) and only the heads take a backward pass, so
frozen training should reach at least twice the samples/s of joint training (goal: ratio >= 2).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from eetool.classification.exit_heads import ExitHeads, HeadsSpec, sdn_weights
from eetool.classification.head_training import ExitTrainer
from eetool.core.checkpoint import load_checkpoint
from eetool.core.datasets import Preprocess, load_dataset
from eetool.core.exits import build_exit_model
from eetool.core.training_loop import TrainConfig, fit


def samples_per_second(checkpoint: str, data: str, samples: int, batch_size: int, *, joint: bool) -> float:
    """One epoch of SDN heads at every exit; a fresh checkpoint each time so both runs start alike."""
    ck = load_checkpoint(checkpoint)
    train = load_dataset(data, "train")
    train = train.subset(torch.arange(min(samples, len(train))))
    em = build_exit_model(ck.model, "every")
    shapes = [list(s) for s in em.exit_shapes(ck.spec.input_shape)]
    torch.manual_seed(0)
    heads = ExitHeads(HeadsSpec("sdn", list(em.exits), shapes, ck.spec.num_classes, weights=sdn_weights(len(shapes))))
    trainer = ExitTrainer(em, heads, None, heads.spec.weights, joint=joint)
    cfg = TrainConfig(epochs=1, batch_size=batch_size, optimizer="adamw", lr=1e-3, augment=True)
    pre = Preprocess(ck.spec.input_shape, ck.spec.mean, ck.spec.std)
    result = fit(trainer, train, pre, cfg, params=trainer.trainable_parameters(), step=trainer.step)
    return result.samples_seen / result.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="demo")
    ap.add_argument("--data", default="demo")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=2, help="timed epochs of each kind")
    args = ap.parse_args()
    results: dict[str, object] = {"data": args.data, "checkpoint": args.checkpoint, "samples": args.samples,
                                  "threads": torch.get_num_threads()}
    samples_per_second(args.checkpoint, args.data, args.batch_size, args.batch_size, joint=True)  # warm-up
    frozen_runs, joint_runs = [], []
    for _ in range(args.repeat):  # alternate the two and keep the best of each: the machine's noise only adds time
        frozen_runs.append(samples_per_second(args.checkpoint, args.data, args.samples, args.batch_size, joint=False))
        joint_runs.append(samples_per_second(args.checkpoint, args.data, args.samples, args.batch_size, joint=True))
    frozen, joint = max(frozen_runs), max(joint_runs)
    results["frozen_samples_per_s"] = round(frozen, 1)
    results["joint_samples_per_s"] = round(joint, 1)
    results["frozen_over_joint"] = round(frozen / joint, 3)
    json.dump(results, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
