"""Generate the project's trigger images from published values (no third-party files).

    python -m data.attacks.triggers        # writes data/trigger/cifar_1.png and random_pattern.png

``cifar_1.png``: the original BadNets trigger, a 32×32 black image with a 2×2 patch at rows and
columns 4–5 (docs/original.md §2.6). ``random_pattern.png``: a seeded uniform-noise image for a
Blended attack that runs offline (the original's Hello Kitty image is third-party).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

TRIGGER_DIR = Path(__file__).resolve().parent.parent / "trigger"

BADNETS_PATCH = {  # (row, column): RGB, docs/original.md §2.6
    (4, 4): (180, 249, 112),
    (4, 5): (155, 50, 126),
    (5, 4): (234, 82, 68),
    (5, 5): (187, 201, 219),
}


def badnets_trigger(size: int = 32) -> np.ndarray:
    img = np.zeros((size, size, 3), dtype=np.uint8)
    for (r, c), rgb in BADNETS_PATCH.items():
        img[r, c] = rgb
    return img


def random_pattern(size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, size=(size, size, 3)).astype(np.uint8)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--dest", type=Path, default=TRIGGER_DIR)
    args = p.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    for name, arr in (("cifar_1.png", badnets_trigger()), ("random_pattern.png", random_pattern())):
        Image.fromarray(arr, "RGB").save(args.dest / name, optimize=True)
        print(f"wrote {args.dest / name}")


if __name__ == "__main__":
    main()
