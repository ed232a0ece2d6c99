"""How long ``qvltune check-data`` takes on 20 000 records referencing 20 000 distinct images.

Images have varied sizes (64..2048 px per side, JPEG and PNG); the check reads headers only (no
--deep). The dataset is generated once into --workdir and reused. Target: under 20 s on a 2-core
machine.

    python benchmarks/check_data_speed.py [--records 20000] [--workdir /tmp/qvltune-bench-data] [--model builtin:tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path


def make_dataset(workdir: Path, n: int) -> Path:
    data = workdir / f"data-{n}.jsonl"
    if data.exists():
        return data
    from PIL import Image

    rng = random.Random(0)
    (workdir / "images").mkdir(parents=True, exist_ok=True)
    with open(data, "w") as f:
        for i in range(n):
            w, h = rng.randint(64, 2048), rng.randint(64, 2048)
            ext = "jpg" if i % 3 else "png"
            path = workdir / "images" / f"{i:06d}.{ext}"
            if not path.exists():
                # The content does not matter for a header read; a small solid image scaled in the header
                # would be cheating, so each file really has w x h pixels.
                Image.new("RGB", (w, h), (i % 256, 80, 160)).save(path, quality=60)
            question = " ".join(rng.choice(["what", "is", "shown", "in", "the", "image", "describe", "colour"]) for _ in range(rng.randint(3, 40)))
            answer = " ".join(rng.choice(["a", "red", "car", "on", "the", "road", "with", "trees"]) for _ in range(rng.randint(1, 200)))
            f.write(json.dumps({"image": f"images/{path.name}", "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}) + "\n")
    return data


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qvltune-bench-data"))
    ap.add_argument("--model", default=None, help="also count tokens exactly with this model's processor")
    args = ap.parse_args()
    data = make_dataset(args.workdir, args.records)
    cmd = [sys.executable, "-m", "qvltune", "check-data", str(data), "--json"]
    if args.model:
        cmd += ["--model", args.model]
    # Drop the page cache is not possible unprivileged everywhere; run once to warm, then time 3 runs.
    subprocess.run(cmd, capture_output=True, check=False)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        times.append(time.perf_counter() - t0)
    doc = json.loads(proc.stdout)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"command: {' '.join(cmd[2:])}")
    print(f"records: {doc['records']} (valid {doc['valid_records']}), images: {doc['image_sizes']['count']}")
    print(f"wall time (whole CLI process, 3 runs): {', '.join(f'{t:.2f}s' for t in times)}; best {min(times):.2f}s")


if __name__ == "__main__":
    main()
