"""A seeded generator of blood-smear-like images with instance and class maps (the demo and test dataset).

Three classes, in this order: ``RBC`` (pale pink discs with a lighter centre, the central pallor of Wright/Giemsa
smears as in BCCD), ``WBC`` (larger, pale cytoplasm around a dark purple lobed nucleus) and ``Platelet`` (small purple
granular fragments). Cells are painted one after another, later ones occluding earlier ones; a placement is refused
when it would leave an earlier cell with less than ``MIN_VISIBLE`` of its area or split it into pieces, so every
instance stays one 4-connected component. Sizes scale with the image size (RBC ~20-35 px across at 256 px), so 64 or
128 px images still hold several cells of every class; every image holds all three classes. Background tint,
illumination gradient, blur and noise vary per image. The same ``(seed, index, image_size)`` gives identical bytes.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from cellseg.data.sample import Sample

CLASS_NAMES: list[str] = ["RBC", "WBC", "Platelet"]
RBC, WBC, PLATELET = 1, 2, 3
MIN_VISIBLE = 0.3  # fraction of its own area every cell keeps visible (inside the image, not occluded)
MAX_NEW_OVERLAP = 0.35  # fraction of a new cell that may lie on earlier cells (touching, partial overlap)
_FOUR = ndi.generate_binary_structure(2, 1)


def _cell_shape(
    rng: np.random.Generator, radius: float, aspect: float, wobble: float
) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise a wobbly ellipse centred in its own box; returns (mask, rho) with rho = normalised radius.

    Shape: -> (2R+3, 2R+3) bool, float.
    """
    half = int(np.ceil(radius * (1 + 2 * wobble))) + 1
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
    angle = rng.uniform(0, np.pi)
    c, s = np.cos(angle), np.sin(angle)
    u = (c * xx + s * yy) / aspect
    v = -s * xx + c * yy
    theta = np.arctan2(v, u)
    bound = np.ones_like(theta)
    for k in (2, 3, 5):
        bound += wobble * rng.uniform(-1, 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    rho = np.hypot(u, v) / (radius * bound)
    return rho <= 1.0, rho


def _paint_rbc(rng: np.random.Generator, rho: np.ndarray, background: np.ndarray) -> np.ndarray:
    base = np.array([rng.uniform(195, 222), rng.uniform(138, 168), rng.uniform(146, 175)])
    pallor_radius = rng.uniform(0.4, 0.65)
    pallor = np.clip(1.2 * (1 - rho / pallor_radius), 0, 1) ** 0.7 * rng.uniform(0.5, 0.85)
    rim = np.clip((rho - 0.8) / 0.2, 0, 1) * rng.uniform(0.05, 0.15)
    light = 0.5 * background + 0.5 * np.array([250.0, 238.0, 240.0])
    colour = base[None, None] * (1 - pallor[..., None]) + light[None, None] * pallor[..., None]
    return colour * (1 - rim[..., None])


def _paint_wbc(rng: np.random.Generator, rho: np.ndarray, radius: float) -> np.ndarray:
    cyto = np.array([rng.uniform(195, 222), rng.uniform(170, 195), rng.uniform(205, 230)])
    colour = np.broadcast_to(cyto, rho.shape + (3,)).copy()
    colour += rng.normal(0, 4, rho.shape + (1,))  # granular cytoplasm
    half = rho.shape[0] // 2
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
    nucleus = np.zeros(rho.shape, dtype=bool)
    n_lobes = int(rng.integers(1, 5))
    for _ in range(n_lobes):
        a = rng.uniform(0, 2 * np.pi)
        d = rng.uniform(0.0, 0.4) * radius if n_lobes > 1 else 0.0
        ry, rx = rng.uniform(0.22, 0.42) * radius, rng.uniform(0.22, 0.42) * radius
        nucleus |= ((yy - d * np.sin(a)) / ry) ** 2 + ((xx - d * np.cos(a)) / rx) ** 2 <= 1
    nucleus &= rho <= 0.82
    dark = np.array([rng.uniform(70, 115), rng.uniform(35, 75), rng.uniform(120, 165)])
    colour[nucleus] = dark + rng.normal(0, 8, (int(nucleus.sum()), 3))
    return colour


def _paint_platelet(rng: np.random.Generator, rho: np.ndarray) -> np.ndarray:
    base = np.array([rng.uniform(120, 170), rng.uniform(80, 120), rng.uniform(160, 200)])
    return base[None, None] + rng.normal(0, 10, rho.shape + (3,))


def _plan(rng: np.random.Generator, scale: float) -> list[tuple[int, float]]:
    """The cells to try, as (class, radius), in painting order."""
    rbc_r = lambda: rng.uniform(10.0, 17.5) * scale  # noqa: E731
    n_wbc = int(rng.integers(1, 4))
    n_plt = int(rng.integers(3, 9))
    coverage = rng.uniform(0.35, 0.55)
    n_rbc = int(round(coverage * (256 * 256) / (np.pi * 13.75**2)))
    # WBCs first (largest, placed on an empty field), then one RBC and one platelet so every class is present
    head = [(WBC, rng.uniform(20.0, 30.0) * scale) for _ in range(n_wbc)]
    head += [(RBC, rbc_r()), (PLATELET, max(1.6, rng.uniform(2.5, 4.5) * scale))]
    tail = [(RBC, rbc_r()) for _ in range(n_rbc - 1)]
    tail += [(PLATELET, max(1.6, rng.uniform(2.5, 4.5) * scale)) for _ in range(n_plt - 1)]
    order = rng.permutation(len(tail))
    return head + [tail[i] for i in order]


def generate_synthetic_sample(seed: int, index: int, image_size: int = 256) -> Sample:
    """One synthetic blood-smear image with its instance and type maps.

    Args:
        seed: dataset seed (>= 0); image ``index`` uses ``default_rng([seed, index])``, so adding images keeps the
            earlier ones unchanged.
        index: image number (>= 0).
        image_size: side of the square image in pixels (>= 32).

    Shape: image (S, S, 3) uint8, inst_map / type_map (S, S) int32.
    """
    if image_size < 32:
        raise ValueError(f"synth_image_size must be >= 32 pixels, got {image_size}; use 64 or more")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    rng = np.random.default_rng([seed, index])
    scale = image_size / 256.0
    plan = _plan(rng, scale)
    pad = int(np.ceil(30 * scale * 1.5)) + 4
    size = image_size + 2 * pad
    inside = np.zeros((size, size), dtype=bool)
    inside[pad:-pad, pad:-pad] = True
    labels = np.zeros((size, size), dtype=np.int32)
    bg = np.array([rng.uniform(225, 242), rng.uniform(218, 236), rng.uniform(205, 228)])
    canvas = np.broadcast_to(bg, (size, size, 3)).astype(np.float64).copy()
    types: list[int] = [0]
    areas: list[int] = [0]  # full (unoccluded, uncropped) area of each instance
    boxes: list[tuple[slice, slice]] = [(slice(0, 0), slice(0, 0))]
    for cls, radius in plan:
        aspect = rng.uniform(0.8, 1.0) if cls != PLATELET else rng.uniform(0.6, 1.0)
        wobble = {RBC: 0.03, WBC: 0.05, PLATELET: 0.15}[cls]
        mask, rho = _cell_shape(rng, radius, aspect, wobble)
        if cls == RBC:
            colour = _paint_rbc(rng, rho, bg)
        elif cls == WBC:
            colour = _paint_wbc(rng, rho, radius)
        else:
            colour = _paint_platelet(rng, rho)
        half = mask.shape[0] // 2
        tries = 100 if len(types) <= 3 + 2 else 20
        for _ in range(tries):
            cy, cx = (int(v) + pad for v in rng.integers(0, image_size, 2))
            box = (slice(cy - half, cy + half + 1), slice(cx - half, cx + half + 1))
            if _placement_ok(mask, box, labels, inside, areas, boxes):
                new_id = len(types)
                labels[box][mask] = new_id
                canvas[box][mask] = colour[mask]
                types.append(cls)
                areas.append(int(mask.sum()))
                boxes.append(box)
                break
    crop = (slice(pad, pad + image_size), slice(pad, pad + image_size))
    labels = labels[crop]
    image = canvas[crop]
    # illumination gradient, blur and sensor noise
    yy, xx = np.mgrid[0:image_size, 0:image_size] / image_size - 0.5
    a = rng.uniform(0, 2 * np.pi)
    gain = (
        1.0
        + rng.uniform(0.0, 0.18) * (np.cos(a) * xx + np.sin(a) * yy)
        - rng.uniform(0, 0.1) * (xx**2 + yy**2)
    )
    image = image * gain[..., None]
    image = ndi.gaussian_filter(image, sigma=(max(0.5, 0.9 * scale), max(0.5, 0.9 * scale), 0))
    image = image + rng.normal(0, rng.uniform(1.5, 4.5), image.shape)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    # ids 1..N in painting order; cells refused along the way left no gaps because ids are assigned on success
    present = np.unique(labels)
    present = present[present > 0]
    remap = np.zeros(len(types), dtype=np.int32)
    remap[present] = np.arange(1, present.size + 1, dtype=np.int32)
    inst_map = remap[labels]
    type_lut = np.asarray(types, dtype=np.int32)
    type_map = type_lut[labels]
    return {
        "image": image,
        "inst_map": inst_map,
        "type_map": type_map.astype(np.int32),
        "meta": {"name": f"synth_{index:04d}", "source": "synthetic", "seed": int(seed), "index": int(index)},
    }


def _placement_ok(
    mask: np.ndarray,
    box: tuple[slice, slice],
    labels: np.ndarray,
    inside: np.ndarray,
    areas: list[int],
    boxes: list[tuple[slice, slice]],
) -> bool:
    """Would painting ``mask`` at ``box`` keep every cell >= MIN_VISIBLE visible and in one piece?"""
    area = int(mask.sum())
    in_image = mask & inside[box]
    if in_image.sum() < MIN_VISIBLE * area or not _one_piece(in_image):
        return False
    under = labels[box][mask]
    covered = under[under > 0]
    if covered.size > MAX_NEW_OVERLAP * area:
        return False
    for j in np.unique(covered):
        jbox = boxes[j]
        visible = (labels[jbox] == j) & inside[jbox]
        # remove the new cell's pixels from j's box (the two boxes overlap partially)
        ys = slice(max(box[0].start, jbox[0].start), min(box[0].stop, jbox[0].stop))
        xs = slice(max(box[1].start, jbox[1].start), min(box[1].stop, jbox[1].stop))
        local = (
            slice(ys.start - jbox[0].start, ys.stop - jbox[0].start),
            slice(xs.start - jbox[1].start, xs.stop - jbox[1].start),
        )
        new = (
            slice(ys.start - box[0].start, ys.stop - box[0].start),
            slice(xs.start - box[1].start, xs.stop - box[1].start),
        )
        visible[local] &= ~mask[new]
        if visible.sum() < MIN_VISIBLE * areas[j] or not _one_piece(visible):
            return False
    return True


def _one_piece(mask: np.ndarray) -> bool:
    _, n = ndi.label(mask, structure=_FOUR)
    return n == 1


def generate_synthetic_dataset(num_images: int, image_size: int, seed: int) -> list[Sample]:
    """``num_images`` samples of :func:`generate_synthetic_sample` (convenience for notebooks and tests)."""
    return [generate_synthetic_sample(seed, i, image_size) for i in range(num_images)]
