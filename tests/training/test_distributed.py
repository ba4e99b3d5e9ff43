"""Multi-process training (jax.distributed): where the processes come from, per-process data rows, and real runs
of `moshi-jax train` with several processes on this machine's CPU (gloo collectives, loopback coordinator):
2 processes x 4 devices, killed and resumed, train exactly as 1 process x 8 devices; process 0 alone writes the
run's files; the processes' data shards are disjoint and cover every epoch."""

from __future__ import annotations

import itertools
import json
import os
import select
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moshi_jax.data import pipeline
from moshi_jax.data.records import ShardWriter, write_index
from moshi_jax.lm.config import LMConfig
from moshi_jax.training import distributed
from moshi_jax.training.config import DataConfig, DataSource, DistributedConfig

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
WORKER = HERE / "distributed_worker.py"

# ------------------------------------------------------------------------------------- where processes come from


def test_settings_come_from_config_keys_then_env_variables():
    env = {distributed.ENV_COORDINATOR: "10.0.0.1:1234", distributed.ENV_NUM_PROCESSES: "4",
           distributed.ENV_PROCESS_ID: "3"}
    s = distributed.resolve(DistributedConfig(), env, tpu=False)
    assert (s.coordinator, s.num_processes, s.process_id) == ("10.0.0.1:1234", 4, 3)
    s = distributed.resolve(DistributedConfig(coordinator="h:9", process_id=1), env, tpu=False)
    assert (s.coordinator, s.num_processes, s.process_id) == ("h:9", 4, 1)  # keys win over the environment


def test_slurm_srun_step_gives_first_node_task_count_and_rank():
    env = {"SLURM_JOB_ID": "4097", "SLURM_STEP_NODELIST": "gpu[003-006,9],cpu1", "SLURM_NTASKS": "4",
           "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": "4"}
    s = distributed.resolve(DistributedConfig(), env, tpu=False)
    assert (s.coordinator, s.num_processes, s.process_id, s.local_device_ids) == ("gpu003:61441", 4, 2, None)
    assert distributed.slurm_first_node("node7,node8") == "node7" and distributed.slurm_first_node("x") == "x"
    # two tasks per node that both see the node's GPUs: each takes the GPU of its local rank
    two_per_node = dict(env, SLURM_STEP_NUM_NODES="2", SLURM_LOCALID="1", CUDA_VISIBLE_DEVICES="0,1")
    assert distributed.resolve(DistributedConfig(), two_per_node, tpu=False).local_device_ids == (1,)
    # the batch script itself (no srun step, or a one-task step) is a single process
    assert distributed.resolve(DistributedConfig(), {k: v for k, v in env.items() if "STEP" not in k},
                               tpu=False) is None
    assert distributed.resolve(DistributedConfig(), dict(env, SLURM_STEP_NUM_TASKS="1"), tpu=False) is None


def test_single_process_off_and_tpu_detection_modes():
    assert distributed.resolve(DistributedConfig(), {}, tpu=False) is None
    tpu = distributed.resolve(DistributedConfig(), {}, tpu=True)  # a Cloud TPU VM: JAX detects the slice
    assert (tpu.coordinator, tpu.num_processes, tpu.process_id) == (None, None, None)
    assert distributed.resolve(DistributedConfig(mode="on"), {}, tpu=False).kwargs() == {}
    explicit = {distributed.ENV_COORDINATOR: "h:1", distributed.ENV_NUM_PROCESSES: "2",
                distributed.ENV_PROCESS_ID: "0"}
    assert distributed.resolve(DistributedConfig(mode="off"), explicit, tpu=True) is None
    assert distributed.resolve(DistributedConfig(num_processes=1, process_id=0, coordinator="h:1"), {}) is None


@pytest.mark.parametrize("cfg, env, match", [
    (DistributedConfig(coordinator="h:1"), {}, "incomplete"),
    (DistributedConfig(coordinator="h:1", num_processes=2, process_id=2), {}, r"not in \[0, 2\)"),
    (DistributedConfig(coordinator="nohostport", num_processes=2, process_id=0), {}, "host:port"),
    (DistributedConfig(), {distributed.ENV_NUM_PROCESSES: "two"}, "not an integer"),
])
def test_bad_or_incomplete_settings_are_clear_errors(cfg, env, match):
    with pytest.raises(distributed.DistributedError, match=match):
        distributed.resolve(cfg, env, tpu=False)


def test_joining_after_the_backend_started_is_a_clear_error():
    import jax

    jax.devices()  # this test process has computed already: too late to join
    cfg = DistributedConfig(coordinator="127.0.0.1:1", num_processes=2, process_id=0, initialization_timeout=1)
    with pytest.raises(distributed.DistributedError, match="before any JAX computation"):
        distributed.join(cfg, env={})
    assert not jax.distributed.is_initialized()


