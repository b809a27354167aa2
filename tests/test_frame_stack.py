"""server.frame_stack: the cache in front of CPython's arena allocator that keeps a call across
a frame-stack chunk boundary from mapping and unmapping a chunk on every call (gh-142183).

Each test runs in a fresh interpreter: the cache is installed for the whole process, for good.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from server import lora_kernel

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    lora_kernel._compiler() is None, reason="the cache is built with the machine's C compiler"
)

# Descends to every depth from 0 to 400 and calls a small function 200 times from the bottom:
# at the depths where that call does not fit in the current chunk, every call needs a chunk.
_SWEEP = """
import json, sys, threading
sys.setrecursionlimit(20000)
from server import frame_stack

def leaf(a):
    return a + 1

def descend(depth, calls):
    if depth:
        return descend(depth - 1, calls)
    return sum(leaf(i) for i in range(calls)) if calls else 0

def deep(depth):
    return depth if depth == 0 else 1 + deep(depth - 1)
"""


def _run(body: str) -> dict:
    script = _SWEEP + textwrap.dedent(body)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_calls_across_a_chunk_boundary_reuse_the_chunk():
    out = _run("""
        assert frame_stack.install() is not None
        before = frame_stack.counts()
        for depth in range(401):
            assert descend(depth, 200) == sum(range(1, 201))
        reused, passed = (n - m for n, m in zip(frame_stack.counts(), before))
        print(json.dumps({"reused": reused, "passed": passed}))
    """)
    # Some depth crossed a boundary in the loop (without the cache: a map and an unmap per
    # call), and the cache served those calls; what went to CPython's allocator is the first
    # chunk of each depth range and obmalloc's arenas.
    assert out["reused"] >= 199
    assert out["passed"] < out["reused"] / 10


def test_deep_stacks_and_other_threads_run_as_before():
    out = _run("""
        started = deep(3000)  # chunks allocated by CPython's allocator, freed through the cache
        assert frame_stack.install() is frame_stack.install()  # once per process
        results = []
        worker = threading.Thread(target=lambda: results.append(deep(5000)))
        worker.start()
        mine = [deep(5000) for _ in range(3)]  # more chunks than the cache keeps: some go back
        worker.join()
        counts = frame_stack.counts()
        print(json.dumps({"started": started, "mine": mine, "results": results,
                          "counts": counts}))
    """)
    assert out["started"] == 3000
    assert out["mine"] == [5000] * 3 and out["results"] == [5000]
    reused, passed = out["counts"]
    assert reused > 0 and passed > 0


def test_without_install_nothing_is_counted_and_the_switch_turns_it_off():
    out = _run("""
        counts = frame_stack.counts()
        import os
        os.environ[frame_stack.ENV_SWITCH] = "0"
        switched_off = frame_stack.install()
        print(json.dumps({"counts": counts, "switched_off": switched_off,
                          "after": frame_stack.counts(), "descend": descend(50, 10)}))
    """)
    assert out == {"counts": None, "switched_off": None, "after": None, "descend": 55}
