"""Write models/reference/calibration.txt: the reference model's default calibration text.

Training chapters only (the same split as train_reference.py: chapter index % 20 == 10 is held
out for evaluation), one chapter in every 25 of the rest, so calibration never sees the eval text.

    python tools/make_calibration.py      # needs `apt-get install bible-kjv`, like training
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_reference import extract_kjv, split_chapters  # noqa: E402

EVERY, OFFSET = 20, 10  # train_reference.py's defaults (--holdout-every, --holdout-offset)


def main() -> None:
    train, _ = split_chapters(extract_kjv(), EVERY, OFFSET)
    picked = [c["text"] for i, c in enumerate(train) if i % 25 == 3]
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference", "calibration.txt")
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n\n".join(picked) + "\n")
    print(f"wrote {out}: {len(picked)} chapters, {sum(map(len, picked))} characters")


if __name__ == "__main__":
    main()
