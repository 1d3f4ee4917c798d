"""Sample videos from a trained run's exported weights (EMA by default).

    python launch/sample.py run.dir=runs/demo 'prompts=["a red circle moving left"]'
    python launch/sample.py run.dir=runs/demo sample.steps=30 sample.guidance=4 sample.seed=1 \
        sample.negative_prompt="a blue square" sample.out_dir=/tmp/out

Writes one mp4 per prompt and manifest.jsonl under RUN/samples/ (or sample.out_dir).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.common import hydra_overrides, run_cli  # noqa: E402


def main() -> None:
    import torch

    from vgen.config import ConfigError
    from vgen.sample import generate_to_dir, load_run_for_sampling

    overrides = hydra_overrides(sys.argv[1:])
    run_dirs = [o.split("=", 1)[1] for o in overrides if o.startswith("run.dir=")]
    if not run_dirs:
        raise ConfigError("run.dir=PATH is required: the run directory to sample from")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg, model, text_encoder, autoencoder = load_run_for_sampling(run_dirs[0], overrides, device=device)
    prompts = list(cfg.get("prompts") or []) or None
    out = cfg.sample.out_dir or os.path.join(run_dirs[0], "samples", "prompts")
    generate_to_dir(model, text_encoder, autoencoder, cfg, out, prompts=prompts)
    print(f"samples written to {out} (manifest.jsonl lists prompt -> file)")


if __name__ == "__main__":
    run_cli(main)
