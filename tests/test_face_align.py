"""Face alignment: the similarity transform against independent least squares, the warp by marked dots, the CSVs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageOps

from dali_pipes.face_align import (
    NO_LANDMARKS,
    VGGFACE2_HEADER,
    LandmarksError,
    align_face,
    alignment_matrix,
    read_landmarks,
    similarity_transform,
    template,
)
from dali_pipes.pack_format import PackReader
from tools.make_demo_dataset import make_demo_dataset
from tools.pack_dataset import main as pack_main
from trainer.cli import main as trainer_main

# insightface's arcface_dst, typed in again here so the module's constant is checked against the source.
INSIGHTFACE_ARCFACE_DST = [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                           [70.7299, 92.2041]]


def _similarity(scale: float, degrees: float, shift: tuple[float, float]) -> np.ndarray:
    c, s = scale * math.cos(math.radians(degrees)), scale * math.sin(math.radians(degrees))
    return np.array([[c, -s, shift[0]], [s, c, shift[1]]])


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def _lstsq_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least squares of the linear system u = a x - b y + tx, v = b x + a y + ty in (a, b, tx, ty)."""
    rows = np.zeros((2 * len(src), 4))
    rows[0::2] = np.c_[src[:, 0], -src[:, 1], np.ones(len(src)), np.zeros(len(src))]
    rows[1::2] = np.c_[src[:, 1], src[:, 0], np.zeros(len(src)), np.ones(len(src))]
    a, b, tx, ty = np.linalg.lstsq(rows, dst.reshape(-1), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


def _noisy_landmarks(seed: int, mirrored: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    points = _apply(_similarity(rng.uniform(0.5, 4), rng.uniform(-60, 60), tuple(rng.uniform(0, 300, 2))),
                    np.array(INSIGHTFACE_ARCFACE_DST))
    if mirrored:
        points[:, 0] = -points[:, 0] + 500
    return points + rng.normal(0, 3, points.shape)  # a detector's error: no similarity fits exactly


def test_template_is_insightfaces() -> None:
    assert np.array_equal(template(112), np.array(INSIGHTFACE_ARCFACE_DST))
    assert np.allclose(template(224), 2 * np.array(INSIGHTFACE_ARCFACE_DST))
    with pytest.raises(ValueError, match="multiple of 112"):
        template(100)


@pytest.mark.parametrize("seed, mirrored", [(0, False), (1, False), (2, False), (3, True)])
def test_transform_matches_independent_least_squares(seed: int, mirrored: bool) -> None:
    src = _noisy_landmarks(seed, mirrored)
    ours = similarity_transform(src, template())
    linear = _lstsq_similarity(src, template())
    # OpenCV's estimator with every point an inlier, refined by Levenberg-Marquardt over all of them.
    opencv, inliers = cv2.estimateAffinePartial2D(src, template(), method=cv2.RANSAC, ransacReprojThreshold=1e9,
                                                  refineIters=1000)
    assert inliers.all()
    scale = np.abs(linear).max()
    assert np.abs(ours - linear).max() <= 1e-6 * scale
    if not mirrored:  # a mirrored set fits badly, and there OpenCV's refinement stops ~1e-5 short of the optimum
        assert np.abs(ours - opencv).max() <= 1e-6 * scale
    squared_error = [np.sum((_apply(m, src) - template()) ** 2) for m in (ours, opencv)]
    assert squared_error[0] <= squared_error[1] * (1 + 1e-12)
    assert ours[0, 0] == pytest.approx(ours[1, 1]) and ours[0, 1] == pytest.approx(-ours[1, 0])  # no reflection


def test_exact_similarity_is_recovered() -> None:
    truth = _similarity(0.37, 23.0, (-12.5, 40.25))
    src = np.random.default_rng(5).uniform(0, 400, (5, 2))
    assert np.allclose(similarity_transform(src, _apply(truth, src)), truth, atol=1e-12)


def test_degenerate_landmarks_are_an_error() -> None:
    with pytest.raises(ValueError, match="degenerate"):
        alignment_matrix(np.full((5, 2), 40.0))


def _dotted_face(size: int, scale: float, degrees: float, shift: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """A black RGB canvas with a bright Gaussian dot at each template point carried by a known similarity."""
    points = _apply(_similarity(scale, degrees, shift), template())
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    sigma = 1.2 * scale  # 1.2 px once aligned: small beside the 15 px between the closest points
    image = np.zeros((size, size))
    for x, y in points:
        image += np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma ** 2))
    gray = np.clip(255 * image, 0, 255).astype(np.uint8)
    return np.dstack([gray, gray // 2, gray]), points


def _dot_centres(crop: np.ndarray) -> np.ndarray:
    """Intensity-weighted centres of the bright blobs in a crop, found without knowing where they should be."""
    gray = crop[..., 0].astype(np.float64)
    count, labels = cv2.connectedComponents((gray > 20).astype(np.uint8))
    ys, xs = np.mgrid[0:gray.shape[0], 0:gray.shape[1]]
    centres = [(np.sum(xs * gray * (labels == i)) / np.sum(gray * (labels == i)),
                np.sum(ys * gray * (labels == i)) / np.sum(gray * (labels == i))) for i in range(1, count)]
    return np.array(centres)


@pytest.mark.parametrize("scale, degrees, shift", [
    (3.0, 25.0, (60.0, -20.0)),  # a large face: the warp shrinks 3x (area pre-shrink, then bilinear)
    (1.3, -40.0, (-30.0, 70.0)),  # a small face: bilinear only
    (0.8, 170.0, (200.0, 190.0)),  # upside down and enlarged by the warp
])
def test_dots_land_on_the_template(scale: float, degrees: float, shift: tuple[float, float]) -> None:
    image, points = _dotted_face(420, scale, degrees, (shift[0] + 60, shift[1] + 60))
    crop = align_face(image, points)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    found = _dot_centres(crop)
    assert len(found) == 5
    nearest = np.linalg.norm(found[:, None, :] - template()[None, :, :], axis=2).min(axis=0)
    assert nearest.max() < 1.0, nearest  # the criterion
    # Measured: at most 0.06 px. A pre-shrink that forgets INTER_AREA's (f - 1) / 2 pixel-centre offset is off
    # by 0.25 px at f = 3, which this bound catches.
    assert nearest.max() < 0.15, nearest


def test_small_shrinks_are_norm_crop() -> None:
    """At a warp scale of 1/2 or more the crop is insightface's norm_crop: bilinear warpAffine, black border."""
    image, points = _dotted_face(300, 1.5, 10.0, (30.0, 40.0))
    image[..., 1] = np.arange(300, dtype=np.uint8)[None, :] // 2  # some texture for the interpolation to show
    matrix, _ = cv2.estimateAffinePartial2D(points, template(), method=cv2.RANSAC, ransacReprojThreshold=1e9,
                                            refineIters=1000)
    expected = cv2.warpAffine(image, matrix, (112, 112), borderValue=0.0)
    assert np.abs(align_face(image, points).astype(int) - expected).max() <= 1  # matrices equal to ~1e-8


def test_face_at_the_edge_gets_a_black_border() -> None:
    image, points = _dotted_face(200, 1.0, 0.0, (-40.0, 0.0))
    image[...] = np.maximum(image, 90)  # a grey image: the only black comes from outside it
    crop = align_face(image, points)
    assert (crop[:, :20] == 0).all() and (crop[:, 40:] >= 90).all()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_vggface2_csv_and_lookup(tmp_path: Path) -> None:
    csv_path = _write(tmp_path / "loose_landmark_train.csv", ",".join(VGGFACE2_HEADER) + "\n"
                      '"n000002/0001_01",75.8,110.2,103.2,104.6,92.9,133.9,85.3,158.1,107.9,153.3\n'
                      '"n000002/0002_01",10,20,30,20,20,30,12,40,28,40\n')
    table = read_landmarks(csv_path)
    assert np.array_equal(table.lookup("n000002/0001_01.jpg"),
                          np.array([[75.8, 110.2], [103.2, 104.6], [92.9, 133.9], [85.3, 158.1], [107.9, 153.3]]))
    assert np.array_equal(table.lookup("train/n000002/0002_01.jpg")[4], [28.0, 40.0])  # a presplit tree
    assert table.lookup("n000002/0003_01.jpg") is None
    assert table.lookup("other/n000002/0001_01.jpg") is None  # only a split folder may be dropped
    assert table.missing(["n000002/0001_01.jpg", "n000003/0001_01.png"]) == ["n000003/0001_01.png"]
    assert NO_LANDMARKS == "no landmarks"


@pytest.mark.parametrize("header", ["path,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5\n", ""])
def test_plain_csv_with_or_without_header(tmp_path: Path, header: str) -> None:
    table = read_landmarks(_write(tmp_path / "l.csv", header + "a/1.jpg,1,2,3,4,5,6,7,8,9,10\n\n"
                                  "./b/2.png, 1.5 ,2,3,4,5,6,7,8,9,-10e0\n"))
    assert np.array_equal(table.lookup("a/1.jpg"), np.arange(1, 11, dtype=float).reshape(5, 2))
    assert table.lookup("b/2.png")[0, 0] == 1.5 and table.lookup("b/2.png")[4, 1] == -10.0
    assert table.lookup("a/1.png") is None  # a name with an extension matches that file only


@pytest.mark.parametrize("body, message", [
    ("a.jpg,1,2,3,4,5,6,7,8,9\n", r"l\.csv:2: expected 11 columns .* found 10"),
    ("a.jpg,1,2,3,4,5,6,7,8,9,10,11\n", r"l\.csv:2: expected 11 columns .* found 12"),
    ("a.jpg,1,2,3,4,5,6,7,8,9,x\n", r"l\.csv:2: P5Y 'x' is not a number"),
    ("a.jpg,1,2,3,4,nan,6,7,8,9,10\n", r"l\.csv:2: P3X 'nan' is not a finite number"),
    ("a.jpg,1,2,3,4,5,6,7,8,9,10\nb.jpg,1,2,3,4,5,6,7,8,9,10\na.jpg,1,2,3,4,5,6,7,8,9,10\n",
     r"l\.csv:4: 'a.jpg' repeated \(first on line 2\)"),
    ("", r"l\.csv: no landmark rows"),
])
def test_malformed_rows_are_one_line_errors(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(LandmarksError, match=message) as info:
        read_landmarks(_write(tmp_path / "l.csv", ",".join(VGGFACE2_HEADER) + "\n" + body))
    assert "\n" not in str(info.value)


def test_unreadable_file_and_second_header_are_errors(tmp_path: Path) -> None:
    with pytest.raises(LandmarksError, match="cannot read landmarks"):
        read_landmarks(tmp_path / "absent.csv")
    text = "a.jpg,1,2,3,4,5,6,7,8,9,10\npath,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5\n"
    with pytest.raises(LandmarksError, match=r"l\.csv:2: x1 'x1' is not a number"):
        read_landmarks(_write(tmp_path / "l.csv", text))


# --- through the packer: tools/pack_dataset.py --landmarks FILE --align 112 ------------------------------------------


def _pack(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(pack_main, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def face_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """2 classes x 3 demo shapes with their synthetic landmarks, and one of them stored turned with an EXIF tag."""
    root = tmp_path_factory.mktemp("faces")
    # 60-90 px: the warp never shrinks below 1/2, so it is one bilinear warp (no pre-shrink) an estimator can redo.
    make_demo_dataset(root / "src", classes=2, per_class=3, seed=4, min_size=60, max_size=90, png_every=0,
                      landmarks=root / "landmarks.csv")
    table = read_landmarks(root / "landmarks.csv")
    points = {name: table.points[row] for name, row in table.rows.items()}
    shown = Image.open(root / "src" / "01_square" / "0001.jpg")
    stored = shown.transpose(Image.Transpose.ROTATE_90)  # the pixels as a camera held sideways writes them
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to show": the landmarks are given in the shown frame
    stored.save(root / "src" / "01_square" / "0001.jpg", exif=exif, quality=95)
    turned = Image.open(root / "src" / "01_square" / "0001.jpg")
    assert ImageOps.exif_transpose(turned).size == shown.size != turned.size  # shown upright again, as decoded
    return root, points


def _crops(pack: Path) -> dict[str, np.ndarray]:
    reader = PackReader(pack)
    return {path: cv2.cvtColor(cv2.imdecode(np.asarray(reader.image_bytes(i)), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            for i, path in enumerate(reader.paths)}


def _expected_crop(image: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The aligned crop by an independent estimate: OpenCV's similarity of the points onto the template, warped."""
    matrix, _ = cv2.estimateAffinePartial2D(points, template(), method=cv2.RANSAC, ransacReprojThreshold=1e9,
                                            refineIters=1000)
    return cv2.warpAffine(image, matrix, (112, 112), flags=cv2.INTER_LINEAR, borderValue=0.0)


def test_pack_tool_stores_each_face_aligned(face_tree: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    root, points = face_tree
    code, output = _pack(root / "src", tmp_path / "p.h5", "--landmarks", root / "landmarks.csv", "--align", 112,
                         "--workers", 2, "--quiet")
    assert code == 0, output
    assert "6 re-encoded (6 faces aligned to the ArcFace template)" in output
    reader = PackReader(tmp_path / "p.h5")
    assert set(reader.heights) == set(reader.widths) == {112} and len(reader) == 6
    crops = _crops(tmp_path / "p.h5")
    for name, crop in crops.items():
        shown = np.asarray(ImageOps.exif_transpose(Image.open(root / "src" / name)).convert("RGB"))
        error = np.abs(crop.astype(int) - _expected_crop(shown, points[name]))
        assert error.mean() < 2.5, (name, error.mean())  # JPEG at quality 95 of the same warp
    # The EXIF-turned file was aligned in its shown frame: its raw pixels would give another crop.
    name = "01_square/0001.jpg"
    raw = np.asarray(Image.open(root / "src" / name).convert("RGB"))
    assert np.abs(crops[name].astype(int) - _expected_crop(raw, points[name])).mean() > 10
    options = reader.options
    assert options["align"] == 112 and options["landmarks"] == str((root / "landmarks.csv").resolve())
    info = CliRunner().invoke(trainer_main, ["info", str(tmp_path / "p.h5")]).output
    assert f"faces aligned to the ArcFace template, 112 x 112, by the landmarks of {options['landmarks']}" in info


def test_faces_without_usable_landmarks_are_rejected_or_kept(face_tree: tuple[Path, dict[str, np.ndarray]],
                                                              tmp_path: Path) -> None:
    root, _ = face_tree
    rows = (root / "landmarks.csv").read_text().splitlines()
    kept = [r for r in rows if not r.startswith(("00_disc/0002.jpg", "01_square/0000.jpg"))]
    csv_path = _write(tmp_path / "l.csv", "\n".join(kept + ["01_square/0000.jpg" + ",5,5" * 5]) + "\n")
    code, output = _pack(root / "src", tmp_path / "p.h5", "--landmarks", csv_path, "--align", 112, "--workers", 1,
                         "--quiet", "--json")
    assert code == 0, output
    report = json.loads(output)
    assert {(r["path"], r["reason"]) for r in report["rejects"]} == {
        ("00_disc/0002.jpg", NO_LANDMARKS), ("01_square/0000.jpg", "degenerate landmarks (all points coincide)")}
    code, output = _pack(root / "src", tmp_path / "k.h5", "--landmarks", csv_path, "--align", 112, "--keep-unaligned",
                         "--workers", 1, "--quiet", "--json")
    assert code == 0, output
    assert [r["path"] for r in json.loads(output)["rejects"]] == ["01_square/0000.jpg"]
    reader = PackReader(tmp_path / "k.h5")
    index = reader.paths.index("00_disc/0002.jpg")
    original = Image.open(root / "src" / "00_disc" / "0002.jpg")
    assert (reader.widths[index], reader.heights[index]) == original.size  # kept as it is, unaligned
    assert reader.options["keep_unaligned"] is True
    info = CliRunner().invoke(trainer_main, ["info", str(tmp_path / "k.h5")])
    assert "images without landmarks kept unaligned" in info.output


@pytest.mark.parametrize("args, message", [
    (["--align", "112"], "--align 112 needs --landmarks FILE"),
    (["--landmarks", "l.csv"], "--landmarks and --keep-unaligned need --align SIZE"),
    (["--align", "112", "--landmarks", "l.csv", "--keep-unaligned", "--align", "100"],
     "--align 100: aligned crop size must be a multiple of 112"),
])
def test_alignment_options_are_one_line_errors_before_any_work(tmp_path: Path, args: list[str], message: str) -> None:
    # SRC does not even exist: the option's error comes first.
    code, output = _pack(tmp_path / "absent", tmp_path / "p.h5", *args)
    assert code != 0 and message in output and len(output.strip().splitlines()) == 1, output
    assert not (tmp_path / "p.h5").exists()


def test_a_bad_landmarks_file_is_the_packers_one_line_failure(face_tree: tuple[Path, dict[str, np.ndarray]],
                                                               tmp_path: Path) -> None:
    root, _ = face_tree
    csv_path = _write(tmp_path / "l.csv", "00_disc/0000.jpg,1,2,3\n")
    code, output = _pack(root / "src", tmp_path / "p.h5", "--landmarks", csv_path, "--align", 112, "--workers", 1)
    assert code != 0 and "l.csv:1: expected 11 columns (a name and 5 x,y pairs), found 4" in output
    assert len(output.strip().splitlines()) == 1 and not (tmp_path / "p.h5").exists()
