"""Aligning faces to the ArcFace template at pack time: five landmarks -> similarity transform -> 112 x 112 crop.

The pack writer reads a landmarks CSV once (`read_landmarks`), looks each packed file up by its path
relative to the source folder (`LandmarkTable.lookup`; a file without landmarks is rejected with the
reason `NO_LANDMARKS`, or kept unaligned), and stores `align_face(rgb, landmarks)` instead of the image.

Landmarks are pixel coordinates of the decoded image as shown (EXIF orientation applied, as OpenCV's
`imread` and the packer's `load_rgb` give it), in OpenCV's convention: integer coordinates are pixel
centres. The order is the template's: left eye, right eye, nose tip, left mouth corner, right mouth
corner (left and right as seen in the image). Knows numpy and OpenCV, never torch or DALI.
"""
from __future__ import annotations

import csv
import math
from array import array
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import cv2
import numpy as np

from .pack_format import SPLITS

# The standard ArcFace 5-point template for 112 x 112 crops: insightface's `arcface_dst` (named `arcface_src`
# in its older releases) in python-package/insightface/utils/face_align.py, the points its `norm_crop` warps
# faces onto for its recognition models' training sets and at inference.
ARCFACE_TEMPLATE = (
    (38.2946, 51.6963),  # left eye
    (73.5318, 51.5014),  # right eye
    (56.0252, 71.7366),  # nose tip
    (41.5493, 92.3655),  # left mouth corner
    (70.7299, 92.2041),  # right mouth corner
)
TEMPLATE_SIZE = 112
NUM_LANDMARKS = 5
NO_LANDMARKS = "no landmarks"  # the reject reason for a packed file the CSV does not name
VGGFACE2_HEADER = ("NAME_ID", "P1X", "P1Y", "P2X", "P2Y", "P3X", "P3Y", "P4X", "P4Y", "P5X", "P5Y")
PLAIN_HEADER = ("path", "x1", "y1", "x2", "y2", "x3", "y3", "x4", "y4", "x5", "y5")
MAX_PRESHRINK_SCALE = 0.5  # below this warp scale, shrink by an integer factor first (see `align_face`)


class LandmarksError(ValueError):
    """A landmarks file that cannot be used, as one line naming the file and the row."""


def template(size: int = TEMPLATE_SIZE) -> np.ndarray:
    """The five template points for a `size` x `size` crop (a multiple of 112: the template scaled)."""
    if size <= 0 or size % TEMPLATE_SIZE:
        raise ValueError(f"aligned crop size must be a multiple of {TEMPLATE_SIZE}, got {size}")
    return np.array(ARCFACE_TEMPLATE) * (size / TEMPLATE_SIZE)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2 x 3 similarity (rotation, uniform scale, translation) mapping `src` onto `dst` in least squares.

    Umeyama's closed form (IEEE TPAMI 13(4), 1991, eq. 40-42) restricted to proper rotations: no
    reflection, so a mirrored landmark set is aligned as well as a rotation can, not flipped. Raises
    `ValueError` when the source points (nearly) coincide, where no scale is defined.
    """
    src, dst = np.asarray(src, dtype=np.float64), np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need matching N x 2 point sets (N >= 2), got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c ** 2).sum() / len(src)
    if src_var < 1e-12 * max(1.0, float(np.abs(src).max()) ** 2):
        raise ValueError("degenerate landmarks (all points coincide)")
    u, s, vt = np.linalg.svd(dst_c.T @ src_c / len(src))
    d = np.array([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = u @ np.diag(d) @ vt
    scale = float(s @ d) / src_var
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def alignment_matrix(landmarks: np.ndarray, size: int = TEMPLATE_SIZE) -> np.ndarray:
    """The 2 x 3 matrix taking image pixels to the `size` x `size` aligned crop."""
    return similarity_transform(np.asarray(landmarks, dtype=np.float64).reshape(NUM_LANDMARKS, 2), template(size))


def align_face(rgb: np.ndarray, landmarks: np.ndarray, size: int = TEMPLATE_SIZE) -> np.ndarray:
    """The aligned `size` x `size` x 3 uint8 crop of H x W x 3 uint8 `rgb` whose five `landmarks` are given.

    Bilinear interpolation and a black constant border, as insightface's `norm_crop` warps: the crops
    then look like those every ArcFace-aligned benchmark and insightface's own inference produce (an
    alignment that differs from the evaluation's costs accuracy), and a face at the image edge gets
    black, not smeared edge pixels. Where the warp shrinks by more than 2x (a large photo), bilinear
    sampling alone would alias, so the image is first shrunk by an integer factor with area averaging
    and the matrix adjusted; at smaller shrink factors the result is exactly `norm_crop`'s.
    Raises `ValueError` (a reject reason) for degenerate landmarks.
    """
    matrix = alignment_matrix(landmarks, size)
    factor = int(1.0 / _scale(matrix)) if _scale(matrix) < MAX_PRESHRINK_SCALE else 1
    if factor > 1 and min(rgb.shape[:2]) >= factor:
        rgb = cv2.resize(rgb, (rgb.shape[1] // factor, rgb.shape[0] // factor), interpolation=cv2.INTER_AREA)
        # INTER_AREA by an integer factor f puts the small image's pixel centre j at f * j + (f - 1) / 2.
        matrix = matrix @ np.array([[factor, 0.0, (factor - 1) / 2], [0.0, factor, (factor - 1) / 2], [0.0, 0.0, 1.0]])
    return cv2.warpAffine(rgb, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=(0, 0, 0))


def _scale(matrix: np.ndarray) -> float:
    """The uniform scale of a similarity's 2 x 3 matrix."""
    return math.hypot(matrix[0, 0], matrix[1, 0])


