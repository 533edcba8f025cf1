"""Run an SAE through the reference SAELens implementation (cross-check helper).

Runs INSIDE .venv-saelens (made by scripts/setup_saelens_venv.sh), never in the
project venv, and must not import the project package:

    .venv-saelens/bin/python tests/saelens_bridge.py SAE_FOLDER INPUTS OUTPUTS

SAE_FOLDER is a SAELens v6 folder (cfg.json + sae_weights.safetensors) loaded with
sae_lens.SAE.load_from_disk on CPU. INPUTS is a safetensors file with a tensor
``x`` [N, d_in]. OUTPUTS receives ``feature_acts`` (sae.encode(x)) and ``x_hat``
(sae.decode(feature_acts); a transcoder's: its forward, sae(x), which adds a skip term), both
float32. One JSON line describing the loaded SAE
is printed to stdout.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version

import torch
from safetensors.torch import load_file, save_file


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    sae_folder, inputs_path, outputs_path = argv

    from sae_lens import SAE

    sae = SAE.load_from_disk(sae_folder, device="cpu")
    sae.eval()
    x = load_file(inputs_path)["x"]
    with torch.no_grad():
        feature_acts = sae.encode(x)
        if feature_acts.is_sparse:
            feature_acts = feature_acts.to_dense()
        x_hat = sae(x) if "transcoder" in sae.cfg.architecture() else sae.decode(feature_acts)
    save_file(
        {
            "x_hat": x_hat.float().contiguous(),
            "feature_acts": feature_acts.float().contiguous(),
        },
        outputs_path,
    )
    info = {
        "sae_lens_version": version("sae-lens"),
        "architecture": sae.cfg.architecture(),
        "sae_class": type(sae).__name__,
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "d_out": getattr(sae.cfg, "d_out", None),
        "k": getattr(sae.cfg, "k", None),
        "n": int(x.shape[0]),
    }
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
