"""Does the training pipeline learn? A few minutes of `atto` on CPU, on crops of the built-in sample photos.

A sanity check, not a quality claim: the training pixel loss must fall, and on HELD-OUT crops the model must beat
the gray baseline (ab = 0) in ab L1 and in RGB PSNR.

Data: the scikit-image photos of `ddcolor.data.samples` (the photos themselves, variant 0). Each photo is cut into a
3 x 3 grid of blocks and 3 blocks per photo (a seeded random choice) are held out. Training crops are random squares
(25-45 % of the short side) that do not touch a held-out block, written as PNG files and ingested by
`ddcolor.data.ingest` (``center_crop`` to 64 px, all rows train); the evaluation crops are the central squares of the
held-out blocks, resized to 64 px by the same `prepare_image`. So no evaluation pixel is ever seen in training; the
content is the same photos, as intended: this tests learning, not generalisation to new scenes. (A single left/right
split was tried first: the held-out strips were much less colorful than the training part, e.g. the astronaut's
gray suit, so the comparison measured that shift rather than learning.)

Model and losses: the ``atto`` preset from random weights (``model.pretrained=null``) with a smaller color decoder
for speed. The perceptual term is off: with ``pretrained=null`` its VGG16-BN is random too, so its value is noise,
not a color signal. The GAN term is off as well: a few hundred steps cannot say anything about adversarial quality,
and this test checks that the generator learns ab. (The discriminator still trains each step, as in any run.) The
colorfulness loss is off (it rewards saturation, not correctness). So the generator loss is the ab L1.

Metrics on the held-out crops (64 x 64): ab L1 in Lab units of the network output vs the ground truth (gray
baseline: mean |ab|); 8-bit sRGB PSNR of `ddcolor.colorize.Colorizer` output (ground-truth L + predicted ab) vs the
crop (gray baseline: ground-truth L + ab = 0). The numbers are printed (``pytest -s``) and written to
``/tmp/learning_numbers.md``.
"""

from __future__ import annotations

import io
import json
import platform
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddcolor.color import gray_rgb_from_l, lab_to_rgb, rgb_to_lab
from ddcolor.colorize import Colorizer
from ddcolor.config import load_config
from ddcolor.data.ingest import ingest
from ddcolor.data.prepare import prepare_image
from ddcolor.data.samples import available_photos, sample_images
from ddcolor.model.checkpoint import load_model
from ddcolor.train import train
from ddcolor.train.trainer import METRICS_FILE

SIZE = 64  # px, training and evaluation crops
GRID = 3  # each photo is cut into GRID x GRID blocks ...
HELD_OUT_BLOCKS = 3  # ... of which this many (chosen per photo) are held out for evaluation
TRAIN_CROPS_PER_PHOTO = 32
CROP_SIDE = (0.25, 0.45)  # training crop side, fraction of the photo's short side
STEPS = 300
BATCH = 8
WINDOW = 20  # steps averaged at the start and the end of the loss curve
NUMBERS_FILE = Path("/tmp/learning_numbers.md")

CONFIG = [
    "model.preset=atto",
    "model.pretrained=null",  # random encoder AND random perceptual VGG: no weights cache needed
    "model.num_queries=16",
    "model.dec_layers=3",
    "model.nf=128",
    "model.hidden_dim=128",
    "model.nheads=4",
    "model.dim_feedforward=512",
    "model.disc_nf=16",
    f"data.size={SIZE}",
    "data.resize_mode=center_crop",
    "data.val_fraction=0",  # held-out crops are built below, from held-out blocks of each photo
    "data.min_colorfulness=0",
    "data.num_workers=0",
    "data.seed=0",
    "train.device=cpu",
    f"train.batch_size={BATCH}",
    f"train.max_steps={STEPS}",
    "train.lr=5e-4",
    "train.loss_perceptual=0",  # random VGG: the perceptual term would be noise
    "train.loss_gan=0",  # the test is about learning ab, not adversarial quality
    "train.use_colorfulness_loss=false",
    "train.checkpoint_every=100000",
    "train.log_every=50",
    "train.seed=0",
]


def _photos() -> list[np.ndarray]:
    """The sample photos as uint8 (H, W, 3) arrays."""
    return [np.asarray(Image.open(io.BytesIO(s.data)).convert("RGB")) for s in sample_images(len(available_photos()))]


def _blocks(photo: np.ndarray, rng: np.random.Generator) -> tuple[list[tuple[int, int, int, int]], list[int]]:
    """The GRID x GRID blocks of a photo as (top, left, bottom, right), and the indices of the held-out ones."""
    height, width = photo.shape[:2]
    ys, xs = np.linspace(0, height, GRID + 1).round().astype(int), np.linspace(0, width, GRID + 1).round().astype(int)
    blocks = [(ys[i], xs[j], ys[i + 1], xs[j + 1]) for i in range(GRID) for j in range(GRID)]
    return blocks, sorted(rng.choice(len(blocks), HELD_OUT_BLOCKS, replace=False).tolist())


def _train_crops(photo: np.ndarray, held_out: list[tuple[int, int, int, int]], rng: np.random.Generator):
    """Random squares (side CROP_SIDE x the short side) that do not touch any held-out block."""
    height, width = photo.shape[:2]
    crops = []
    while len(crops) < TRAIN_CROPS_PER_PHOTO:
        side = int(min(height, width) * rng.uniform(*CROP_SIDE))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        if any(top < b and t < top + side and left < r and lo < left + side for t, lo, b, r in held_out):
            continue  # overlaps a held-out block: draw again
        crops.append(photo[top : top + side, left : left + side])
    return crops


