"""Real evaluation folders for the report and label tests: ``worker.engine.evaluate`` run on a
tiny randomly initialised model (``tests/engine/tiny_models.py``: a causal GPT-2 or a BERT)
with a random SAE, on a few KJV contexts.

``evaluation(family, **options)`` evaluates once per process and options (a few seconds) and
returns ``(folder, Evaluation)``; ``install_evaluation(training, family, **options)`` copies
that folder to the training's ``<out_dir>/eval`` (the training row needs an ``out_dir``) and
returns the Evaluation, whose tensors the tests compare the reader's answers with.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

CONTEXTS, CONTEXT_SIZE = 8, 16
EXPANSION = 4
_CACHE: dict[tuple[Any, ...], tuple[Path, Any]] = {}


def evaluation(family: str = "gpt2", **options: Any) -> tuple[Path, Any]:
    """``(eval folder, Evaluation)`` of a random TopK SAE (k 4, 4x) on layer 1 of a tiny
    ``family`` model; ``options`` go to ``EvalOptions`` (defaults: top_n 3, windows 3 + 1 + 2,
    batches of 4 contexts)."""
    key = (family, tuple(sorted(options.items())))
    if key in _CACHE:
        return _CACHE[key]
    import torch

    from tests.engine.tiny_models import kjv_lines, make_tiny_model
    from worker.engine import architectures, evaluate
    from worker.engine.models import load_model

    root = Path(tempfile.mkdtemp(prefix=f"sae-eval-{family}-"))
    loaded = load_model(str(make_tiny_model(family, root / f"tiny-{family}")))
    tok = loaded.tokenizer
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
    ids: list[int] = []
    for line in kjv_lines(200):
        ids += [start] + tok(line, add_special_tokens=False)["input_ids"]
        if len(ids) >= CONTEXTS * CONTEXT_SIZE:
            break
    contexts = np.array(ids[:CONTEXTS * CONTEXT_SIZE], dtype=np.int32).reshape(CONTEXTS,
                                                                                 CONTEXT_SIZE)
    torch.manual_seed(1)
    d = loaded.model.config.hidden_size
    sae = architectures.build("topk", d, EXPANSION * d, k=4)
    opts = evaluate.EvalOptions(**{"top_n": 3, "window_before": 3, "window_after": 2,
                                   "batch_contexts": 4, **options})
    ev = evaluate.evaluate_sae(sae, 1.0, loaded, contexts, 1, "residual",
                               special_ids=list(tok.all_special_ids), options=opts,
                               meta={"step": 7, "model": f"tiny-{family}"})
    folder = evaluate.save_evaluation(ev, root / "eval")
    _CACHE[key] = (Path(folder), ev)
    return _CACHE[key]


def install_evaluation(training: Any, family: str = "gpt2", **options: Any) -> Any:
    """Copy ``evaluation(family, **options)``'s folder into ``training``'s run folder."""
    folder, ev = evaluation(family, **options)
    target = Path(training.out_dir) / "eval"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(folder, target)
    return ev
