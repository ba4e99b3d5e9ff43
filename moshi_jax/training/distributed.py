"""Join a multi-process JAX run (`jax.distributed`) before any backend use, and the few multi-host helpers the
training loop needs (who writes, host copies of sharded trees, barriers, per-process batch rows).

    settings = resolve(cfg.distributed)       # where the run's processes come from (None: one process)
    join(cfg.distributed)                     # jax.distributed.initialize(...) once, then one log line
    is_primary()                              # process 0: the only writer of reports, events, exports, data
    host = to_host(tree)                      # global (possibly non-addressable) arrays -> numpy, every process

Where the processes come from, per setting (coordinator address, process count, process id), first found wins:
  1. the config keys `distributed.coordinator / num_processes / process_id`;
  2. the environment: MOSHI_JAX_COORDINATOR (host:port of process 0), MOSHI_JAX_NUM_PROCESSES, MOSHI_JAX_PROCESS_ID;
  3. SLURM, inside an `srun` step of several tasks: the first node of SLURM_STEP_NODELIST (port
     MOSHI_JAX_COORDINATOR_PORT, else derived from SLURM_JOB_ID as JAX does), SLURM_NTASKS, SLURM_PROCID;
  4. JAX's own detection (`jax.distributed.initialize()` without arguments): Cloud TPU VMs of a pod slice
     (GCE metadata, GKE variables), Open MPI, ...
`distributed.mode=auto` (default) joins when 1-3 name a run of several processes or when this is a Cloud TPU
VM; `on` always joins (4 fills what 1-3 leave unset); `off` never (N independent single-process runs).
Several processes on one machine's CPU (tests) use gloo collectives (`jax_cpu_collectives_implementation`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moshi_jax.training.config import ConfigError, DistributedConfig

logger = logging.getLogger("moshi_jax.train")

ENV_COORDINATOR = "MOSHI_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "MOSHI_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "MOSHI_JAX_PROCESS_ID"
ENV_COORDINATOR_PORT = "MOSHI_JAX_COORDINATOR_PORT"
MODES = ("auto", "on", "off")

_joined: Settings | None = None  # what `join` used (None: not joined by us)
_tag = ""  # "[p1/2] " once joined: prefixed to this process's log lines


class DistributedError(ConfigError):
    """Unusable multi-process settings (bad address, id out of range, half of the settings given)."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """How to call jax.distributed.initialize; None fields are left to JAX's cluster detection."""

    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    local_device_ids: tuple[int, ...] | None = None
    source: str = "config"  # where the settings came from, for the log line

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.coordinator is not None:
            out["coordinator_address"] = self.coordinator
        if self.num_processes is not None:
            out["num_processes"] = self.num_processes
        if self.process_id is not None:
            out["process_id"] = self.process_id
        if self.local_device_ids is not None:
            out["local_device_ids"] = list(self.local_device_ids)
        return out


def _int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r} is not an integer") from None


def slurm_first_node(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-006,9],cpu1' -> 'gpu003', 'a,b' -> 'a'."""
    cut = next((i for i, ch in enumerate(nodelist) if ch in ",["), len(nodelist))
    if cut == len(nodelist) or nodelist[cut] == ",":
        return nodelist[:cut]
    ranges = nodelist[cut + 1:]
    end = next((i for i, ch in enumerate(ranges) if ch in ",-]"), len(ranges))
    return nodelist[:cut] + ranges[:end]


def _slurm(env: Mapping[str, str]) -> Settings | None:
    """Settings of an `srun` step with several tasks (the batch script itself is one process: None)."""
    tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    if not all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID")) or tasks is None:
        return None
    n = _int(tasks, "SLURM_NTASKS")
    if n < 2:
        return None
    port = env.get(ENV_COORDINATOR_PORT) or str(_int(env["SLURM_JOB_ID"], "SLURM_JOB_ID") % 4096 + 61440)
    nodes = _int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES") or "1", "SLURM_STEP_NUM_NODES")
    # Several tasks per node that all see the node's GPUs: task i takes GPU SLURM_LOCALID (as JAX's own SLURM
    # support does). One task per node (the launch the README shows) keeps every GPU of the node, and
    # --gpus-per-task=1 (one visible GPU per task) needs no choice.
    visible = env.get("CUDA_VISIBLE_DEVICES")
    one_visible = visible is not None and "," not in visible
    local_ids = None
    if n > nodes and "SLURM_LOCALID" in env and not one_visible:
        local_ids = (_int(env["SLURM_LOCALID"], "SLURM_LOCALID"),)
    return Settings(f"{slurm_first_node(env['SLURM_STEP_NODELIST'])}:{port}", n,
                    _int(env["SLURM_PROCID"], "SLURM_PROCID"), local_ids, "slurm")