def test_resuming_with_another_process_count_is_refused_naming_both_counts(tmp_path):
    from moshi_jax.training.checkpointing import CheckpointMismatchError

    step = tmp_path / "7"
    (step / "data_iter").mkdir(parents=True)
    for i in range(2):
        (step / "data_iter" / f"process_{i}-of-2.json").write_text("{}")
    with pytest.raises(CheckpointMismatchError, match=r"data positions of 2 process\(es\).*this run has 1"):
        distributed.check_data_state(step)
    (step / "data_iter" / "process_0-of-1.json").write_text("{}")
    distributed.check_data_state(step)  # this process's position is there


# ------------------------------------------------------------------------------------------- per-process data rows

LM = LMConfig.tiny()  # 1 text + 8 + 8 audio streams, text_card 512, card 2048


def write_dataset(root: Path, lengths, seed: int = 0) -> str:
    """A tokenized dataset (what `moshi-jax data tokenize` writes) of random codes for LMConfig.tiny()."""
    rng = np.random.default_rng(seed)
    records = []
    with ShardWriter(root, 4) as w:
        for r, n in enumerate(lengths):
            codes = np.concatenate([rng.integers(0, LM.text_card, (1, n)), rng.integers(0, LM.card, (16, n))])
            w.write(codes.astype(np.int32), {"path": f"rec{r}.wav"})
            records.append({"path": f"rec{r}.wav", "num_frames": int(n), "channels": 2})
        shards = w.shards
    config = {"text": {"vocab_size": LM.text_card, "pad_id": 3, "epad_id": 0},
              "mimi": {"codebook_size": LM.card, "num_codebooks": 8}}
    write_index(root, kind="audio", config=config, shards=shards, records=records, skipped=[])
    return str(root)


def test_process_rows_concatenate_to_the_one_process_batches_train_and_eval(tmp_path):
    src = write_dataset(tmp_path / "d", [20, 9, 33, 8, 16])  # 3 + 2 + 5 + 1 + 2 = 13 windows of 8 frames
    cfg = DataConfig(sources=(DataSource(src),), eval_sources=(DataSource(src),), seq_frames=8, batch_size=4)
    for train, n in ((True, 7), (False, None)):
        one = _take(pipeline.make_dataset(cfg, LM, train, process_index=0, process_count=1), n)
        parts = [_take(pipeline.make_dataset(cfg, LM, train, process_index=p, process_count=2), n) for p in range(2)]
        assert len(parts[0]) == len(parts[1]) == len(one)  # eval: the same number of batches on every process
        for i, batch in enumerate(one):
            for key in ("codes", "window", "source"):
                np.testing.assert_array_equal(np.concatenate([parts[0][i][key], parts[1][i][key]]), batch[key])
    assert len(one) == 4 and sorted(np.concatenate([b["window"] for b in one]).tolist()) == [-1] * 3 + list(
        range(13))  # eval: every window once, padded to whole global batches


def _take(ds, n: int | None) -> list[dict]:
    return list(itertools.islice(iter(ds), n))


# ------------------------------------------------------------------------------------- real multi-process runs

STEPS, KILL_AT = 4, 3  # the killed run dies saving step 3: it resumes from step 2's checkpoint
RUN_ARGS = ["tiny", f"steps={STEPS}", "data.seq_frames=8", "data.batch_size=8", "model.temporal.num_layers=1",
            "model.depth.num_layers=1", "checkpoint.every=1", "checkpoint.keep=8", "metrics.log_every=1",
            "metrics.progress_bar=false", "optimizer.lr=1e-2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp: Path, name: str, per_process_args: list[list[str]], devices: int, timeout: float = 420,
           expect_killed: bool = False) -> list[str]:
    """Start one worker per entry of `per_process_args` (a multi-process run when several), each with `devices` CPU
    devices; wait for all (bounded), kill all on the first failure; return their logs. The workers share a JAX
    compilation cache in `tmp` (the resumed run reuses the killed run's executables)."""
    port, n = _free_port(), len(per_process_args)
    procs, logs = [], []
    for i, args in enumerate(per_process_args):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]), JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                   JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"))
        for k in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
            env.pop(k, None)
        if n > 1:
            env.update({distributed.ENV_COORDINATOR: f"127.0.0.1:{port}", distributed.ENV_NUM_PROCESSES: str(n),
                        distributed.ENV_PROCESS_ID: str(i)})
        log = tmp / f"{name}.p{i}.log"
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), *args], env=env, stdout=log.open("w"),
                                      stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    pidfds = {p: os.pidfd_open(p.pid) for p in procs}  # readable once the process has exited
    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):  # one died: the others follow within a minute
                deadline = min(deadline, time.monotonic() + (60 if expect_killed else 0))
            left = deadline - time.monotonic()
            if left <= 0:
                break
            select.select([fd for p, fd in pidfds.items() if p.poll() is None], [], [], left)  # until one exits
    finally:
        for fd in pidfds.values():
            os.close(fd)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = [log.read_text() for log in logs]
    codes = [p.returncode for p in procs]
    ok = all(c < 0 for c in codes) if expect_killed else codes == [0] * n  # killed by a signal / exit 0
    assert ok, f"{name}: exit codes {codes}\n" + "\n".join(
        f"--- process {i}\n{t[-3000:]}" for i, t in enumerate(texts))
    return texts


