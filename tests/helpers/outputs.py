"""Colorized output folders in tests: what `ddcolor colorize` writes, and comparing two folders file by file."""

from __future__ import annotations

import filecmp
from pathlib import Path

from ddcolor.archive import MANIFEST_NAME

SIZE = 64  # network input size, px


def colorize_reference(src: Path, out: Path, model: Path, max_pixels: int | None) -> None:
    """What `ddcolor colorize SRC -o OUT --model M --input-size 64 --precision fp32` writes (its library call)."""
    from ddcolor.colorize import Colorizer, colorize_files

    colorizer = Colorizer(str(model), input_size=SIZE, device="cpu", precision="fp32")
    colorize_files(colorizer, [src], out, max_pixels=max_pixels)


def output_files(root: Path) -> dict[str, Path]:
    """Output images below ``root`` (not the manifest, not the .ddcolor markers)."""
    return {
        str(p.relative_to(root)): p
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".ddcolor" not in p.relative_to(root).parts and p.name != MANIFEST_NAME
    }


def assert_same_outputs(out: Path, ref: Path) -> None:
    got, want = output_files(out), output_files(ref)
    assert sorted(got) == sorted(want)
    different = [name for name in want if not filecmp.cmp(got[name], want[name], shallow=False)]
    assert not different, different
