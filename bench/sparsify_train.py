"""Train a skip transcoder with EleutherAI's sparsify (``eai-sparsify``): the reference point
for our transcoder benchmark, since SAELens loads transcoders but has no trainer for them.

Runs INSIDE .venv-saelens (scripts/setup_saelens_venv.sh installs sparsify there too) and does
not import the project package:

    .venv-saelens/bin/python bench/sparsify_train.py --model data/models/smollm2-135m \
        --tokens train_tokens.npy --layer 15 --k 32 --expansion-factor 8 --batch-size 32 \
        --skip-connection --heldout heldout.safetensors --out DIR --json-out out.json

sparsify trains from the language model itself: ``sparsify.Trainer.fit()`` runs the model's
forward pass on each batch of token ids, and a forward hook on ``layers.{layer}.mlp`` hands the
MLP's input and output (``transcode=True``) to the sparse coder, which is trained on the FVU
loss right there; the SAEs are saved at the end (``save_every`` past the last step). Settings
are sparsify's defaults apart from the shape we compare (``k``, ``expansion_factor``,
``skip_connection``): Signum with schedule-free averaging, its learning rate from the number of
latents, no AuxK (``auxk_alpha`` 0), fp32 on the CPU. ``--tokens`` is a .npy int array
[n_contexts, context] of token ids (the same training contexts SAE Studio trains on);
``--batch-size`` counts contexts, so steps = n_contexts // batch_size.

``--heldout``: a safetensors file with ``x`` (MLP inputs) and ``y`` (MLP outputs) [n, d] of
held-out tokens, which the saved transcoder (loaded back from disk as a user would) is
evaluated on with sparsify's own forward:

  fvu   = sum ||y - y_hat||^2 / sum ||y - mean(y)||^2
  l0    = mean number of non-zero latents per row

and from training: ``dead_frac``, the fraction of latents that fired on none of the training
tokens (sparsify's ``num_tokens_since_fired`` equal to every token seen). ``train_s`` is the
clock around ``fit()`` (model forward passes, the coder's steps, the final save).
The last stdout line is the JSON result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib.metadata import version


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a local Hugging Face model folder")
    p.add_argument("--tokens", required=True, help=".npy token ids [n_contexts, context]")
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--expansion-factor", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32, help="contexts per step")
    p.add_argument("--skip-connection", action="store_true")
    p.add_argument("--heldout", default=None, help="safetensors with x and y [n, d]")
    p.add_argument("--out", required=True, help="sparsify's save_dir")
    p.add_argument("--json-out", default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch
    from datasets import Dataset
    from safetensors.torch import load_file
    from sparsify import SparseCoder, SparseCoderConfig, TrainConfig, Trainer
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tokens = np.load(args.tokens).astype(np.int64)
    dataset = Dataset.from_dict({"input_ids": tokens}).with_format("torch")
    steps = len(dataset) // args.batch_size
    hookpoint = f"layers.{args.layer}.mlp"
    cfg = TrainConfig(
        SparseCoderConfig(expansion_factor=args.expansion_factor, k=args.k, transcode=True,
                          skip_connection=args.skip_connection),
        batch_size=args.batch_size, hookpoints=[hookpoint], init_seeds=[args.seed],
        log_to_wandb=False, save_every=steps + 1, save_dir=args.out, run_name="run")
    trainer = Trainer(cfg, dataset, model)
    t0 = time.perf_counter()
    trainer.fit()
    train_s = time.perf_counter() - t0
    seen = steps * args.batch_size * tokens.shape[1]
    never_fired = trainer.num_tokens_since_fired[hookpoint] >= seen
    result: dict = {
        "tool": "sparsify", "sparsify_version": version("eai-sparsify"),
        "torch_version": torch.__version__, "threads": torch.get_num_threads(),
        "hookpoint": hookpoint, "steps": steps, "batch_tokens": args.batch_size * tokens.shape[1],
        "train_tokens": seen, "train_s": train_s, "tokens_per_s": seen / train_s,
        "dead_frac": float(never_fired.float().mean()),
        "out": os.path.join(args.out, "run", hookpoint),
    }
    if args.heldout:
        coder = SparseCoder.load_from_disk(result["out"])
        pairs = load_file(args.heldout)
        x, y = pairs["x"].float(), pairs["y"].float()
        err = total = nonzero = 0.0
        mean = y.mean(0)
        with torch.no_grad():
            for xc, yc in zip(x.split(4096), y.split(4096), strict=True):
                out = coder(x=xc, y=yc)
                err += float((out.sae_out.float() - yc).pow(2).sum())
                total += float((yc - mean).pow(2).sum())
                nonzero += float((out.latent_acts != 0).sum())
        result.update(fvu=err / total, l0=nonzero / len(x), heldout_tokens=len(x))
    line = json.dumps(result)
    if args.json_out:
        with open(args.json_out, "w") as fh:
            fh.write(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
