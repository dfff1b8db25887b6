"""The process-wide CPU tuning of the ``lavit`` commands, each check in a fresh interpreter."""

import json
import os
import platform
import subprocess
import sys

import pytest

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

PROBE = """
import json, resource, torch
from lavit.runtime import tune_cpu_runtime
state = tune_cpu_runtime()
tiny = torch.tensor([1e-39])  # a float32 denormal
faults = []  # page faults while allocating and filling 64, 60, 56, 52 MiB tensors in turn
for mib in (64, 60, 56, 52):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(mib * 2**18)  # float32: freed again at once
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"state": state, "denormal_times_one": (tiny * 1.0).item(), "faults": faults}))
"""


def probe(tuning: str) -> dict:
    env = {**os.environ, "LAVIT_CPU_TUNING": tuning, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def probes() -> tuple[dict, dict]:
    """The probe's result with the tuning on (the default) and with ``LAVIT_CPU_TUNING=0``."""
    return probe("1"), probe("0")


def test_tuning_flushes_denormals_and_lavit_cpu_tuning_0_turns_it_off(probes):
    tuned, plain = probes
    assert tuned["state"]["flush_denormal"] is True and tuned["denormal_times_one"] == 0.0
    assert plain["state"] == {"keep_freed_memory": False, "flush_denormal": False}
    assert plain["denormal_times_one"] > 0.0


@pytest.mark.skipif(not GLIBC, reason="the allocator setting is glibc's (Linux)")
def test_tuning_reuses_freed_memory_instead_of_faulting_it_in_again(probes):
    tuned, plain = probes
    assert tuned["state"]["keep_freed_memory"] is True
    pages = [mib * 256 for mib in (64, 60, 56, 52)]  # 4 KiB pages
    # glibc's default: blocks this large are mapped afresh, so every one faults all its pages in
    assert all(f >= 0.9 * p for f, p in zip(plain["faults"], pages, strict=True)), plain
    # tuned: the first block is faulted in once; each smaller one reuses its freed memory
    assert tuned["faults"][0] >= 0.9 * pages[0], tuned
    assert max(tuned["faults"][1:]) < 0.05 * pages[-1], tuned
