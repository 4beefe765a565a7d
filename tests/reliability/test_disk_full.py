"""Disk full in the model cache and in the staging area: a clear error, nothing half-written left as valid.

The full disk is real: the ``medvlm`` command runs in a private mount namespace (``unshare``) where the
cache or output folder is a tiny tmpfs, so writes fail with ENOSPC from the kernel. A listing of that
tmpfs (and a check that every Parquet file there opens) is taken before the namespace goes away.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import write_manifest
from support.reliability_report import record

MEDVLM = str(Path(sys.executable).with_name("medvlm"))

# Runs inside the namespace after the command: what the full filesystem holds, and whether each Parquet
# file there is whole.
INSPECT = r"""
import json, os, sys
import pyarrow.parquet as pq
root, out = sys.argv[1], sys.argv[2]
files = {}
for d, _, names in os.walk(root):
    for n in names:
        p = os.path.join(d, n)
        ok = None
        if n.endswith(".parquet"):
            try:
                pq.read_table(p)
                ok = True
            except Exception:
                ok = False
        files[os.path.relpath(p, root)] = ok
json.dump(files, open(out, "w"))
"""


def _unshare_prefix() -> list[str]:
    """The unshare command that may mount a tmpfs here: as root a mount namespace, else a user one too."""
    if shutil.which("unshare") is None:
        return []
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
        probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt 2>/dev/null || "
                                "mount -t tmpfs -o size=4k tmpfs /tmp"], capture_output=True)
        if probe.returncode == 0:
            return prefix
    return []


UNSHARE = _unshare_prefix()
pytestmark = pytest.mark.skipif(not UNSHARE, reason="no mount namespace here (unshare -m / -rm refused)")


def run_on_full_disk(mountpoint: Path, size: str, args: list[str], listing: Path, env: dict) -> subprocess.CompletedProcess:
    """``medvlm args`` with ``mountpoint`` a ``size`` tmpfs; the tmpfs's files are listed into ``listing``."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    script = (
        'mount -t tmpfs -o size="$1" tmpfs "$2" || exit 97; mnt="$2"; listing="$3"; shift 3; '
        '"$@"; rc=$?; "$PYTHON" -c "$INSPECT" "$mnt" "$listing"; exit $rc'
    )
    env = dict(env, PYTHON=sys.executable, INSPECT=INSPECT)
    return subprocess.run([*UNSHARE, "sh", "-c", script, "sh", size, str(mountpoint), str(listing), MEDVLM, *args],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def cli_env(tmp_path):
    return dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), MEDVLM_CACHE_DIR=str(tmp_path / "cache"),
                PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")


def test_model_cache_full(tmp_path, tiny_qwen, demo_docs, cli_env):
    bundle = tmp_path / "vendor.zip"
    with zipfile.ZipFile(bundle, "w") as z:  # stored, not deflated: the extraction writes the full size
        z.write(tiny_qwen.model_path, "text.gguf")
        z.write(tiny_qwen.mmproj_path, "vision.gguf")
    manifest = write_manifest(tmp_path / "m.csv", demo_docs)
    cache = tmp_path / "cache"
    listing = tmp_path / "listing.json"
    done = run_on_full_disk(cache, "64k", ["run", "--manifest", str(manifest), "--output", str(tmp_path / "out"),
                                           "--model", str(bundle), "--max-tokens", "4"], listing, cli_env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "No space left on device" in done.stderr and "vendor.zip" in done.stderr
    assert "Traceback" not in done.stderr
    files = json.loads(listing.read_text())
    # no extracted model, complete or partial, and no temp folder: only the lock file may remain
    assert [f for f in files if not f.endswith(".lock")] == [], files
    record("disk full: model cache", inputs=1, faults={"ENOSPC": 1})
    assert not (tmp_path / "out" / "completions").exists()


def test_staging_area_full(tmp_path, tiny_llava, demo_docs, cli_env):
    records = [dict(r, document_id=f"{r['document_id']}-{i}") for i in range(4) for r in demo_docs]
    manifest = write_manifest(tmp_path / "in" / "m.csv", records)
    out = tmp_path / "out"
    listing = tmp_path / "listing.json"
    # room for the write probe (one page), not for the staged chunk files
    done = run_on_full_disk(out, "8k", ["run", "--manifest", str(manifest), "--output", str(out),
                                        "--model", str(tiny_llava.model_path), "--mmproj", str(tiny_llava.mmproj_path),
                                        "--max-tokens", "24"], listing, cli_env)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "No space left on device" in done.stderr
    # one message names the place and the cause
    assert any("No space left on device" in line and str(out) in line for line in done.stderr.splitlines())
    files = json.loads(listing.read_text())
    assert not [f for f in files if f.endswith(".tmp")], files  # temp files removed
    assert all(ok for ok in files.values() if ok is not None), files  # every Parquet file present is whole
    # nothing published, no commit record (the lease's record stays, marked released: medvlm_core/output/lease.py)
    published = [f for f in files if not f.startswith(("_staging", "_lease/"))]
    assert published == [], files
    record("disk full: staging area", inputs=len(records), faults={"ENOSPC": 1})