def on_cloud_tpu_vm() -> bool:
    """True on a Cloud TPU VM (JAX's own check: libtpu + the TPU VM's PCI ids), where JAX detects the slice."""
    try:
        from jax._src import cloud_tpu_init

        return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))
    except ImportError:
        return False


def resolve(dcfg: DistributedConfig, env: Mapping[str, str] | None = None, tpu: bool | None = None) -> Settings | None:
    """The settings to join with, or None for a single-process run (`tpu`: whether this is a Cloud TPU VM,
    None: ask JAX)."""
    env = os.environ if env is None else env
    if dcfg.mode not in MODES:
        raise DistributedError(f"distributed.mode must be one of {MODES}, got {dcfg.mode!r}")
    if dcfg.mode == "off":
        return None
    coordinator = dcfg.coordinator or env.get(ENV_COORDINATOR) or None
    n = dcfg.num_processes if dcfg.num_processes > 0 else (
        _int(env[ENV_NUM_PROCESSES], ENV_NUM_PROCESSES) if env.get(ENV_NUM_PROCESSES) else None)
    pid = dcfg.process_id if dcfg.process_id >= 0 else (
        _int(env[ENV_PROCESS_ID], ENV_PROCESS_ID) if env.get(ENV_PROCESS_ID) else None)
    explicit = (coordinator, n, pid) != (None, None, None)
    slurm = _slurm(env)
    if slurm is not None:
        source = "config/env + slurm" if explicit else "slurm"
        coordinator, n = coordinator or slurm.coordinator, n or slurm.num_processes
        pid = slurm.process_id if pid is None else pid
        settings = Settings(coordinator, n, pid, slurm.local_device_ids, source)
    elif explicit:
        settings = Settings(coordinator, n, pid, None, "config/env")
        missing = [k for k, v in (("coordinator", coordinator), ("num_processes", n), ("process_id", pid))
                   if v is None]
        if missing and dcfg.mode == "auto":
            raise DistributedError(
                f"multi-process settings are incomplete: distributed.{', distributed.'.join(missing)} not set (nor "
                f"{ENV_COORDINATOR} / {ENV_NUM_PROCESSES} / {ENV_PROCESS_ID}); set all three, or "
                f"distributed.mode=on to let JAX detect the rest")
    elif dcfg.mode == "on" or (on_cloud_tpu_vm() if tpu is None else tpu):
        return Settings(None, None, None, None, "jax cluster detection")
    else:
        return None
    _check(settings)
    if settings.num_processes == 1 and dcfg.mode == "auto":
        return None  # a one-process "cluster" needs no coordinator
    return settings


def _check(s: Settings) -> None:
    if s.num_processes is not None and s.num_processes < 1:
        raise DistributedError(f"the process count must be >= 1, got {s.num_processes}")
    if s.process_id is not None and s.num_processes is not None and not 0 <= s.process_id < s.num_processes:
        raise DistributedError(f"process id {s.process_id} is not in [0, {s.num_processes})")
    if s.coordinator is not None:
        host, _, port = s.coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise DistributedError(f"coordinator address {s.coordinator!r} is not host:port")


