"""Train a SAELens SAE (TopK, BatchTopK, Matryoshka BatchTopK, standard or JumpReLU) on an
activation cache: the reference point for our benchmark.

Runs INSIDE .venv-saelens (scripts/setup_saelens_venv.sh) and does not import the
project package:

    .venv-saelens/bin/python bench/saelens_train.py --activations acts.safetensors \
        --k 32 --expansion-factor 8 --batch-size 4096 --total-steps 100 --json-out out.json

The activation file is a safetensors file with one tensor ``activations`` [N, d_in]
(float32 or bfloat16). No language model is involved.

Training uses SAELens's own pieces end to end: ``TopKTrainingSAE`` (its TopK forward,
MSE + AuxK loss, decoder-norm rescaling, 0.1 decoder init) — or, with ``--architecture``,
``BatchTopKTrainingSAE``, ``MatryoshkaBatchTopKTrainingSAE`` (``--matryoshka-widths``; default
d_sae / 8, / 4, / 2, d_sae as SAE Studio's), ``StandardTrainingSAE`` (L1 on
decoder-norm-weighted activations) or ``JumpReLUTrainingSAE`` (DeepMind's step L0 loss) —
driven by ``SAETrainer.fit()`` (Adam with its default betas, constant LR, grad-norm clipping
at 1.0, its dead-latent bookkeeping that feeds AuxK, and its folding of the normalization
factor into the weights at the end). SAETrainer accepts any iterator of batches as its data
provider, so we hand it an iterator over seeded permutations of the training rows (all rows
except the last ``--holdout``), epoch after epoch.

Timing covers ``fit()`` only, i.e. the training steps (batch gather from the in-memory
float32 tensor included). Loading the file and, for
``--normalize expected_average_only_in``, SAELens's estimate of the scaling factor are
done before the clock starts; we estimate that factor with SAELens's
``ActivationScaler.estimate_scaling_factor`` over one pass of the training rows
(SAELens's default would be 1000 batches, which may cycle a small file many times).

Metrics on the held-out rows (the last ``--holdout`` rows, never trained on):
  fvu   = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2   (mean over the held-out rows)
  l0    = mean number of non-zero latents per row
  dead_frac_heldout = fraction of latents that are zero on every held-out row
and from training:
  dead_frac = fraction of latents that fired on none of the tokens of the last
              min(100, total_steps) training steps (read from SAETrainer's
              n_forward_passes_since_fired counter).
  sae_lens_dead_frac = SAELens's own definition (no firing for more than
              dead_feature_window steps), which is the mask AuxK uses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import fields
from importlib.metadata import version


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--activations", required=True, help="safetensors file with `activations`")
    p.add_argument("--architecture", choices=["topk", "batchtopk", "matryoshka_batchtopk",
                                              "standard", "jumprelu"], default="topk")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--matryoshka-widths", default=None,
                   help="matryoshka_batchtopk: prefix widths, comma-separated, the last d_sae; "
                        "default d_sae / 8, / 4, / 2, d_sae (SAE Studio's default)")
    p.add_argument("--l1-coefficient", type=float, default=1.0, help="standard")
    p.add_argument("--l0-coefficient", type=float, default=1.0, help="jumprelu")
    p.add_argument("--sparsity-warm-up-steps", type=int, default=0,
                   help="l1 (standard) / l0 (jumprelu) warm-up steps")
    p.add_argument("--expansion-factor", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--total-steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--normalize", choices=["none", "expected_average_only_in"], default="none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout", type=int, default=4096, help="last N rows, never trained on")
    p.add_argument(
        "--dead-feature-window",
        type=int,
        default=None,
        help="steps without firing before SAELens calls a latent dead (feeds AuxK); "
        "default: SAELens's default",
    )
    p.add_argument("--json-out", default=None, help="also write the result JSON here")
    p.add_argument("--save-sae", default=None, help="save the inference SAE to this folder")
    p.add_argument("--progress", action="store_true", help="show SAELens's tqdm bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.progress:
        os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported

    import sae_lens
    import torch
    from sae_lens import SAETrainer
    from sae_lens.config import SAETrainerConfig
    from safetensors import safe_open

    with safe_open(args.activations, framework="pt") as f:
        acts = f.get_tensor("activations")
    if acts.ndim != 2:
        raise SystemExit(f"`activations` must be [N, d_in], got {list(acts.shape)}")
    source_dtype = str(acts.dtype).removeprefix("torch.")
    acts = acts.to(torch.float32)  # once, up front: the SAE trains in float32
    n_rows, d_in = acts.shape
    n_train = n_rows - args.holdout
    if args.holdout < 0 or n_train < args.batch_size:
        raise SystemExit(
            f"{n_rows} rows minus --holdout {args.holdout} leaves fewer than one batch "
            f"({args.batch_size})"
        )
    train, heldout = acts[:n_train], acts[n_train:]
    d_sae = d_in * args.expansion_factor

    def batches(seed: int) -> Iterator[torch.Tensor]:
        """Seeded permutations of the training rows, one after another (drop last)."""
        gen = torch.Generator().manual_seed(seed)
        while True:
            perm = torch.randperm(n_train, generator=gen)
            for start in range(0, n_train - args.batch_size + 1, args.batch_size):
                yield train[perm[start : start + args.batch_size]]

    torch.manual_seed(args.seed)  # SAE weight init uses the global RNG
    common = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
              "normalize_activations": args.normalize}
    warm = args.sparsity_warm_up_steps
    if args.matryoshka_widths:
        widths = [int(w) for w in args.matryoshka_widths.split(",")]
    else:
        widths = sorted({w for w in (d_sae // 8, d_sae // 4, d_sae // 2, d_sae) if w > 0})
    arch_options = {
        "topk": ("TopK", {"k": args.k}),
        "batchtopk": ("BatchTopK", {"k": args.k}),
        "matryoshka_batchtopk": ("MatryoshkaBatchTopK", {"k": args.k,
                                                         "matryoshka_widths": widths}),
        "standard": ("Standard", {"l1_coefficient": args.l1_coefficient,
                                  "l1_warm_up_steps": warm}),
        "jumprelu": ("JumpReLU", {"l0_coefficient": args.l0_coefficient,
                                  "l0_warm_up_steps": warm}),
    }
    prefix, extra = arch_options[args.architecture]
    sae_cfg = getattr(sae_lens, f"{prefix}TrainingSAEConfig")(**common, **extra)
    sae = getattr(sae_lens, f"{prefix}TrainingSAE")(sae_cfg)

    trainer_defaults = {f.name: f.default for f in fields(SAETrainerConfig)}
    dead_window = args.dead_feature_window or trainer_defaults["dead_feature_window"]
    trainer_cfg = SAETrainerConfig(
        total_training_samples=args.total_steps * args.batch_size,
        train_batch_size_samples=args.batch_size,
        lr=args.lr,
        lr_end=args.lr / 10,  # what LanguageModelSAERunnerConfig sets; unused by "constant"
        device="cpu",
        dead_feature_window=dead_window,
    )
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches(args.seed))

    if args.normalize == "expected_average_only_in":
        # fit() would do this itself, inside the timed region, from the training stream;
        # with the factor set, fit() keeps it (and folds it into the weights at the end).
        n_norm_batches = min(
            trainer_defaults["n_batches_for_norm_estimate"], n_train // args.batch_size
        )
        trainer.activation_scaler.estimate_scaling_factor(
            d_in=d_in,
            data_provider=batches(args.seed + 1),
            n_batches_for_norm_estimate=n_norm_batches,
        )
    scaling_factor = trainer.activation_scaler.scaling_factor

    t0 = time.perf_counter()
    sae = trainer.fit()
    seconds = time.perf_counter() - t0
    steps = trainer.n_training_steps

    window = min(100, steps)
    dead_frac = (trainer.n_forward_passes_since_fired >= window).float().mean().item()
    sae_lens_dead_frac = trainer.dead_neurons.float().mean().item()

    result: dict[str, object] = {
        "tool": "sae_lens",
        "version": version("sae-lens"),
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "settings": {
            "activations": args.activations,
            "source_dtype": source_dtype,
            "n_rows": n_rows,
            "n_train": n_train,
            "holdout": args.holdout,
            "d_in": d_in,
            "d_sae": d_sae,
            "k": args.k,
            "expansion_factor": args.expansion_factor,
            "batch_size": args.batch_size,
            "total_steps": args.total_steps,
            "lr": args.lr,
            "lr_scheduler": trainer_cfg.lr_scheduler_name,
            "adam_betas": [trainer_cfg.adam_beta1, trainer_cfg.adam_beta2],
            "normalize": args.normalize,
            "scaling_factor": scaling_factor,
            "seed": args.seed,
            "dead_feature_window": dead_window,
            "architecture": args.architecture,
            **{k: v for k, v in extra.items()},
            "aux_loss_coefficient": getattr(sae_cfg, "aux_loss_coefficient", None),
            "rescale_acts_by_decoder_norm": getattr(sae_cfg, "rescale_acts_by_decoder_norm",
                                                    None),
            "decoder_init_norm": getattr(sae_cfg, "decoder_init_norm", None),
        },
        "steps": steps,
        "seconds": seconds,
        "tokens_per_s": steps * args.batch_size / seconds,
        "dead_frac": dead_frac,
        "dead_frac_definition": f"no firing during the last {window} training steps",
        "sae_lens_dead_frac": sae_lens_dead_frac,
        "fvu": None,
        "l0": None,
        "dead_frac_heldout": None,
    }

    if args.holdout > 0:
        # After fit() the normalization factor is folded in: the SAE takes raw activations.
        sae.eval()
        err = torch.zeros((), dtype=torch.float64)
        active = torch.zeros((), dtype=torch.float64)
        fired = torch.zeros(d_sae, dtype=torch.bool)
        mean = heldout.double().mean(0)
        var = (heldout.double() - mean).pow(2).sum()
        with torch.no_grad():
            for chunk in heldout.split(args.batch_size):
                feats = sae.encode(chunk)
                if feats.is_sparse:
                    feats = feats.to_dense()
                x_hat = sae.decode(feats)
                err += (chunk.double() - x_hat.double()).pow(2).sum()
                nz = feats != 0
                active += nz.sum()
                fired |= nz.any(0)
        result["fvu"] = (err / var).item()
        result["l0"] = (active / args.holdout).item()
        result["dead_frac_heldout"] = 1.0 - fired.float().mean().item()

    if args.save_sae:
        sae.save_inference_model(args.save_sae)

    text = json.dumps(result, indent=2)
    print(json.dumps(result))  # one line: the last stdout line is the result
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