def _eval_crops(photo: np.ndarray, held_out: list[tuple[int, int, int, int]]) -> list[np.ndarray]:
    """The central square of each held-out block, resized to SIZE as ingestion does."""
    crops = []
    for top, left, bottom, right in held_out:
        side = min(bottom - top, right - left)
        y, x = top + (bottom - top - side) // 2, left + (right - left - side) // 2
        crops.append(prepare_image(photo[y : y + side, x : x + side], SIZE, "center_crop"))
    return crops


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def _uint8(rgb: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float sRGB in [0, 1] -> (B, H, W, 3) uint8."""
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def write_section(path: Path, name: str, text: str) -> None:
    """Put ``text`` between ``<!-- name -->`` markers in ``path``, replacing that section and keeping the rest."""
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        old = old[: old.index(begin)] + old[old.index(end) + len(end) :].lstrip("\n")
    try:
        path.write_text(f"{old.rstrip()}\n\n{begin}\n{text.rstrip()}\n{end}\n".lstrip())
    except OSError as err:  # a convenience for the README, never a test failure
        print(f"could not write {path}: {err}")


@pytest.mark.slow
def test_atto_learns_ab_on_held_out_crops(tmp_path):
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    raw = tmp_path / "raw"
    raw.mkdir()
    photos = _photos()
    held_out: list[np.ndarray] = []
    for p, photo in enumerate(photos):
        blocks, chosen = _blocks(photo, rng)
        hidden = [blocks[i] for i in chosen]
        for c, crop in enumerate(_train_crops(photo, hidden, rng)):
            Image.fromarray(np.ascontiguousarray(crop)).save(raw / f"p{p}_c{c:03d}.png")
        held_out += _eval_crops(photo, hidden)
    config = load_config(None, CONFIG)
    report = ingest(str(raw), str(tmp_path / "shards"), config, num_workers=0)
    n_train = len(photos) * TRAIN_CROPS_PER_PHOTO
    assert report.ingested == n_train, report.summary()

    t0 = time.perf_counter()
    result = train(config, str(tmp_path / "shards"), out_dir=tmp_path / "run", progress=False, image_every=0)
    train_seconds = time.perf_counter() - t0
    assert result.steps == STEPS

    # 1. the training loss falls
    records = [json.loads(line) for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    pixel = np.array([r["loss_pixel"] for r in records])
    assert len(pixel) == STEPS and np.isfinite(pixel).all()
    first, last = float(pixel[:WINDOW].mean()), float(pixel[-WINDOW:].mean())

    # 2. held-out crops: the trained model (reloaded from its checkpoint) vs the gray baseline
    model = load_model(result.checkpoint_path)
    gt = np.stack(held_out)  # (N, 64, 64, 3) uint8
    lab = rgb_to_lab(torch.from_numpy(gt).permute(0, 3, 1, 2).float() / 255.0)
    l_gt, ab_gt = lab[:, :1], lab[:, 1:]
    with torch.inference_mode():
        ab_pred = model(gray_rgb_from_l(l_gt)).float().clamp(-128, 127)
    ab_l1_model = float((ab_pred - ab_gt).abs().mean())
    ab_l1_gray = float(ab_gt.abs().mean())

    colorized = Colorizer(model, input_size=SIZE, device="cpu", batch_size=len(held_out)).colorize_batch(held_out)
    gray = _uint8(lab_to_rgb(torch.cat([l_gt, torch.zeros_like(ab_gt)], dim=1)))
    psnr_model = float(np.mean([_psnr(out, ref) for out, ref in zip(colorized, gt, strict=True)]))
    psnr_gray = float(np.mean([_psnr(out, ref) for out, ref in zip(gray, gt, strict=True)]))
    total_seconds = time.perf_counter() - started

    lines = [
        f"Learning sanity check (`tests/training/test_learning.py`), atto from random init, CPU "
        f"({torch.get_num_threads()} threads, {platform.processor() or platform.machine()}), torch {torch.__version__}",
        "",
        f"- data: {len(photos)} scikit-image photos, each cut into {GRID}x{GRID} blocks with {HELD_OUT_BLOCKS} blocks "
        f"held out; {n_train} random training crops that avoid the held-out blocks, {len(held_out)} held-out crops "
        f"(the held-out blocks); {SIZE} px",
        f"- training: {STEPS} steps x batch {BATCH}, lr 5e-4, ab L1 only (perceptual 0: random VGG; GAN 0); "
        f"{train_seconds:.0f} s training, {total_seconds:.0f} s in all",
        f"- training pixel loss (ab L1, mean of {WINDOW} steps): first {first:.2f} -> last {last:.2f} "
        f"({last / first:.2f}x)",
        "",
        "| held-out crops | ab L1 (Lab units, lower is better) | PSNR, 8-bit sRGB (dB, higher is better) |",
        "|---|---|---|",
        f"| gray (ab = 0) | {ab_l1_gray:.2f} | {psnr_gray:.2f} |",
        f"| trained atto | {ab_l1_model:.2f} | {psnr_model:.2f} |",
    ]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    write_section(NUMBERS_FILE, "test_learning", text)

    assert last < 0.8 * first, f"training pixel loss did not fall enough: {first:.3f} -> {last:.3f}"
    assert ab_l1_model < ab_l1_gray, f"held-out ab L1 {ab_l1_model:.3f} not below the gray baseline {ab_l1_gray:.3f}"
    assert psnr_model > psnr_gray, f"held-out PSNR {psnr_model:.2f} dB not above the gray baseline {psnr_gray:.2f} dB"
