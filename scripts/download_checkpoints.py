"""Download the official IDDPM CIFAR-10 checkpoints into <checkpoint_dir>/iddpm/ (and, when named, ITD's
published fine-tuned weights into <checkpoint_dir>/<kind>/, checked against their sha256 and size, or
DDPM's google/ddpm-cifar10-32 into the Hugging Face hub's cache).

    python scripts/download_checkpoints.py                      # both official IDDPM files
    python scripts/download_checkpoints.py iddpm_cifar10_vlb    # one
    python scripts/download_checkpoints.py iddpm_cifar10_itd_tuned ddpm_cifar10_itd_tuned
    python scripts/download_checkpoints.py ddpm_cifar10         # the hub's diffusers folder (its cache)
    python scripts/download_checkpoints.py --checkpoint-dir /data/checkpoints

The URLs are those of src/itdiffusion/conf/model/<name>.yaml; files already present are kept. Prints each
file's path and sha256.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

from itdiffusion.errors import UserError
from itdiffusion.models import ddpm_weights
from itdiffusion.models.iddpm import resolve_checkpoint
from itdiffusion.models.weights import CheckpointError, file_sha256

CONF_DIR = Path(__file__).resolve().parent.parent / "src" / "itdiffusion" / "conf" / "model"
OFFICIAL = ("iddpm_cifar10_vlb", "iddpm_cifar10_hybrid")
KNOWN = (*OFFICIAL, "iddpm_cifar10_itd_tuned", "ddpm_cifar10_itd_tuned",  # ITD's published tuned weights
         "ddpm_cifar10")  # a hub id (model.pretrained): printed as its folder in the hub's cache


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help=f"model configs whose checkpoint_url to fetch, of {KNOWN} (default: {OFFICIAL})")
    parser.add_argument("--checkpoint-dir", default="checkpoints", help="default: checkpoints")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models) - set(KNOWN))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {KNOWN}")
    for name in args.models or OFFICIAL:
        cfg = OmegaConf.load(CONF_DIR / f"{name}.yaml")
        if cfg.get("pretrained") and not cfg.get("checkpoint_url"):
            try:
                folder = ddpm_weights.pretrained_dir(cfg)
            except UserError as e:
                print(f"{name}: {e}", file=sys.stderr)
                return 1
            weights = next(folder / f for f in ddpm_weights.WEIGHT_FILES if (folder / f).is_file())
            print(f"{name}: {folder} sha256={file_sha256(weights)}")
            continue
        try:
            source = {"name": name, "kind": cfg.get("kind", "iddpm"), "checkpoint": None,
                      **{k: cfg.get(k) for k in ("checkpoint_url", "checkpoint_sha256", "checkpoint_bytes",
                                                 "checkpoint_file")}}
            path = resolve_checkpoint(source, args.checkpoint_dir)
        except CheckpointError as e:
            print(f"{name}: {e}", file=sys.stderr)
            return 1
        print(f"{name}: {path} sha256={file_sha256(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
