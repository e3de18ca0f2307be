"""How many CPU threads each process uses, chosen on purpose.

PyTorch's default is one intra-op thread per core for every process. Two torchrun processes on a 2-core machine
then run four spinning OpenMP threads on two cores, and any other load on the machine makes every parallel region
wait for its slowest thread: on a busy 2-core machine a tiny-profile training step went from about 1 s to 13 s.
``configure_cpu_threads`` gives each process its share of the cores instead (``cores // local world size``, at
least one), where ``cores`` honours the CPU affinity mask and a cgroup CPU quota (a Kubernetes CPU limit).

Overrides, strongest first: the ``threads`` argument (a ``--threads`` flag), ``EASYREF_THREADS``, then
``OMP_NUM_THREADS`` (which torch already applied at import; torchrun sets it to 1 for more than one process unless
the user set it). On a CUDA device nothing is changed unless an override is given: the GPU does the work there.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "EASYREF_THREADS"
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """Cores this process may run on: the affinity mask, capped by a cgroup v2 CPU quota (rounded up)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota: the affinity mask is the limit
    return max(1, cores)


def _positive(value: str, name: str) -> int:
    from easyref.errors import UserError

    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise UserError(f"{name}={value!r}: the number of CPU threads must be a positive integer")
    return number


def choose_threads(
    local_world_size: int | None = None,
    threads: int | None = None,
    environ: dict[str, str] | None = None,
    cores: int | None = None,
) -> tuple[int | None, str]:
    """(threads, why): the thread count to set, or ``None`` to leave torch's own choice, and the reason."""
    env = os.environ if environ is None else environ
    if threads is not None:
        return _positive(str(threads), "--threads"), "--threads"
    if env.get(ENV):
        return _positive(env[ENV], ENV), ENV
    if env.get("OMP_NUM_THREADS"):
        return _positive(env["OMP_NUM_THREADS"], "OMP_NUM_THREADS"), "OMP_NUM_THREADS"
    if local_world_size is None:
        local_world_size = int(env.get("LOCAL_WORLD_SIZE") or 1)
    cores = available_cores() if cores is None else cores
    return max(1, cores // max(1, local_world_size)), f"{cores} cores / {local_world_size} local process(es)"


def configure_cpu_threads(
    local_world_size: int | None = None, threads: int | None = None, device: str | None = None
) -> int:
    """Set torch's intra-op threads for this process (see the module docstring); returns the number in use."""
    import torch

    chosen, why = choose_threads(local_world_size, threads)
    on_gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if on_gpu and why not in ("--threads", ENV):
        return torch.get_num_threads()
    if chosen is not None and torch.get_num_threads() != chosen:
        torch.set_num_threads(chosen)
    rank = os.environ.get("RANK", "0")
    if rank == "0":
        print(f"[easyref] CPU threads per process: {torch.get_num_threads()} ({why})", file=sys.stderr, flush=True)
    return torch.get_num_threads()
