"""Read a shapes picture back, strictly: background colour, foreground colour and shape, by plain image analysis.

Background: the median border pixel. Foreground: the pixels nearer to another palette colour than to the
background; their largest connected blob is the shape (a second blob of comparable size means two shapes: "other"),
the median of its eroded interior is its colour. A colour farther than ``AMBIGUOUS_DISTANCE`` from every palette
colour is "ambiguous" (a brown between red and orange is neither).

A shape counts only if it is that shape (``classify_contour``); anything else is "other":

* triangle: the polygon approximation of the hull has three vertices and the blob fills its minimum enclosing
  triangle (an ellipse fills 0.60 of it, a leaf or a rounded blob 0.7-0.85, a drawn triangle 0.97);
* square: four vertices with near-right angles, near-equal sides, filling its minimum-area rectangle;
* circle: convex, round (fitted-ellipse axis ratio) and filling its minimum enclosing circle;
* star: exactly five deep notches between the hull and the outline (five points).
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
SECOND_BLOB_RATIO = 0.15  # a second blob at least this share of the largest one: two shapes ("other")
AMBIGUOUS_DISTANCE = 45.0  # RGB distance: about half of the closest palette pair's (yellow, orange: 87)
AMBIGUOUS = "ambiguous"
OTHER = "other"
# thresholds of the strict shape tests; the data set's pictures lie far inside them (see tests/test_classify.py)
CONVEX_MIN_SOLIDITY = 0.85  # area / hull area of a circle, square or triangle (wavy decoded edges: 0.90-0.99)
TRIANGLE_MIN_FILL = 0.90  # hull area / minimum enclosing triangle (drawn triangles 0.97-0.99, ellipses 0.61)
SQUARE_MIN_FILL = 0.92  # hull area / minimum-area rectangle (drawn squares 0.97-1.0)
SQUARE_MAX_ANGLE_ERROR = 15.0  # degrees from 90 at each corner
SQUARE_MIN_SIDE_RATIO = 0.8  # shortest / longest side
CIRCLE_MIN_FILL = 0.90  # hull area / minimum enclosing circle (drawn circles 0.97-0.99, squares 0.64)
CIRCLE_MIN_AXIS_RATIO = 0.9  # minor / major axis of the fitted ellipse
STAR_MIN_NOTCH = 0.15  # depth of a notch between two points, as a share of the enclosing circle's radius
STAR_MAX_SOLIDITY = 0.85
POLY_EPSILON = 0.04  # polygon approximation tolerance, share of the hull's perimeter


@dataclass(frozen=True)
class ShapeFeatures:
    """Rotation- and scale-invariant measures of one blob's outline."""

    solidity: float = 0.0  # area / convex hull area
    circle_fill: float = 0.0  # hull area / minimum enclosing circle
    triangle_fill: float = 0.0  # hull area / minimum enclosing triangle
    rect_fill: float = 0.0  # hull area / minimum-area rectangle
    axis_ratio: float = 0.0  # minor / major axis of the fitted ellipse
    vertices: int = 0  # vertices of the polygon approximation of the hull
    max_angle_error: float = 180.0  # largest |corner angle - 90| of that polygon (degrees)
    side_ratio: float = 0.0  # shortest / longest side of that polygon
    notches: int = 0  # deep convexity defects (star points - 0)


@dataclass(frozen=True)
class Reading:
    """What the classifier sees in a picture; ``shape``/``colour`` are None when no shape is found, "other" /
    "ambiguous" when what is there is no palette shape / colour."""

    colour: str | None
    shape: str | None
    background: str
    features: ShapeFeatures = ShapeFeatures()
    blobs: int = 0  # foreground blobs of a substantial size

    @property
    def solidity(self) -> float:
        """Area / convex hull area of the shape's blob."""
        return self.features.solidity

    @property
    def circle_fill(self) -> float:
        """Area / minimum enclosing circle of the shape's blob."""
        return self.features.circle_fill

    def matches(self, colour: str, shape: str, background: str) -> dict[str, bool]:
        """Per-attribute agreement with the prompt, plus ``all``."""
        result = {"colour": self.colour == colour, "shape": self.shape == shape,
                  "background": self.background == background}
        result["all"] = all(result.values())
        return result


def nearest_colour(rgb: np.ndarray) -> str:
    """Palette name nearest (Euclidean in RGB) to one colour [3]."""
    return _NAMES[int(np.argmin(((_PALETTE - np.asarray(rgb, dtype=np.float32)) ** 2).sum(axis=1)))]


def strict_colour(rgb: np.ndarray) -> str:
    """Palette name of one colour [3], or "ambiguous" when it is farther than AMBIGUOUS_DISTANCE from all."""
    distance = np.sqrt(((_PALETTE - np.asarray(rgb, dtype=np.float32)) ** 2).sum(axis=1))
    return _NAMES[int(np.argmin(distance))] if distance.min() <= AMBIGUOUS_DISTANCE else AMBIGUOUS


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


def blobs(mask: np.ndarray) -> list[np.ndarray]:
    """Contours [N, 1, 2] of the connected components of ``mask`` (after a small opening) that are at least
    MIN_AREA_FRACTION of the picture, largest first."""
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    found = [c for c in contours if cv2.contourArea(c) >= MIN_AREA_FRACTION * mask.size]
    return sorted(found, key=cv2.contourArea, reverse=True)


def largest_blob(mask: np.ndarray) -> np.ndarray | None:
    """Contour [N, 1, 2] of the largest connected component of ``mask`` (after a small opening), or None."""
    found = blobs(mask)
    return found[0] if found else None


