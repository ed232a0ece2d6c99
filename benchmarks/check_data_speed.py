"""How long ``qvltune check-data`` takes on 20 000 records referencing 20 000 distinct images.

Images have varied sizes (64..2048 px per side, JPEG and PNG); the check reads headers only (no
--deep). The dataset is generated once into --workdir and reused. Target: under 20 s on a 2-core
machine.

With ``--hostile 0.05`` the same dataset is also checked with 5% of its records pointing at hostile
media instead (decompression bombs, truncated and lying images, text named .png, empty files,
symlinks out of the root, missing files, URLs), and the two times are compared. Target: the hostile
dataset takes under 2x the clean one.

    python benchmarks/check_data_speed.py [--records 20000] [--workdir /tmp/qvltune-bench-data] [--model builtin:tiny] [--hostile 0.05]
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


HOSTILE_KINDS = ["bomb", "truncated", "lying", "text", "empty", "symlink-out", "missing", "url"]


def make_hostile(workdir: Path, clean: Path, share: float) -> Path:
    """The clean dataset with every 1/share-th record's image replaced by a hostile one (kinds in turn)."""
    data = workdir / f"{clean.stem}-hostile{share:g}.jsonl"
    if data.exists():
        return data
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from hostile_files import bomb_png, write_lying_png

    bad = workdir / "images" / "hostile"
    bad.mkdir(parents=True, exist_ok=True)
    outside = workdir.parent / f"{workdir.name}-outside.png"  # outside the image root (the dataset's folder)
    outside.write_bytes((workdir / "images" / "000000.png").read_bytes())
    every = round(1 / share)
    with open(clean) as src, open(data, "w") as out:
        for i, line in enumerate(src):
            rec = json.loads(line)
            if i % every == every - 1:
                kind = HOSTILE_KINDS[(i // every) % len(HOSTILE_KINDS)]
                name = f"hostile/{i:06d}.png"
                path = workdir / "images" / name
                if kind == "bomb":
                    path.write_bytes(bomb_png())
                elif kind == "truncated":
                    own = (workdir / rec["image"]).read_bytes()
                    path.write_bytes(own[: len(own) // 2])
                elif kind == "lying":
                    write_lying_png(path, claimed=(4000, 3000), real=(10, 10))
                elif kind == "text":
                    path.write_text("<html>404 not found</html>")
                elif kind == "empty":
                    path.write_bytes(b"")
                elif kind == "symlink-out":
                    path.unlink(missing_ok=True)
                    path.symlink_to(outside)
                elif kind == "url":
                    name = f"https://example.com/{i}.png"
                rec["image"] = name if kind == "url" else f"images/{name}"  # "missing": never written
            out.write(json.dumps(rec) + "\n")
    return data


def timed(cmds: list[list[str]], rounds: int = 3) -> list[tuple[list[float], dict]]:
    """Each command run once to warm the page cache, then ``rounds`` times, interleaved (on a shared
    machine the load drifts: interleaving exposes every command to the same drift)."""
    # Dropping the page cache is not possible unprivileged everywhere.
    for cmd in cmds:
        subprocess.run(cmd, capture_output=True, check=False)
    times: list[list[float]] = [[] for _ in cmds]
    docs: list[dict] = [{} for _ in cmds]
    for _ in range(rounds):
        for i, cmd in enumerate(cmds):
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            times[i].append(time.perf_counter() - t0)
            docs[i] = json.loads(proc.stdout)
    return list(zip(times, docs))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qvltune-bench-data"))
    ap.add_argument("--model", default=None, help="also count tokens exactly with this model's processor")
    ap.add_argument("--hostile", type=float, default=None, help="also time the dataset with this share of records pointing at hostile media, e.g. 0.05")
    args = ap.parse_args()
    data = make_dataset(args.workdir, args.records)
    datasets = [data] + ([make_hostile(args.workdir, data, args.hostile)] if args.hostile else [])
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}")
    cmds = [[sys.executable, "-m", "qvltune", "check-data", str(path), "--json"] + (["--model", args.model] if args.model else []) for path in datasets]
    best = []
    for cmd, (times, doc) in zip(cmds, timed(cmds)):
        best.append(min(times))
        print(f"command: {' '.join(cmd[2:])}")
        failures = ", ".join(f"{k} {v}" for k, v in doc.get("failures", {}).items())
        print(f"  records: {doc['records']} (valid {doc['valid_records']}, failed {doc.get('failed_records', 0)}{': ' + failures if failures else ''}), images read: {doc['image_sizes']['count']}")
        print(f"  wall time (whole CLI process, 3 runs): {', '.join(f'{t:.2f}s' for t in times)}; best {min(times):.2f}s")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    if len(best) == 2:
        print(f"hostile / clean: {best[1] / best[0]:.2f}x (target < 2x)")


if __name__ == "__main__":
    main()