@dataclass(frozen=True)
class LandmarkTable:
    """Five landmarks per image, keyed by the CSV's name (a relative path, with or without extension).

    `rows` maps a name to its row in `points` (N x 5 x 2): one array rather than an object per image,
    so VGGFace2's 3.1 million rows fit in about 0.5 GB.
    """

    rows: dict[str, int]
    points: np.ndarray
    source: str

    def lookup(self, rel_path: str) -> np.ndarray | None:
        """The 5 x 2 landmarks of the packed file at `rel_path` (relative to the source folder), or None.

        Matches the CSV's name against the path and the path without its extension, each also without
        a leading train/val/test folder (VGGFace2 names `n000002/0001_01` for `train/n000002/0001_01.jpg`).
        """
        for key in _candidate_keys(rel_path):
            if key in self.rows:
                return self.points[self.rows[key]]
        return None

    def missing(self, rel_paths: list[str]) -> list[str]:
        """The paths among `rel_paths` that have no landmarks (each is rejected with `NO_LANDMARKS`)."""
        return [path for path in rel_paths if self.lookup(path) is None]


def _candidate_keys(rel_path: str) -> list[str]:
    path = PurePosixPath(rel_path.replace("\\", "/"))
    paths = [path]
    if len(path.parts) > 1 and path.parts[0] in SPLITS:
        paths.append(PurePosixPath(*path.parts[1:]))
    return [str(key) for p in paths for key in (p, p.with_suffix(""))]


def read_landmarks(path: str | Path) -> LandmarkTable:
    """Read a landmarks CSV: `NAME_ID,P1X,P1Y,...,P5X,P5Y` (VGGFace2's `loose_landmark_*.csv`) or a plain
    `path,x1,y1,...,x5,y5`, with or without a header row.

    A first row whose ten coordinates are all non-numbers is a header. Raises `LandmarksError` (one line:
    file, line and what is wrong) for an unreadable file, a row with the wrong number of columns, a
    coordinate that is not a finite number, a repeated name, or no rows at all.
    """
    path = Path(path)
    rows: dict[str, int] = {}
    lines = array("q")  # the CSV line of each row, for the repeated-name error
    values = array("d")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            columns, first_row = PLAIN_HEADER, True
            reader = csv.reader(f)
            for row in reader:
                if not row or all(not cell.strip() for cell in row):
                    continue
                line = reader.line_num
                _check_columns(row, path, line)
                header, first_row = first_row and not any(_is_number(cell) for cell in row[1:]), False
                if header:
                    columns = tuple(cell.strip() for cell in row)
                    continue
                name = row[0].strip().removeprefix("./")
                if not name:
                    raise LandmarksError(f"{path}:{line}: empty name")
                if name in rows:
                    raise LandmarksError(f"{path}:{line}: {name!r} repeated (first on line {lines[rows[name]]})")
                values.extend(_coordinates(row[1:], columns[1:], path, line))
                rows[name] = len(lines)
                lines.append(line)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LandmarksError(f"{path}: cannot read landmarks ({exc})") from None
    if not rows:
        raise LandmarksError(f"{path}: no landmark rows")
    return LandmarkTable(rows, np.frombuffer(values, dtype=np.float64).reshape(-1, NUM_LANDMARKS, 2), str(path))


def _check_columns(row: list[str], path: Path, line: int) -> None:
    if len(row) != len(PLAIN_HEADER):
        raise LandmarksError(f"{path}:{line}: expected {len(PLAIN_HEADER)} columns (a name and 5 x,y pairs), "
                             f"found {len(row)}")


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _coordinates(cells: list[str], columns: tuple[str, ...], path: Path, line: int) -> list[float]:
    values = []
    for column, cell in zip(columns, cells):
        try:
            value = float(cell)
        except ValueError:
            raise LandmarksError(f"{path}:{line}: {column} {cell.strip()!r} is not a number") from None
        if not math.isfinite(value):
            raise LandmarksError(f"{path}:{line}: {column} {cell.strip()!r} is not a finite number")
        values.append(value)
    return values
