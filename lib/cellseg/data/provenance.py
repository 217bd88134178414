"""What a prepared cache was made from, and the refusal to use it for other parameters.

``manifest.json`` records ``DATASET``, the source folder (``DATA_ROOT``), the preparation parameters that change the
cache and a content fingerprint (a hash of every file's checksum, the splits and the class names). Training,
evaluation and the sbatch scripts compare them with the run's parameters before reading an image, so a tiny synthetic
cache left in ``RUN_DIR/data`` is never trained on by a later ``DATASET='bccd'`` job.

``python -m cellseg.data.provenance --notebook 01_train -- <papermill args>`` exits 0 when the cache fits the
parameters, 3 when there is none, 4 when it was made for other parameters (the difference on stderr), 2 on bad
arguments; ``slurm/common.sh`` re-prepares on 3 and 4.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from cellseg.data.cache import MANIFEST, load_manifest

# preparation option (manifest "parameters") -> the Config parameter that sets it
OPTION_PARAMS = {"seed": "SEED", "synth_num_images": "SYNTH_NUM_IMAGES", "synth_image_size": "SYNTH_IMAGE_SIZE",
                 "val_fraction": "VAL_FRACTION", "test_fraction": "TEST_FRACTION",
                 "consep_merge_classes": "CONSEP_MERGE_CLASSES"}


def content_fingerprint(manifest: dict[str, Any]) -> str:
    """Hash of what the cache holds: every file's SHA-256 (from the manifest), the splits and the class names."""
    body = {k: manifest.get(k) for k in ("format_version", "dataset", "class_names", "splits", "checksums")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_fingerprint(manifest: dict[str, Any]) -> str:
    """The manifest's recorded content fingerprint (computed for caches prepared before it was recorded)."""
    return manifest.get("content_fingerprint") or content_fingerprint(manifest)


def cache_differences(cfg, manifest: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(parameter, value the cache was made with, value of this run) for each preparation input that differs."""
    rows: list[tuple[str, Any, Any]] = []
    if manifest.get("dataset") != cfg.DATASET:
        rows.append(("DATASET", manifest.get("dataset"), cfg.DATASET))
        return rows  # the other rows would only repeat it
    if cfg.DATASET != "synthetic" and cfg.DATA_ROOT:
        source, root = manifest.get("source"), str(Path(cfg.DATA_ROOT).resolve())
        if source is not None and source != root:
            rows.append(("DATA_ROOT", source, root))
    params = manifest.get("parameters") or {}
    for option, name in OPTION_PARAMS.items():
        if option in params and params[option] != getattr(cfg, name):
            rows.append((name, params[option], getattr(cfg, name)))
    return rows


class CacheMismatch(ValueError):
    """The prepared cache was made for other parameters than the run's."""


def check_cache(cfg, cache_dir: str | Path | None = None, *, notebook: str | None = None) -> dict[str, Any]:
    """Load the manifest of ``DATA_CACHE`` and refuse a cache prepared for other parameters.

    ``notebook`` limits the comparison to the parameters that notebook declares (``01_train`` and ``02_evaluate``
    know DATASET, DATA_ROOT and SEED, not the preparation-only SYNTH_*/fractions, which keep their defaults there and
    would be compared against nothing the run set); None compares every preparation input (the batch scripts' check,
    which reads the whole parameter file).

    Returns:
        The manifest.

    Raises:
        FileNotFoundError: no prepared cache.
        CacheMismatch: naming each parameter, the cache's value and this run's, and the ways out.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else cfg.data_cache
    manifest = load_manifest(cache_dir)
    rows = cache_differences(cfg, manifest)
    if notebook is not None:
        from cellseg.config import NOTEBOOK_PARAMS

        rows = [r for r in rows if r[0] in NOTEBOOK_PARAMS[notebook]]
    if rows:
        table = "\n".join(f"  {n}: cache {a!r}, this run {b!r}" for n, a, b in rows)
        raise CacheMismatch(
            f"the prepared cache DATA_CACHE={cache_dir} ({cache_dir / MANIFEST}) was made for other parameters:\n"
            f"{table}\nWays out: prepare it for this run (notebooks/00_prepare_data.ipynb with the same parameters "
            f"rebuilds it in place), or point DATA_CACHE at another folder (a new RUN_DIR gets its own RUN_DIR/data), "
            f"or set the parameters back to the cache's values.")
    return manifest


def main(argv: list[str] | None = None) -> int:
    import argparse

    from cellseg.config import ConfigError, resolve_config
    from cellseg.slurm_helpers import parse_papermill_args

    ap = argparse.ArgumentParser(prog="python -m cellseg.data.provenance", description=__doc__.splitlines()[0])
    ap.add_argument("--notebook", default="01_train")
    ap.add_argument("papermill_args", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    rest = args.papermill_args[1:] if args.papermill_args[:1] == ["--"] else args.papermill_args
    try:
        cfg = resolve_config(parse_papermill_args(rest)[0], args.notebook)
    except (ConfigError, ValueError) as e:
        print(f"cellseg: {e}", file=sys.stderr)
        return 2
    try:
        manifest = check_cache(cfg)
    except FileNotFoundError as e:
        print(f"{e}", file=sys.stderr)
        return 3
    except (CacheMismatch, ValueError) as e:
        print(f"{e}", file=sys.stderr)
        return 4
    print(f"the prepared cache {cfg.data_cache} fits these parameters ({manifest.get('dataset')}, content "
          f"{cache_fingerprint(manifest)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
