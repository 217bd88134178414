"""Image readers for prediction: plain images (PNG, JPEG, small TIFF), tiled/pyramidal TIFF (OME-TIFF included)
through tifffile, and vendor slides (SVS, NDPI, MRXS, ...) through OpenSlide.

Every reader exposes the same small surface: the size of the level it reads (``height``, ``width``), how many
level-0 pixels one of its pixels spans (``downsample``), the resolution in µm per pixel of that level (None when the
file does not say), ``read(y, x, h, w)`` returning an RGB ``uint8`` region in the coordinates of the read level, and
``thumbnail(max_side)``. A tiled TIFF is read tile by tile (only the tiles a region touches are decoded), so memory
follows the region, never the slide.
"""

from __future__ import annotations

import glob
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# Formats OpenSlide reads and tifffile does not (or not with the vendor's levels and resolution).
VENDOR_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
OPENSLIDE_HINT = ("install the optional OpenSlide wheels: `pip install -e '.[slides]'` (openslide-python and "
                  "openslide-bin from PyPI)")


class InputError(ValueError):
    """An input that cannot be predicted (unreadable, wrong channels, empty); the message names the file."""


def collect_inputs(patterns: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files named by ``patterns`` (files, folders, globs), in order, without duplicates.

    Returns:
        (files, problems): ``problems`` lists (pattern, why) for names that matched nothing; they are reported with
        the bad inputs instead of stopping the others.
    """
    files: list[Path] = []
    problems: list[tuple[str, str]] = []
    suffixes = IMAGE_SUFFIXES + VENDOR_SUFFIXES
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
            if not found:
                problems.append((pattern, f"folder holds no images ({', '.join(suffixes)})"))
        elif path.is_file():
            found = [path]
        elif glob.has_magic(pattern):
            found = sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_file())
            if not found:
                problems.append((pattern, "pattern matches no file"))
        else:
            found = []
            problems.append((pattern, "no such file or folder"))
        for p in found:
            if p not in files:
                files.append(p)
    return files, problems


def _to_rgb(region: np.ndarray, where: str) -> np.ndarray:
    """(h, w, 3|4) or (h, w) of any integer type -> (h, w, 3) uint8; other channel counts are refused."""
    if region.ndim == 3 and region.shape[2] == 4:
        region = region[..., :3]
    if region.ndim != 3 or region.shape[2] != 3:
        channels = 1 if region.ndim == 2 else region.shape[-1]
        raise InputError(f"{where} has {channels} channel(s) (shape {region.shape}); the model needs RGB images "
                         "(3 channels, or RGBA whose alpha is dropped). Convert it to RGB first.")
    if region.dtype != np.uint8:
        if region.dtype == np.uint16:
            region = (region >> 8).astype(np.uint8)
        else:
            raise InputError(f"{where} has {region.dtype} pixels; only 8-bit (or 16-bit, scaled down) RGB is read")
    return np.ascontiguousarray(region)


@dataclass
class Level:
    """One pyramid level: its size, its downsample from level 0, and its µm per pixel when known."""

    height: int
    width: int
    downsample: float
    mpp: float | None


class Reader:
    """Common surface; subclasses fill ``levels`` and implement ``_read`` and ``_level_image``."""

    kind = "image"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.levels: list[Level] = []
        self.level = 0

    # ----- level choice -----
    def select_level(self, level: int = -1, target_mpp: float | None = None) -> str | None:
        """Read from ``level`` (>= 0), or with -1 the level closest to ``target_mpp`` (level 0 when either the target or
        the slide's resolution is unknown). Returns a note on a resolution mismatch (> 10 %), else None.

        Raises:
            InputError: ``level`` does not exist (names the levels there are).
        """
        if level >= len(self.levels):
            raise InputError(f"{self.path}: PREDICT_LEVEL={level} but the file has levels 0..{len(self.levels) - 1} "
                             f"({', '.join(f'{lv.width}x{lv.height}' for lv in self.levels)}). Pick one of those, or -1.")
        if level < 0:
            level = 0
            if target_mpp and self.levels[0].mpp:
                level = int(np.argmin([abs(math.log(lv.mpp / target_mpp)) if lv.mpp else math.inf
                                       for lv in self.levels]))
        self.level = level
        mpp = self.mpp
        if target_mpp and mpp and abs(mpp / target_mpp - 1.0) > 0.1:
            return (f"{self.path.name}: level {level} is {mpp:.4g} µm/px but the model expects {target_mpp:.4g} µm/px "
                    f"(x{mpp / target_mpp:.2f}); objects will look {'smaller' if mpp > target_mpp else 'larger'} "
                    "than in training")
        if target_mpp and not mpp:
            return (f"{self.path.name}: the file states no resolution; assumed to match the model's "
                    f"{target_mpp:.4g} µm/px")
        return None

    @property
    def height(self) -> int:
        return self.levels[self.level].height

    @property
    def width(self) -> int:
        return self.levels[self.level].width

    @property
    def downsample(self) -> float:
        return self.levels[self.level].downsample

    @property
    def mpp(self) -> float | None:
        return self.levels[self.level].mpp

    @property
    def is_slide(self) -> bool:
        """Large or multi-level inputs get tissue detection and a thumbnail overlay."""
        return len(self.levels) > 1 or self.levels[0].height * self.levels[0].width > 4096 * 4096

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """RGB uint8 region of the read level. Shape: (h, w, 3)."""
        if y < 0 or x < 0 or y + h > self.height or x + w > self.width or h <= 0 or w <= 0:
            raise ValueError(f"region y={y} x={x} h={h} w={w} lies outside {self.path} ({self.width}x{self.height})")
        return _to_rgb(self._read(y, x, h, w), str(self.path))

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """An RGB thumbnail of the read level whose longer side is at most ``max_side``, and its scale (thumbnail
        pixels per read-level pixel)."""
        # the smallest level still at least max_side, then strided: never the whole of level 0 of a slide
        best = self.level
        for i in range(self.level, len(self.levels)):
            if max(self.levels[i].height, self.levels[i].width) >= max_side:
                best = i
        img = _to_rgb(self._level_image(best), str(self.path))
        step = max(1, int(math.ceil(max(img.shape[:2]) / max_side)))
        img = img[::step, ::step]
        return np.ascontiguousarray(img), img.shape[0] / self.height

    def close(self) -> None:
        pass

    def _read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        raise NotImplementedError

    def _level_image(self, level: int) -> np.ndarray:
        raise NotImplementedError


class ArrayReader(Reader):
    """A small image held in memory (PNG, JPEG, untiled TIFF)."""

    def __init__(self, path: Path, image: np.ndarray, mpp: float | None = None):
        super().__init__(path)
        image = np.asarray(image)
        if image.ndim == 3 and image.shape[0] in (3, 4) and image.shape[2] not in (3, 4):
            image = np.moveaxis(image, 0, -1)  # planar TIFF (C, H, W) -> (H, W, C)
        self.image = _to_rgb(image, str(path))
        self.levels = [Level(self.image.shape[0], self.image.shape[1], 1.0, mpp)]

    def _read(self, y, x, h, w):
        return self.image[y:y + h, x:x + w]

    def _level_image(self, level):
        return self.image


def _tiff_mpp(tif, page) -> float | None:
    """µm per pixel from OME PhysicalSizeX, else from the XResolution tag (only with a centimetre or inch unit)."""
    ome = getattr(tif, "ome_metadata", None)
    if ome:
        m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', ome)
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', ome)
        if m and (unit is None or unit.group(1) in ("µm", "um", "micron")):
            return float(m.group(1))
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        num, den = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
        if num and den and unit in (2, 3):
            per_unit = num / den  # pixels per inch (2) or per centimetre (3)
            return (25400.0 if unit == 2 else 10000.0) / per_unit
    return None


class TiffReader(Reader):
    """Tiled (pyramidal) TIFF through tifffile; regions are assembled from the decoded tiles they touch."""

    kind = "tiff"

    def __init__(self, path: Path):
        import tifffile

        super().__init__(path)
        self.tif = tifffile.TiffFile(str(path))
        series = self.tif.series[0]
        self.pages = [lv.pages[0] for lv in series.levels]
        base = self.pages[0]
        mpp0 = _tiff_mpp(self.tif, base)
        w0 = base.imagewidth
        for page in self.pages:
            ds = w0 / page.imagewidth
            self.levels.append(Level(page.imagelength, page.imagewidth, ds, mpp0 * ds if mpp0 else None))
        self._cache: dict[tuple[int, int], np.ndarray] = {}
        self._whole: dict[int, np.ndarray] = {}

    def _tile(self, page, index: int) -> tuple[np.ndarray, int, int]:
        fh = self.tif.filehandle
        fh.seek(page.dataoffsets[index])
        data = fh.read(page.databytecounts[index])
        seg, idx, _ = page.decode(data, index, jpegtables=page.jpegtables)
        return seg[0], idx[-3], idx[-2]

    def _read(self, y, x, h, w):
        page = self.pages[self.level]
        if not page.is_tiled:
            if self.level not in self._whole:
                self._whole = {self.level: page.asarray()}  # untiled: one level in memory at a time
            return self._whole[self.level][y:y + h, x:x + w]
        th, tw = page.tilelength, page.tilewidth
        across = -(-page.imagewidth // tw)
        out = np.empty((h, w, page.samplesperpixel), page.dtype)
        for ty in range(y // th, (y + h - 1) // th + 1):
            for tx in range(x // tw, (x + w - 1) // tw + 1):
                tile, oy, ox = self._tile(page, ty * across + tx)
                y0, y1 = max(y, oy), min(y + h, oy + th)
                x0, x1 = max(x, ox), min(x + w, ox + tw)
                out[y0 - y:y1 - y, x0 - x:x1 - x] = tile[y0 - oy:y1 - oy, x0 - ox:x1 - ox].reshape(
                    y1 - y0, x1 - x0, -1)
        return out

    def _level_image(self, level):
        page = self.pages[level]
        if page.imagelength * page.imagewidth > 8192 * 8192:
            # no small level: sample the read level on a coarse grid, region by region
            saved = self.level
            self.level = level
            step = int(math.ceil(max(page.imagelength, page.imagewidth) / 2048))
            rows = []
            for y in range(0, page.imagelength, step * 64):
                hh = min(step * 64, page.imagelength - y)
                rows.append(self._read(y, 0, hh, page.imagewidth)[::step, ::step])
            self.level = saved
            return np.concatenate(rows, axis=0)
        return page.asarray()

    def close(self):
        self.tif.close()


class OpenSlideReader(Reader):
    """Vendor slides through OpenSlide (regions in level-0 coordinates, RGBA composited on white)."""

    kind = "openslide"

    def __init__(self, path: Path):
        try:
            import openslide
        except ImportError as e:  # the module, or the native library behind it
            raise InputError(f"{path} is a vendor slide ({path.suffix}), which needs OpenSlide, not available here "
                             f"({e}); {OPENSLIDE_HINT}.") from e
        super().__init__(path)
        try:
            self.slide = openslide.OpenSlide(str(path))
        except Exception as e:  # noqa: BLE001 - openslide's errors: unsupported or corrupt file
            raise InputError(f"OpenSlide cannot open {path}: {type(e).__name__}: {e}") from e
        mpp = self.slide.properties.get("openslide.mpp-x")
        mpp0 = float(mpp) if mpp else None
        for (w, h), ds in zip(self.slide.level_dimensions, self.slide.level_downsamples):
            self.levels.append(Level(h, w, float(ds), mpp0 * ds if mpp0 else None))

    def _read(self, y, x, h, w):
        ds = self.downsample
        rgba = np.asarray(self.slide.read_region((int(round(x * ds)), int(round(y * ds))), self.level, (w, h)))
        alpha = rgba[..., 3:4].astype(np.float32) / 255.0
        return (rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)

    def _level_image(self, level):
        w, h = self.slide.level_dimensions[level]
        img = self.slide.get_thumbnail((2048, 2048)) if w * h > 8192 * 8192 else self.slide.read_region(
            (0, 0), level, (w, h)).convert("RGB")
        return np.asarray(img.convert("RGB"))

    def close(self):
        self.slide.close()


def open_reader(path: str | Path) -> Reader:
    """The reader for ``path`` by its suffix and content.

    Raises:
        InputError: missing, unreadable, of a vendor format without OpenSlide, or not RGB (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix in VENDOR_SUFFIXES:
        return OpenSlideReader(path)
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(str(path)) as tif:
                page = tif.series[0].levels[0].pages[0]
                tiled = page.is_tiled or len(tif.series[0].levels) > 1
                if not tiled:
                    return ArrayReader(path, tif.series[0].asarray(), _tiff_mpp(tif, page))
            return TiffReader(path)
        from PIL import Image

        with Image.open(path) as im:
            im.load()
            mode_ok = im.mode in ("RGB", "RGBA", "L", "I;16", "P")
            img = np.asarray(im.convert("RGB") if im.mode == "P" else im)
        if not mode_ok:
            raise InputError(f"{path} has PIL mode {im.mode!r}; save it as 8-bit RGB")
        return ArrayReader(path, img)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL and tifffile raise many types for a corrupt file
        raise InputError(f"cannot read {path}: {type(e).__name__}: {e}") from e
