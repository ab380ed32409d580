"""A loss-curve PNG and an expert-load heatmap PNG with numpy and zlib only (no matplotlib, no pillow).

The curve is drawn as line segments on an RGB canvas with axes, a light grid, and labels
in a built-in 3x5 pixel font (digits, '.', '-', 'e' and the letters of 'step' and 'loss').
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

_FONT = {  # 3 columns x 5 rows, row-major bits
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "e": "000111111100111", "s": "000111110011111", "t": "010111010010011", "p": "000111101111100",
    "l": "110010010010111", "o": "000111101101111", " ": "000000000000000", ":": "000010000010000",
}


def write_png(path: str, rgb: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 image as an 8-bit RGB PNG."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


def _text(img: np.ndarray, x: int, y: int, text: str, scale: int = 2, color=(60, 60, 60)) -> None:
    for k, ch in enumerate(text):
        bits = _FONT.get(ch, _FONT[" "])
        for i, bit in enumerate(bits):
            if bit == "1":
                r, c = divmod(i, 3)
                y0, x0 = y + r * scale, x + (k * 4 + c) * scale
                img[max(y0, 0):y0 + scale, max(x0, 0):x0 + scale] = color


def _line(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, color, width: int = 2) -> None:
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.rint(np.linspace(x0, x1, n)).astype(int)
    ys = np.rint(np.linspace(y0, y1, n)).astype(int)
    h, w, _ = img.shape
    for dy in range(width):
        for dx in range(width):
            yy, xx = np.clip(ys + dy, 0, h - 1), np.clip(xs + dx, 0, w - 1)
            img[yy, xx] = color


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.1e}"


def loss_curve_png(path: str, steps, losses, width: int = 720, height: int = 420) -> None:
    """Plot loss against step (with a moving average when there are many points)."""
    steps = np.asarray(steps, dtype=np.float64)
    losses = np.asarray(losses, dtype=np.float64)
    keep = np.isfinite(losses)
    steps, losses = steps[keep], losses[keep]
    img = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 70, 20, 20, 50
    pw, ph = width - left - right, height - top - bottom
    if len(steps) == 0:
        write_png(path, img)
        return
    x_lo, x_hi = float(steps.min()), float(max(steps.max(), steps.min() + 1))
    y_lo, y_hi = float(losses.min()), float(losses.max())
    pad = max((y_hi - y_lo) * 0.05, 1e-3)
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def px(s):
        return left + (s - x_lo) / (x_hi - x_lo) * pw

    def py(v):
        return top + (y_hi - v) / (y_hi - y_lo) * ph

    for k in range(5):  # grid and tick labels
        gy = top + k * ph / 4
        img[int(gy), left:left + pw] = (225, 225, 225)
        _text(img, 4, int(gy) - 5, _fmt(y_hi - k * (y_hi - y_lo) / 4))
        gx = left + k * pw / 4
        img[top:top + ph, int(gx)] = (225, 225, 225)
        _text(img, int(gx) - 10, top + ph + 8, _fmt(x_lo + k * (x_hi - x_lo) / 4))
    img[top:top + ph + 1, left] = (0, 0, 0)
    img[top + ph, left:left + pw + 1] = (0, 0, 0)
    _text(img, left + pw // 2 - 16, height - 16, "step")
    _text(img, 4, 4, "loss")
    pts = [(px(s), py(v)) for s, v in zip(steps, losses)]
    for (a, b), (c, d) in zip(pts, pts[1:]):
        _line(img, a, b, c, d, (150, 180, 230), 1)
    if len(losses) >= 20:
        k = max(len(losses) // 20, 2)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        sp = [(px(s), py(v)) for s, v in zip(steps[k - 1:], smooth)]
        for (a, b), (c, d) in zip(sp, sp[1:]):
            _line(img, a, b, c, d, (20, 70, 180), 2)
    elif len(pts) == 1:
        _line(img, pts[0][0], pts[0][1], pts[0][0], pts[0][1], (20, 70, 180), 3)
    write_png(path, img)


def expert_load_png(path: str, load, cell: int = 16) -> None:
    """Heatmap of an MoE run's expert load (L layers, E experts): one row of cells per layer, each cell
    coloured by the expert's share of its layer's slots relative to an even share (white: none, blue:
    even, red: 2x even or more); layer numbers on the left, expert numbers along the top."""
    load = np.asarray(load, dtype=np.float64)
    layers, experts = load.shape
    ratio = load / np.maximum(load.mean(1, keepdims=True), 1e-9)  # 1: an even share
    blue, red = np.array([40, 90, 200.0]), np.array([200, 30, 30.0])
    low = np.clip(ratio, 0, 1)[..., None]  # white -> blue over [0, 1]
    high = np.clip(ratio - 1, 0, 1)[..., None]  # blue -> red over [1, 2]
    colors = (255 + (blue - 255) * low) * (ratio[..., None] <= 1) + (blue + (red - blue) * high) * (ratio[..., None] > 1)
    left, top = 30, 20
    img = np.full((top + layers * cell + 10, left + experts * cell + 10, 3), 255, np.uint8)
    img[top:top + layers * cell, left:left + experts * cell] = \
        np.kron(colors, np.ones((cell, cell, 1))).astype(np.uint8)
    for layer in range(layers):
        _text(img, 4, top + layer * cell + cell // 2 - 5, str(layer))
    for expert in range(experts):
        _text(img, left + expert * cell + 2, 4, str(expert), scale=1 if expert >= 10 else 2)
    write_png(path, img)
