"""The process-wide CPU tuning of the ``lavit`` commands, each check in a fresh interpreter."""

import json
import os
import platform
import subprocess
import sys

import pytest

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

PROBE = """
import json, resource, timm, torch
import lavit
from lavit.runtime import tune_cpu_runtime
state = tune_cpu_runtime()
tiny = torch.tensor([1e-39])  # a float32 denormal
torch.manual_seed(0)
model = timm.create_model("lavit_tiny", num_classes=10)
x = torch.randn(4, 3, 224, 224)
faults = []  # page faults of each training step (forward + backward)
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model(x).sum().backward()
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
def test_tuning_reuses_freed_memory_instead_of_faulting_it_in_every_step(probes):
    tuned, plain = probes
    assert tuned["state"]["keep_freed_memory"] is True
    # Both fault the activations in on the first step (~300 MB here). Later steps: glibc's
    # default maps large blocks afresh (tens of thousands of faults a step); tuned, the heap
    # hands the freed blocks back.
    assert tuned["faults"][0] > 10_000 and plain["faults"][0] > 10_000
    steady_tuned, steady_plain = sum(tuned["faults"][2:]), sum(plain["faults"][2:])
    assert steady_plain > 40_000
    assert steady_tuned * 5 < steady_plain, (tuned["faults"], plain["faults"])
