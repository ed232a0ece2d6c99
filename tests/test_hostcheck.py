"""``qvltune doctor --hostfile``: what DeepSpeed's ssh/pdsh runner needs on every host.

ssh cannot reach another machine from a test, so a stand-in ``ssh`` on PATH runs the probe here for
``localhost`` and answers like ssh does for a name that does not resolve; no address but loopback is
contacted. The judgement (``host_checks``) is tested on made-up answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from qvltune.hostcheck import HostReport, host_checks, read_hostfile

HERE = {"qvltune": "0.1.0", "torch": "2.14.1", "transformers": "5.24.0", "deepspeed": "0.19.8"}
PATHS = {"working folder": "/work/run", "data train.jsonl": "/data/train.jsonl"}

FAKE_SSH = """#!/usr/bin/env bash
while [[ "$1" == -o ]]; do shift 2; done
host=$1; shift
if [[ "$host" == localhost ]]; then exec bash -c "$*"; fi
echo "ssh: Could not resolve hostname $host: Name or service not known" >&2
exit 255
"""


def by_name(checks):
    return {c.name: c for c in checks}


def test_every_gap_is_named_with_its_fix():
    hosts = {"a": 8, "b": 8, "c": 8, "d": 4}
    reports = [
        HostReport("a", 8, True, versions=HERE, exists={p: True for p in PATHS.values()}),
        HostReport("b", 8, True, versions={**HERE, "torch": "2.13.0", "deepspeed": None}, exists={p: True for p in PATHS.values()}),
        HostReport("c", 8, True, versions=HERE, exists={"/work/run": True, "/data/train.jsonl": False}),
        HostReport("d", 4, False, "ssh: connect to host d port 22: Connection refused"),
    ]
    checks = by_name(host_checks(hosts, reports, HERE, PATHS, pdsh=None, ssh="/usr/bin/ssh"))
    assert checks["hostfile"].status == "warn" and "slots differ" in checks["hostfile"].detail
    assert checks["pdsh"].status == "fail" and "--node-rank" in checks["pdsh"].fix
    assert checks["host a"].status == "ok"
    assert checks["host b"].status == "fail" and "torch 2.13.0 (here 2.14.1)" in checks["host b"].detail and "deepspeed missing" in checks["host b"].detail
    assert checks["host c"].status == "fail" and "data train.jsonl /data/train.jsonl" in checks["host c"].detail and "shared storage" in checks["host c"].fix
    assert checks["host d"].status == "fail" and "Connection refused" in checks["host d"].detail and "ssh-copy-id d" in checks["host d"].fix


def test_a_bad_hostfile_is_read_by_deepspeeds_parser(tmp_path):
    (tmp_path / "h").write_text("node1 slots=8\nnode2 slots=8\n")
    assert read_hostfile(tmp_path / "h") == {"node1": 8, "node2": 8}


def test_doctor_hostfile_reaches_localhost_and_names_the_unreachable_host(tmp_path, demo_data):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(FAKE_SSH)
    (bin_dir / "ssh").chmod(0o755)
    (tmp_path / "hostfile").write_text("localhost slots=2\nno-such-node.invalid slots=2\n")
    train, _ = demo_data
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"name": "h", "output_dir": str(tmp_path / "runs"), "model": {"path": "builtin:tiny"}, "data": {"train": str(train)}, "launch": {"nodes": 2, "hostfile": "hostfile"}}))
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run([sys.executable, "-m", "qvltune", "doctor", "--config", str(config), "--json"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    checks = {c["name"]: c for c in json.loads(out.stdout)["checks"]}
    assert checks["hostfile"]["status"] == "ok" and "2 host(s), 4 slot(s)" in checks["hostfile"]["detail"]
    assert checks["host localhost"]["status"] == "ok" and "torch" in checks["host localhost"]["detail"]
    assert "3 path(s) present" in checks["host localhost"]["detail"]  # this folder (= the output folder's parent), python, the data
    assert checks["host no-such-node.invalid"]["status"] == "fail" and "Could not resolve hostname" in checks["host no-such-node.invalid"]["detail"]
    # A path that is not there on a reachable host.
    missing = json.loads(config.read_text())
    missing["data"]["image_root"] = str(tmp_path / "not-mounted")
    config.write_text(json.dumps(missing))
    out = subprocess.run([sys.executable, "-m", "qvltune", "doctor", "--config", str(config), "--json"], capture_output=True, text=True, env=env, cwd=tmp_path)
    checks = {c["name"]: c for c in json.loads(out.stdout)["checks"]}
    assert checks["host localhost"]["status"] == "fail" and f"image root {tmp_path / 'not-mounted'}" in checks["host localhost"]["detail"]