def tensorboard_scalars(run_dir: Path) -> dict[tuple[int, str], float]:
    """{(step, tag): value} of the run's TensorBoard event files (TFRecord framing of Event protos)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for f in sorted((run_dir / "tensorboard").glob("events.*")):
        data, i = f.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            out.update({(event.step, v.tag): v.simple_value for v in event.summary.value})
    return out


def files_under(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny LM run (a tokenized dataset, STEPS steps, batch 8, an eval pass at the end): 1 process x 8
    devices straight; 2 processes x 4 devices killed while saving step KILL_AT, then resumed. Process 1 is given
    its own run_dir (the checkpoint dir is shared): whatever it wrote there would show."""
    tmp = tmp_path_factory.mktemp("distributed")
    data = write_dataset(tmp / "data", [24, 17, 40, 9, 31, 16])
    args = [*RUN_ARGS, f"data.sources={data}:1.0", f"data.eval_sources={data}:1.0", f"eval_every={STEPS}"]
    single = launch(tmp, "single", [["train", *args, f"run_dir={tmp / 'single'}"]], devices=8)

    def two(kill: bool) -> list[list[str]]:
        common = [*args, f"checkpoint.dir={tmp / 'two' / 'checkpoints'}"]
        pre = ["train", "--kill-at", str(KILL_AT)] if kill else ["train"]
        return [[*pre, *common, f"run_dir={tmp / 'two'}"], [*pre, *common, f"run_dir={tmp / 'two_p1'}"]]

    killed = launch(tmp, "killed", two(kill=True), devices=4, expect_killed=True)
    killed_files = {"p0": files_under(tmp / "two"), "p1": files_under(tmp / "two_p1")}
    resumed = launch(tmp, "resumed", two(kill=False), devices=4)
    return {"tmp": tmp, "logs": {"single": single, "killed": killed, "resumed": resumed},
            "killed_files": killed_files}


def test_each_process_logs_its_index_count_and_devices(runs):
    for i, text in enumerate(runs["logs"]["resumed"]):
        assert f"[p{i}/2] process {i} of 2 joined (config/env, coordinator 127.0.0.1:" in text
        assert "4 local cpu devices, 8 global" in text
    assert "joined" not in runs["logs"]["single"][0]  # one process: nothing to join
    assert "resumed from" in runs["logs"]["resumed"][0]


# 2 x 4 devices cannot be bitwise equal to 1 x 8: the gradient all-reduce across processes (gloo) adds the
# devices' partial sums in another order than the in-process reduction, a 1-ulp difference per reduction
# (measured here: losses within 1 ulp, params within 3e-6 after 4 AdamW steps at lr <= 1e-2, the largest in
# embedding rows of rare tokens, whose tiny gradients Adam divides by their own RMS). A resume defect (data
# position, optimizer moments, step / schedule) moves losses by >= 1e-3 and params by ~lr: far outside.
LOSS_RTOL, PARAM_ATOL = 1e-5, 1e-4


def test_two_processes_killed_and_resumed_train_like_one_uninterrupted_process(runs):
    tmp = runs["tmp"]
    single, two = tensorboard_scalars(tmp / "single"), tensorboard_scalars(tmp / "two")
    keys = sorted(k for k in single if k[1].endswith("loss") and k[0] >= KILL_AT)  # the steps after the resume
    assert len(keys) >= 2 * (STEPS - KILL_AT + 1) and all(k in two for k in keys)
    np.testing.assert_allclose([two[k] for k in keys], [single[k] for k in keys], rtol=LOSS_RTOL)
    from safetensors.numpy import load_file

    want, got = (load_file(tmp / run / "export" / "model.safetensors") for run in ("single", "two"))
    assert sorted(want) == sorted(got)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=PARAM_ATOL, err_msg=k)
    a, b = (json.loads((tmp / run / "report.json").read_text()) for run in ("single", "two"))
    assert (a["start_step"], b["start_step"], b["end_step"]) == (0, KILL_AT - 1, STEPS)
    assert b["final"]["loss"] == pytest.approx(a["final"]["loss"], rel=LOSS_RTOL)
    # eval: every process has the same number of batches (19 windows: 3 global batches of 8, the last padded)
    assert a["eval"]["step"] == b["eval"]["step"] == STEPS
    assert b["eval"]["loss"] == pytest.approx(a["eval"]["loss"], rel=LOSS_RTOL)


