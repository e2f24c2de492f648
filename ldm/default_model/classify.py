"""Read a shapes picture back: background colour, foreground colour and shape, by plain image analysis.

Background: nearest palette colour of the median border pixel. Foreground: the pixels far from the background
colour; their largest connected blob is the shape, its eroded interior gives the colour. Shape: from the
blob's solidity (area / convex hull area) and how much of its minimum enclosing circle it fills
(circle ~1.0, square ~0.64, triangle ~0.41; a star is the only non-convex one).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from ldm.data.synthetic_shapes import COLOURS

_NAMES = list(COLOURS)
_PALETTE = np.asarray([COLOURS[n] for n in _NAMES], dtype=np.float32)
BORDER = 6  # pixels of the frame used for the background colour
MIN_AREA_FRACTION = 0.004  # a foreground blob smaller than this share of the picture counts as no shape


@dataclass(frozen=True)
class Reading:
    """What the classifier sees in a picture; ``shape``/``colour`` are None when no shape is found."""

    colour: str | None
    shape: str | None
    background: str
    solidity: float = 0.0
    circle_fill: float = 0.0

    def matches(self, colour: str, shape: str, background: str) -> dict[str, bool]:
        """Per-attribute agreement with the prompt, plus ``all``."""
        result = {"colour": self.colour == colour, "shape": self.shape == shape,
                  "background": self.background == background}
        result["all"] = all(result.values())
        return result


def nearest_colour(rgb: np.ndarray) -> str:
    """Palette name nearest (Euclidean in RGB) to one colour [3]."""
    return _NAMES[int(np.argmin(((_PALETTE - np.asarray(rgb, dtype=np.float32)) ** 2).sum(axis=1)))]


def border_pixels(image: np.ndarray, width: int = BORDER) -> np.ndarray:
    """The frame of ``width`` pixels of an [H, W, 3] picture as [N, 3]."""
    top, bottom = image[:width].reshape(-1, 3), image[-width:].reshape(-1, 3)
    left, right = image[width:-width, :width].reshape(-1, 3), image[width:-width, -width:].reshape(-1, 3)
    return np.concatenate([top, bottom, left, right])


def foreground_mask(image: np.ndarray, background_rgb: np.ndarray, background: str) -> np.ndarray:
    """uint8 [H, W] mask of pixels nearer to a palette colour other than ``background`` than to the
    measured background colour ``background_rgb`` [3]."""
    pixels = image.reshape(-1, 3).astype(np.float32)
    others = _PALETTE[[n != background for n in _NAMES]]
    d_other = ((pixels[:, None, :] - others[None]) ** 2).sum(axis=2).min(axis=1)
    d_background = ((pixels - background_rgb[None]) ** 2).sum(axis=1)
    return (d_other < d_background).reshape(image.shape[:2]).astype(np.uint8)


def largest_blob(mask: np.ndarray) -> np.ndarray | None:
    """Contour [N, 1, 2] of the largest connected component of ``mask`` (after a small opening), or None."""
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    contour = max(contours, key=cv2.contourArea)
    if cv2.contourArea(contour) < MIN_AREA_FRACTION * mask.size:
        return None
    return contour


def shape_features(contour: np.ndarray) -> tuple[float, float]:
    """(solidity, share of the minimum enclosing circle covered) of a contour."""
    area = cv2.contourArea(contour)
    hull_area = cv2.contourArea(cv2.convexHull(contour))
    _, radius = cv2.minEnclosingCircle(contour)
    return area / max(hull_area, 1e-6), area / max(math.pi * radius * radius, 1e-6)


def shape_from_features(solidity: float, circle_fill: float) -> str:
    """Shape name from the two rotation- and scale-invariant features."""
    if solidity < 0.85:
        return "star"
    if circle_fill > 0.82:
        return "circle"
    if circle_fill > 0.53:
        return "square"
    return "triangle"


def foreground_colour(image: np.ndarray, contour: np.ndarray) -> str:
    """Nearest palette colour of the median pixel inside the (eroded) blob."""
    mask = np.zeros(image.shape[:2], np.uint8)
    cv2.drawContours(mask, [contour], -1, 1, thickness=cv2.FILLED)
    inner = cv2.erode(mask, np.ones((5, 5), np.uint8))
    pixels = image[inner.astype(bool)] if inner.sum() >= 16 else image[mask.astype(bool)]
    return nearest_colour(np.median(pixels.reshape(-1, 3), axis=0))


def read_picture(image: np.ndarray) -> Reading:
    """Classify an RGB uint8 picture [H, W, 3] of the shapes kind."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB picture [H, W, 3], got shape {tuple(image.shape)}")
    border_rgb = np.median(border_pixels(image), axis=0).astype(np.float32)
    background = nearest_colour(border_rgb)
    contour = largest_blob(foreground_mask(image, border_rgb, background))
    if contour is None:
        return Reading(None, None, background)
    solidity, fill = shape_features(contour)
    return Reading(foreground_colour(image, contour), shape_from_features(solidity, fill), background, solidity, fill)