def _polygon(hull: np.ndarray) -> np.ndarray:
    """Polygon approximation [K, 2] of a convex hull."""
    return cv2.approxPolyDP(hull, POLY_EPSILON * cv2.arcLength(hull, True), True).reshape(-1, 2).astype(np.float64)


def _corner_measures(poly: np.ndarray) -> tuple[float, float]:
    """(largest |corner angle - 90| in degrees, shortest / longest side) of a polygon [K, 2]."""
    sides = np.roll(poly, -1, axis=0) - poly
    lengths = np.linalg.norm(sides, axis=1)
    incoming, outgoing = -np.roll(sides, 1, axis=0), sides
    cos = (incoming * outgoing).sum(axis=1) / np.maximum(lengths * np.roll(lengths, 1), 1e-9)
    angles = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
    return float(np.abs(angles - 90.0).max()), float(lengths.min() / max(lengths.max(), 1e-9))


def _notches(contour: np.ndarray, hull_idx: np.ndarray, radius: float) -> int:
    """Convexity defects of ``contour`` deeper than STAR_MIN_NOTCH * ``radius``."""
    try:
        defects = cv2.convexityDefects(contour, hull_idx)
    except cv2.error:  # self-intersecting outlines of odd blobs
        return 0
    return 0 if defects is None else int((defects.reshape(-1, 4)[:, 3] / 256.0 > STAR_MIN_NOTCH * radius).sum())


def shape_features(contour: np.ndarray) -> ShapeFeatures:
    """The measures of one contour [N, 1, 2] that ``classify_contour`` decides on."""
    area = cv2.contourArea(contour)
    hull = cv2.convexHull(contour)
    hull_area = max(cv2.contourArea(hull), 1e-6)  # the fills use the hull: decoded edges are wavy
    _, radius = cv2.minEnclosingCircle(contour)
    tri_area, _ = cv2.minEnclosingTriangle(contour.astype(np.float32))
    (_, (w, h), _) = cv2.minAreaRect(contour)
    axes = cv2.fitEllipse(contour)[1] if len(contour) >= 5 else (0.0, 1.0)
    poly = _polygon(hull)
    angle_error, side_ratio = _corner_measures(poly) if len(poly) >= 3 else (180.0, 0.0)
    hull_idx = cv2.convexHull(contour, returnPoints=False)
    return ShapeFeatures(
        solidity=area / hull_area, circle_fill=hull_area / max(math.pi * radius ** 2, 1e-6),
        triangle_fill=hull_area / max(tri_area, 1e-6), rect_fill=hull_area / max(w * h, 1e-6),
        axis_ratio=min(axes) / max(max(axes), 1e-6), vertices=len(poly), max_angle_error=angle_error,
        side_ratio=side_ratio, notches=_notches(contour, hull_idx, radius))


def classify_features(f: ShapeFeatures) -> str:
    """The shape whose strict test ``f`` passes, or "other" (none or more than one)."""
    convex = f.solidity >= CONVEX_MIN_SOLIDITY
    tests = {
        "triangle": convex and f.vertices == 3 and f.triangle_fill >= TRIANGLE_MIN_FILL,
        "square": (convex and f.vertices == 4 and f.rect_fill >= SQUARE_MIN_FILL
                   and f.max_angle_error <= SQUARE_MAX_ANGLE_ERROR and f.side_ratio >= SQUARE_MIN_SIDE_RATIO),
        "circle": (convex and f.vertices > 4 and f.circle_fill >= CIRCLE_MIN_FILL
                   and f.axis_ratio >= CIRCLE_MIN_AXIS_RATIO),
        "star": f.solidity <= STAR_MAX_SOLIDITY and f.notches == 5,
    }
    passed = [name for name, ok in tests.items() if ok]
    return passed[0] if len(passed) == 1 else OTHER


def classify_contour(contour: np.ndarray) -> str:
    """Strict shape name of one blob's contour [N, 1, 2]: circle, square, triangle, star or "other"."""
    return classify_features(shape_features(contour))


def foreground_colour(image: np.ndarray, contour: np.ndarray) -> str:
    """Palette colour of the median pixel inside the (eroded) blob, or "ambiguous"."""
    mask = np.zeros(image.shape[:2], np.uint8)
    cv2.drawContours(mask, [contour], -1, 1, thickness=cv2.FILLED)
    inner = cv2.erode(mask, np.ones((5, 5), np.uint8))
    pixels = image[inner.astype(bool)] if inner.sum() >= 16 else image[mask.astype(bool)]
    return strict_colour(np.median(pixels.reshape(-1, 3), axis=0))


def read_picture(image: np.ndarray) -> Reading:
    """Classify an RGB uint8 picture [H, W, 3] of the shapes kind, strictly."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB picture [H, W, 3], got shape {tuple(image.shape)}")
    border_rgb = np.median(border_pixels(image), axis=0).astype(np.float32)
    background = strict_colour(border_rgb)
    found = blobs(foreground_mask(image, border_rgb, nearest_colour(border_rgb)))
    if not found:
        return Reading(None, None, background)
    contour = found[0]
    features = shape_features(contour)
    second = [c for c in found[1:] if cv2.contourArea(c) >= SECOND_BLOB_RATIO * cv2.contourArea(contour)]
    shape = OTHER if second else classify_features(features)
    return Reading(foreground_colour(image, contour), shape, background, features, 1 + len(second))
