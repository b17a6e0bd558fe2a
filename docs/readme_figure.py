"""Regenerate docs/gymnast_concepts.jpg (the README's picture) from real output:

    .venv/bin/dff discover ../shared/data/gymnast --out /tmp/out-gym
    .venv/bin/python docs/readme_figure.py /tmp/out-gym/gymnast
"""

import sys
from pathlib import Path

import cv2
import numpy as np

HEIGHT = 420


def main(class_dir: str) -> None:
    files = sorted((Path(class_dir) / "combined").glob("*.jpg"))[:3]
    tiles = []
    for f in files:
        im = cv2.imread(str(f))
        tiles.append(cv2.resize(im, (round(im.shape[1] * HEIGHT / im.shape[0]), HEIGHT),
                                interpolation=cv2.INTER_AREA))
    gap = np.full((HEIGHT, 8, 3), 255, np.uint8)
    row = np.concatenate([t for tile in tiles for t in (tile, gap)][:-1], axis=1)
    out = Path(__file__).with_name("gymnast_concepts.jpg")
    cv2.imwrite(str(out), row, [cv2.IMWRITE_JPEG_QUALITY, 85])
    print(out, row.shape)


if __name__ == "__main__":
    main(sys.argv[1])
