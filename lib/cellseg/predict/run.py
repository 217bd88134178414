"""Prediction over many inputs: windows streamed from the reader, resumable progress, exports and summaries.

Per input, ``DIR/<stem>/`` receives ``instances.tif``, ``cells.geojson``, ``cells.csv``, ``overlay.png`` and
``summary.json``; ``DIR/summary.csv`` has one row per input (rebuilt from the inputs' ``summary.json``, so array
jobs writing into one folder all end up in it). A stop request (signal, ``DIR/STOP``, ``STOP_AT``) is honoured after
the current window (one batch of tiles): its instances are on disk and ``progress.json`` records it, and the next run
with the same settings continues there. A bad input (unreadable, wrong channels, no tissue) is reported by name and
the others are still processed.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellseg.checkpoint.atomic import atomic_write_json
from cellseg.inference import predict_instances, tile_starts
from cellseg.predict.export import (
    density_per_mm2,
    thumb_step_for,
    write_instances,
    write_overlay,
    write_tables,
)
from cellseg.predict.readers import InputError, collect_inputs, open_reader
from cellseg.predict.settings import Predictor
from cellseg.predict.tiling import (
    boxes_meet,
    load_part,
    owned_instances,
    plan_windows,
    resolve_overlaps,
    save_part,
    window_margin,
)
from cellseg.predict.tissue import tissue_mask, window_has_tissue

log = logging.getLogger(__name__)

SEAM_RULE = ("an instance belongs to the window whose core holds its centroid; windows overlap their neighbours' "
             "cores by margin >= OBJECT_DIAMETER pixels")
COORDINATES = ("level-0 pixels, x then y, origin at the top-left corner of the top-left pixel (pixel centres at "
               "+0.5)")


@dataclass
class PredictSettings:
    """How to predict (the ``PREDICT_*``, ``TILE_*``, ``TTA`` parameters)."""

    out_dir: Path
    level: int = -1
    mpp: float | None = None
    tissue: bool = True
    window: int = 1024
    tile_size: int | None = None
    overlap: float = 0.25
    tta: bool = False
    amp: str = "none"
    batch_size: int = 4
    device: torch.device | str | None = None
    log_every_s: float = 10.0


def _signature(pred: Predictor, path: Path, s: PredictSettings, shape: tuple[int, int], level: int) -> dict:
    """What the saved progress depends on: a different checkpoint, input or setting starts the input over."""
    st = path.stat()
    return {"input": str(path.resolve()), "size": st.st_size, "mtime": int(st.st_mtime), "shape": list(shape),
            "level": level, "checkpoint_sha256": pred.sha256, "postprocess": pred.pp_params, "window": s.window,
            "tile_size": s.tile_size, "overlap": s.overlap, "tta": s.tta, "amp": s.amp, "tissue": s.tissue}


def _tiles_in(box: tuple[int, int, int, int], tile: int | None, overlap: float) -> int:
    h, w = box[2] - box[0], box[3] - box[1]
    if tile is None or (h <= tile and w <= tile):
        return 1
    return len(tile_starts(h, min(tile, h), overlap)) * len(tile_starts(w, min(tile, w), overlap))


def predict_one(pred: Predictor, path: Path, s: PredictSettings, stop: Any = None) -> dict:
    """Predict one input into ``s.out_dir / path.stem``. Returns its summary record (``status`` 'finished' or
    'stopped').

    Raises:
        InputError: the input cannot be predicted (the caller reports it and goes on).
    """
    out = s.out_dir / path.stem
    parts = out / "parts"
    reader = open_reader(path)
    try:
        target_mpp = s.mpp or pred.train_mpp
        res_note = reader.select_level(s.level, target_mpp)
        if res_note:
            log.warning("%s", res_note)
        height, width = reader.height, reader.width
        margin = window_margin(pred.object_diameter)
        windows = plan_windows(height, width, s.window, margin)
        analysed_px = float(height * width)
        todo = [w.index for w in windows]
        thumb = None
        if s.tissue and reader.is_slide:
            thumb, scale = reader.thumbnail()
            mask = tissue_mask(thumb)
            if not mask.any():
                raise InputError(f"{path}: no tissue detected on its thumbnail (an empty slide?); set PREDICT_TISSUE "
                                 "False to predict it anyway")
            todo = [w.index for w in windows if window_has_tissue(mask, scale, w.core)]
            # the cells counted are those whose centroid lies in a predicted core: density is relative to those cores
            analysed_px = float(sum((windows[i].core[2] - windows[i].core[0]) * (windows[i].core[3] - windows[i].core[1])
                                    for i in todo))
        sig = _signature(pred, path, s, (height, width), reader.level)
        progress_file = out / "progress.json"
        progress = json.loads(progress_file.read_text()) if progress_file.exists() else None
        if progress is None or progress.get("signature") != sig or progress.get("todo") != todo:
            if progress is not None:
                log.info("%s: settings, checkpoint or input changed since the saved progress: starting over", path.name)
            shutil.rmtree(parts, ignore_errors=True)
            progress = {"signature": sig, "todo": todo, "done": 0, "counts": {}, "cut": 0, "seconds": 0.0,
                        "finished": False}
        if progress.get("finished") and (out / "summary.json").exists():
            log.info("%s: already predicted (%s); delete %s to predict again", path.name, out / "summary.json", out)
            return json.loads((out / "summary.json").read_text())
        parts.mkdir(parents=True, exist_ok=True)
        n_tiles = {i: _tiles_in(windows[i].box, s.tile_size, s.overlap) for i in todo}
        total_tiles = sum(n_tiles.values())
        tiles_done = sum(n_tiles[i] for i in todo[:progress["done"]])
        if progress["done"]:
            log.info("%s: resuming at window %d of %d", path.name, progress["done"] + 1, len(todo))
        t0, tiles_now, last_log = time.perf_counter(), 0, time.perf_counter()
        stopped = None
        for k in range(progress["done"], len(todo)):
            win = windows[todo[k]]
            y0, x0, y1, x1 = win.box
            region = reader.read(y0, x0, y1 - y0, x1 - x0)
            result = predict_instances(pred.model, region, pp_params=pred.pp_params, tile_size=s.tile_size,
                                       overlap=s.overlap, tta=s.tta, amp=s.amp, device=s.device,
                                       batch_size=s.batch_size, scale=pred.input_scale)
            part = owned_instances(result, win, (height, width))
            earlier = [load_part(parts, j) for j in todo[:k] if progress["counts"].get(str(j))
                       and boxes_meet(windows[j].box, win.box)]
            part, dropped = resolve_overlaps(part, win, earlier)
            progress["duplicates"] = progress.get("duplicates", 0) + dropped
            save_part(parts, win.index, part)
            progress["counts"][str(win.index)] = int(len(part["area"]))
            progress["cut"] += int(part["cut"])
            progress["done"] = k + 1
            tiles_now += n_tiles[win.index]
            elapsed = time.perf_counter() - t0
            reason = stop.reason if stop is not None else None
            if reason is not None or time.perf_counter() - last_log >= s.log_every_s or k + 1 == len(todo):
                rate = tiles_now / max(elapsed, 1e-9)
                left = (total_tiles - tiles_done - tiles_now) / max(rate, 1e-9)
                log.info("%s: window %d/%d, tiles %d/%d, %.2f tiles/s, %.0f s left", path.name, k + 1, len(todo),
                         tiles_done + tiles_now, total_tiles, rate, left)
                last_log = time.perf_counter()
            if reason is not None and k + 1 < len(todo):
                stopped = reason
                break
            atomic_write_json(progress_file, progress)
        run_seconds = time.perf_counter() - t0
        progress["seconds"] += run_seconds
        progress.setdefault("tiles_per_s", [])
        if tiles_now:
            progress["tiles_per_s"].append(tiles_now / max(run_seconds, 1e-9))
        atomic_write_json(progress_file, progress)
        if stopped is not None:
            log.warning("%s: stopped after window %d of %d (%s); run again to continue", path.name, progress["done"],
                        len(todo), stopped)
            return {"input": str(path), "status": "stopped", "reason": stopped, "windows_done": progress["done"],
                    "windows": len(todo)}
        counts = [progress["counts"].get(str(w.index), 0) for w in windows]
        step = thumb_step_for(height, width)
        mpp0 = reader.levels[0].mpp
        lab_thumb, cls_thumb = write_instances(out, parts, windows, counts, height=height, width=width,
                                               mpp=reader.mpp, thumb_step=step)
        tables = write_tables(out, parts, windows, counts, class_names=pred.class_names,
                              downsample=reader.downsample, mpp0=mpp0, name=path.name)
        image = reader.read(0, 0, height, width) if not reader.is_slide else (
            thumb if thumb is not None else reader.thumbnail()[0])
        write_overlay(out / "overlay.png", image, lab_thumb, cls_thumb)
        area_px0 = analysed_px * reader.downsample ** 2
        summary = {
            "input": str(path), "status": "finished", "reader": reader.kind, "level": reader.level,
            "level_shape": [height, width], "downsample": reader.downsample, "mpp": reader.mpp, "mpp_level0": mpp0,
            "resolution_note": res_note, "n_cells": tables["n_cells"], "per_class": tables["per_class"],
            "analysed_area_px0": area_px0,
            "analysed_area": "the cores of the predicted windows (all of the image without tissue detection), level 0",
            "analysed_area_mm2": area_px0 * (mpp0 * 1e-3) ** 2 if mpp0 else None,
            "density_per_mm2": density_per_mm2(tables["n_cells"], area_px0, mpp0),
            "density_per_mm2_per_class": {c: density_per_mm2(n, area_px0, mpp0) for c, n in
                                          tables["per_class"].items()},
            "windows": len(windows), "windows_predicted": len(todo), "tiles": total_tiles,
            "cut_at_window_edge": progress["cut"], "duplicates_dropped": progress.get("duplicates", 0), "seconds": progress["seconds"],
            "tiles_per_s": float(np.mean(progress["tiles_per_s"])) if progress["tiles_per_s"] else None,
            "seam_rule": SEAM_RULE, "coordinates": COORDINATES, "tissue_detection": bool(s.tissue and reader.is_slide),
            "model": pred.describe(),
            "inference": {"window": s.window, "margin": margin, "tile_size": s.tile_size, "overlap": s.overlap,
                          "tta": s.tta, "amp": s.amp},
        }
        atomic_write_json(out / "summary.json", json.loads(json.dumps(summary, default=str)))
        progress["finished"] = True
        atomic_write_json(progress_file, progress)
        shutil.rmtree(parts, ignore_errors=True)
        log.info("%s: %d cells %s -> %s", path.name, tables["n_cells"], tables["per_class"], out)
        return summary
    finally:
        reader.close()


def write_summary_csv(out_dir: Path, class_names: list[str]) -> Path:
    """``DIR/summary.csv``: one row per ``DIR/*/summary.json`` (finished, stopped or failed)."""
    rows = []
    for f in sorted(Path(out_dir).glob("*/summary.json")):
        rec = json.loads(f.read_text())
        per = rec.get("per_class") or {}
        rows.append([rec.get("input"), rec.get("status"), rec.get("n_cells"), *[per.get(c) for c in class_names],
                     rec.get("density_per_mm2"), rec.get("mpp"), rec.get("error", "")])
    path = Path(out_dir) / "summary.csv"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["input", "status", "n_cells", *[f"n_{c}" for c in class_names], "density_per_mm2", "mpp",
                    "error"])
        w.writerows(rows)
    tmp.replace(path)
    return path