def join(cfg: Any = None, env: Mapping[str, str] | None = None) -> Settings | None:
    """Join the run's processes (once; later calls are no-ops) and log one line: index, count, devices.

    `cfg`: a DistributedConfig or any config with a `distributed` section (a TrainConfig); None: defaults.
    Must run before anything touches a JAX backend (jax.devices(), a jit, an array). Returns the settings
    used, None for a single-process run."""
    global _joined, _tag
    import jax

    dcfg = cfg if isinstance(cfg, DistributedConfig) else getattr(cfg, "distributed", None) or DistributedConfig()

    if _joined is not None or jax.distributed.is_initialized():
        return _joined
    settings = resolve(dcfg, env)
    if settings is None:
        return None
    if _backend_started():
        raise DistributedError("jax.distributed must be joined before any JAX computation: call "
                               "moshi_jax.training.distributed.join(cfg.distributed) first thing in the program")
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes: cross-process collectives
    jax.distributed.initialize(**settings.kwargs(), initialization_timeout=int(dcfg.initialization_timeout))
    _joined = settings
    _tag = f"[p{jax.process_index()}/{jax.process_count()}] "
    local = jax.local_devices()
    logger.info("process %d of %d joined (%s, coordinator %s): %d local %s devices, %d global",
                jax.process_index(), jax.process_count(), settings.source, settings.coordinator or "detected",
                len(local), local[0].platform if local else "no", jax.device_count())
    return settings


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge._backends)
    except (ImportError, AttributeError):
        return False


class ProcessTag(logging.Filter):
    """Adds `process_tag` ('[p1/2] ' after joining a multi-process run, else '') to log records."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.process_tag = _tag
        return True


def process_index() -> int:
    import jax

    return jax.process_index()


def is_primary() -> bool:
    """Process 0: the one that writes the run's shared files (reports, events, config, exports, built data)."""
    return process_index() == 0


def to_host(tree: Any) -> Any:
    """numpy copies of a tree of global jax.Arrays on every process (a collective when several processes
    hold parts of them: every process must call it)."""
    import jax

    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Wait until every process reaches the barrier `name` (no-op for one process)."""
    import jax

    if jax.process_count() > 1:  # the coordinator's barrier (no device collective: waits as long as asked)
        from orbax.checkpoint import multihost

        multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)


def local_rows(global_batch: int, process_count: int | None = None) -> int:
    """Rows of each global batch this process loads (`global_batch / process_count`); clear error otherwise."""
    import jax

    pc = jax.process_count() if process_count is None else process_count
    if global_batch % pc:
        raise DistributedError(f"data.batch_size {global_batch} is not divisible by the {pc} processes")
    return global_batch // pc


def process_batches(ds, global_batch: int, process_index: int | None = None, process_count: int | None = None):
    """A grain MapDataset of examples in global order -> this process's batches (a MapDataset): global batch i
    is examples [i*B, (i+1)*B) and process p gets its rows [p*B/P, (p+1)*B/P) (what its devices hold along the
    batch axes of a process-major mesh). So the global batches, and the training run, do not depend on the
    process count, and the processes' examples are disjoint and together cover the stream. A finite `ds` ends
    with its last whole global batch (pad it first to keep every example)."""
    import grain
    import jax

    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    b = local_rows(global_batch, pc)
    try:
        n = len(ds)
    except OverflowError:  # a mixture of infinite streams
        n = sys.maxsize
    n_batches = n // global_batch
    return grain.MapDataset.range(n_batches * b).map(_ProcessRows(ds, b, global_batch, pi)).batch(b)


class _ProcessRows:
    """Local example k -> example (k // b) * B + p * b + k % b of the global stream (picklable for workers)."""

    def __init__(self, ds, b: int, global_batch: int, process_index: int):
        self.ds, self.b, self.B, self.p = ds, b, global_batch, process_index

    def __call__(self, k: int):
        return self.ds[(k // self.b) * self.B + self.p * self.b + k % self.b]


def check_data_state(step_dir: str | Path) -> None:
    """A checkpoint's data iterator positions are per process (`process_<i>-of-<n>.json`): resuming needs the
    process count that saved it. Raises CheckpointMismatchError (naming both counts) otherwise."""
    import jax

    from moshi_jax.training.checkpointing import CheckpointMismatchError

    data = Path(step_dir) / "data_iter"
    if not data.is_dir():
        return
    want = data / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    saved = sorted(p.name for p in data.glob("process_*-of-*.json"))
    if saved and not want.exists():
        counts = sorted({name.rsplit("-of-", 1)[1].removesuffix(".json") for name in saved})
        raise CheckpointMismatchError(
            f"checkpoint {step_dir} holds the data positions of {'/'.join(counts)} process(es) ({saved[:4]}...), "
            f"this run has {jax.process_count()}: resume with the same process count, or start a new run "
            f"(checkpoint.dir=... or checkpoint.resume=false)")