def test_only_process_zero_writes_reports_events_config_and_export(runs):
    tmp = runs["tmp"]
    assert runs["killed_files"]["p1"] == [] and files_under(tmp / "two_p1") == []
    killed0 = runs["killed_files"]["p0"]
    assert "config.json" in killed0 and "report.json" not in killed0  # killed before the end
    mine = files_under(tmp / "two")
    for f in ("config.json", "report.json", "report.md", "export/model.safetensors"):
        assert f in mine
    assert any(f.startswith("tensorboard/events.") for f in mine)
    ckpt = tmp / "two" / "checkpoints" / str(KILL_AT - 1) / "data_iter"  # the data positions of both processes
    assert sorted(p.name for p in ckpt.iterdir() if p.suffix == ".json") == [
        "process_0-of-2.json", "process_1-of-2.json"]


def test_processes_load_disjoint_windows_that_cover_every_epoch(tmp_path):
    lengths = [24, 17, 40, 9, 31, 16]  # windows of 8 frames: 3 + 3 + 5 + 2 + 4 + 2 = 19
    data = write_dataset(tmp_path / "data", lengths)
    args = ["tiny", f"data.sources={data}:1.0", "data.seq_frames=8", "data.batch_size=4"]
    epochs, W = 4, 19
    launch(tmp_path, "shards", [["shards", str(tmp_path / f"p{i}.json"), str(epochs), *args] for i in range(2)],
           devices=1, timeout=120)
    out = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
    assert [(o["process"], o["count"], o["windows"]) for o in out] == [(0, 2, W), (1, 2, W)]
    stream = np.array([out[p]["rows"][i] for i in range(len(out[0]["rows"])) for p in range(2)]).ravel()
    owner = np.array([p for _ in out[0]["rows"] for p in range(2) for _ in range(2)])
    for e in range(len(stream) // W):  # whole epochs of the global stream
        ids, who = stream[e * W:(e + 1) * W], owner[e * W:(e + 1) * W]
        assert sorted(ids.tolist()) == list(range(W))  # every window once per epoch
        assert set(ids[who == 0]).isdisjoint(ids[who == 1]) and len(set(ids[who == 0])) > 0
    cfg = DataConfig(sources=(DataSource(data),), seq_frames=8, batch_size=4)
    one = _take(pipeline.make_dataset(cfg, LM, True, process_index=0, process_count=1), len(out[0]["rows"]))
    one = np.concatenate([b["window"] for b in one])
    np.testing.assert_array_equal(stream, one)  # the same global stream as one process


def test_codec_training_runs_through_the_same_multi_process_path(tmp_path):
    """`moshi-jax train mimi_tiny` (the codec's own GAN steps on the shared loop) with 2 processes x 4 devices:
    both join, train and checkpoint cooperatively, only process 0 writes the report and the export. (That the
    codec pipeline's global batches do not depend on the process count is proven in tests/data/test_codec_audio.py,
    as the LM pipeline's is above.)"""
    import soundfile as sf

    from tests.training.test_mimi_training import MICRO

    rng = np.random.default_rng(0)
    data = tmp_path / "audio"
    data.mkdir()
    t = np.arange(1600) / 1600
    for i in range(4):  # 1 s clips at the micro codec's 1.6 kHz, two per process
        sf.write(data / f"clip{i}.wav", (0.3 * np.sin(2 * np.pi * rng.uniform(100, 600) * t)).astype(np.float32),
                 1600)
    args = ["train", "mimi_tiny", *MICRO, "steps=2", f"data.sources={data}", "metrics.tensorboard=true",
            f"checkpoint.dir={tmp_path / 'run' / 'checkpoints'}"]
    logs = launch(tmp_path, "codec", [[*args, f"run_dir={tmp_path / 'run'}"], [*args, f"run_dir={tmp_path / 'p1'}"]],
                  devices=4)
    for i, text in enumerate(logs):
        assert f"[p{i}/2] process {i} of 2 joined" in text
    mine = files_under(tmp_path / "run")
    for f in ("config.json", "report.json", "export/mimi.safetensors", "export/mimi.json"):
        assert f in mine
    assert not (tmp_path / "p1").exists() or files_under(tmp_path / "p1") == []
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["end_step"] == 2 and np.isfinite(report["final"]["loss"])
    ckpt = tmp_path / "run" / "checkpoints" / "2" / "data_iter"
    assert sorted(p.name for p in ckpt.iterdir() if p.suffix == ".json") == [
        "process_0-of-2.json", "process_1-of-2.json"]