def _consume_stop_file(stop: Any) -> None:
    """Rename a STOP file that was acted on (``STOP.handled-<time>``), so the next run does not stop at once."""
    path = getattr(stop, "stop_file", None)
    if path is not None and Path(path).exists() and str(stop.reason or "").startswith("STOP file"):
        Path(path).replace(Path(path).with_name(f"STOP.handled-{time.strftime('%Y%m%dT%H%M%S')}"))


def predict_inputs(pred: Predictor, patterns: list[str], s: PredictSettings, stop: Any = None) -> dict:
    """Predict every input named by ``patterns`` (files, folders, globs).

    Returns:
        ``{"finished": [...], "failed": [(input, message)], "stopped": input or None, "summary_csv": path}``.
    """
    files, problems = collect_inputs(patterns)
    s.out_dir.mkdir(parents=True, exist_ok=True)
    failed: list[tuple[str, str]] = [(p, why) for p, why in problems]
    finished: list[str] = []
    stopped = None
    stems: dict[str, Path] = {}
    for path in files:
        if path.stem in stems:
            failed.append((str(path), f"same name as {stems[path.stem]}: both would write {s.out_dir / path.stem}; "
                                      "predict them into different --out folders"))
            continue
        stems[path.stem] = path
        if stop is not None and stop.reason is not None:
            stopped = str(path)
            _consume_stop_file(stop)
            break
        try:
            rec = predict_one(pred, path, s, stop)
        except (InputError, OSError) as e:
            msg = str(e)
            log.error("%s: %s", path, msg)
        except Exception as e:  # noqa: BLE001 - a corrupt tile deep in a slide must not stop the other inputs
            msg = f"{type(e).__name__}: {e}"
            log.exception("%s: prediction failed", path)  # the traceback goes to the log, the line to the summary
        else:
            msg = None
        if msg is not None:
            failed.append((str(path), msg))
            out = s.out_dir / path.stem
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out / "summary.json", {"input": str(path), "status": "failed", "error": msg})
            continue
        if rec["status"] == "stopped":
            stopped = str(path)
            _consume_stop_file(stop)
            break
        finished.append(str(path))
    csv_path = write_summary_csv(s.out_dir, pred.class_names)
    if failed:
        lines = "\n".join(f"  - {p}: {why}" for p, why in failed)
        log.error("%d input(s) could not be predicted (the others were):\n%s", len(failed), lines)
    return {"finished": finished, "failed": failed, "stopped": stopped, "summary_csv": str(csv_path)}
