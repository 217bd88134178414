"""Reading and writing images, masks and checksums, with errors that name the file.

PNG/JPEG go through Pillow, TIFF through tifffile. Images become (H, W, 3) uint8 RGB: grey is repeated to three
channels, an alpha channel is dropped, and 16-bit or float images are rescaled linearly from their own min..max
(fluorescence tiles such as DSB2018 are uint16).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
LOSSY_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg")  # fine for images, never for label masks


class ImageReadError(ValueError):
    """An image or mask file that cannot be decoded."""


def _read_array(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            return np.asarray(tifffile.imread(path))
        with Image.open(path) as im:
            im.load()
            if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1"):
                im = im.convert("RGBA" if "A" in im.mode else "RGB") if im.mode != "1" else im.convert("L")
            return np.array(im)  # a writable copy (torch.from_numpy warns on read-only arrays)
    except FileNotFoundError as e:
        raise ImageReadError(f"{path}: file not found") from e
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        raise ImageReadError(
            f"{path}: unreadable or corrupt image ({type(e).__name__}: {e}); re-export or remove the file"
        ) from e


def to_uint8_rgb(array: np.ndarray, source: str = "<array>") -> np.ndarray:
    """Bring an image array to (H, W, 3) uint8 RGB. Shape: (H, W) | (H, W, 1|3|4) -> (H, W, 3)."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ImageReadError(
            f"{source}: expected an RGB, RGBA or grey image, got an array of shape {tuple(array.shape)}"
        )
    if array.shape[2] == 4:
        array = array[:, :, :3]
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        x = array.astype(np.float64)
        if not np.isfinite(x).all():
            raise ImageReadError(f"{source}: the image holds NaN or infinite values")
        lo, hi = float(x.min()), float(x.max())
        is_float = np.issubdtype(array.dtype, np.floating)
        if is_float and lo >= 0 and hi <= 1:
            x = x * 255.0
        elif is_float and lo >= 0 and hi <= 255:
            pass  # float images stored as 0..255 (PanNuke): keep the values
        else:
            log.debug("%s: rescaling %s image from [%g, %g] to uint8", source, array.dtype, lo, hi)
            x = (x - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(x)
        array = np.clip(np.round(x), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(array)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB. Raises ImageReadError naming the file."""
    path = Path(path)
    return to_uint8_rgb(_read_array(path), str(path))


def read_mask(path: str | Path) -> np.ndarray:
    """Read a single-channel label image (instance ids) as an integer array. Shape: -> (H, W).

    Raises:
        ImageReadError: a JPEG mask (lossy compression changes ids along every edge), or not one channel.
    """
    path = Path(path)
    if path.suffix.lower() in LOSSY_SUFFIXES:
        raise ImageReadError(
            f"{path}: masks must be lossless (PNG, TIFF or NPY); JPEG compression changes instance ids along every "
            f"edge. Export the mask again as PNG or TIFF"
        )
    array = _read_array(path)
    if array.ndim == 3 and array.shape[2] in (3, 4) and np.array_equal(array[..., 0], array[..., 1]):
        array = array[..., 0]  # grey saved as RGB
    if array.ndim != 2:
        raise ImageReadError(
            f"{path}: an instance mask must be one channel of integer ids, got shape {tuple(array.shape)}"
        )
    return array


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write a uint8 RGB image losslessly (PNG; fast compression level: the cache is written once per dataset)."""
    Image.fromarray(image).save(path, format="PNG", compress_level=1)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def find_image(folder: Path, stem: str) -> Path | None:
    """The image ``<stem>.<ext>`` in ``folder`` for the first known extension that exists."""
    for suffix in IMAGE_SUFFIXES:
        for candidate in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
            if candidate.exists():
                return candidate
    return None
