"""Mimi (codec) training on the shared loop: the sharded GAN step equals the single-device step, kill and
resume equals the uninterrupted run, the export loads in the reference and decodes the same audio, and the
codec / tokenize commands use it."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moshi_jax.training import config as config_lib
from moshi_jax.training import train_mimi
from moshi_jax.training.mesh import make_mesh

# A micro Mimi (2 SEANet stages, 1.6 kHz, 100 Hz code frames of 16 samples) so the GAN step compiles fast.
MICRO = ["model.preset=tiny", "model.sample_rate=1600", "model.ratios=4,2", "model.frame_rate=100",
         "model.num_layers=1", "model.n_q=3", "model.num_codebooks=3", "model.bins=16",
         "data.seq_frames=4", "data.batch_size=8", "codec.disc_scales=32", "codec.disc_filters=4",
         "codec.mel_scales=32", "codec.n_mels=8", "codec.teacher_dim=8", "codec.kmeans_iters=3",
         "codec.dead_code_every=2", "codec.mel_weight=1", "codec.l1_weight=0.1", "compute_dtype=float32",
         "mesh.data=2", "mesh.fsdp=4", "metrics.progress_bar=false", "metrics.tensorboard=false",
         "metrics.log_every=1", "checkpoint.every=1",
         "checkpoint.async_save=false"]


def micro_config(*extra: str):
    return config_lib.load_config("mimi_tiny", MICRO + list(extra))


def _steps(cfg, mesh):
    mcfg = config_lib.build_mimi_config(cfg)
    return train_mimi.CodecSteps(cfg, mcfg, mesh, train_mimi.codec_rules(cfg), train_mimi.codec_batch_shardings(mesh))


def _batch(cfg, seed):
    mcfg = config_lib.build_mimi_config(cfg)
    rng = np.random.default_rng(seed)
    B, F = cfg.data.batch_size, cfg.data.seq_frames
    t = np.arange(F * mcfg.frame_size) / mcfg.sample_rate
    wav = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 600, (B, 1, 1)) * t) + 0.05 * rng.standard_normal((B, 1, len(t)))
    return {"wav": wav.astype(np.float32),
            "teacher": rng.standard_normal((B, F, cfg.codec.teacher_dim)).astype(np.float32)}


def _run(steps, n):
    state, frozen = steps.init()
    history = []
    for i in range(n):
        batch = jax.tree.map(jnp.asarray, _batch(steps.cfg, i))
        batch = {k: jax.device_put(v, steps.mesh and s) for (k, v), s in
                 zip(batch.items(), train_mimi.codec_batch_shardings(steps.mesh).values(), strict=True)}
        state, m = steps.train(state, batch, frozen)
        history.append(jax.device_get(m))
    return jax.device_get(state), history


def test_sharded_gan_step_equals_the_single_device_step():
    """3 steps (k-means init of both levels, a dead-code check, quantizer dropout, bypass, both optimizers) on a
    (data 2, fsdp 4) mesh of 8 devices and on 1 device give the same metrics and state."""
    cfg = micro_config("codec.q_dropout=true", "codec.no_quantization_rate=0.5", "steps=3")  # = the loop runs
    one, h1 = _run(_steps(cfg, make_mesh((1, 1, 1), devices=jax.devices()[:1])), 3)
    eight, h8 = _run(_steps(cfg, make_mesh((2, 4, 1))), 3)
    assert jax.device_count() == 8
    for a, b in zip(h1, h8, strict=True):
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=2e-4, atol=1e-5, err_msg=k)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(one), jax.tree.leaves(eight), strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=2e-3, atol=2e-5,
                                   err_msg=jax.tree_util.keystr(path))
    assert float(h1[-1]["semantic_initialized"]) == 1.0  # the codebook machinery really ran
    assert np.asarray(one.vq["acoustic"].initialized).sum() >= 1


@pytest.fixture(scope="module")
def codec_data(tmp_path_factory):
    from moshi_jax.data import codec_audio

    return codec_audio.build_codec_dataset(tmp_path_factory.mktemp("codec_data"), sentences=2)


def _loop_config(run_dir, data_root, steps, *extra):
    return micro_config(f"run_dir={run_dir}", f"steps={steps}", f"data.sources={data_root}/train",
                        f"data.eval_sources={data_root}/heldout", "eval_every=0", *extra)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, codec_data):
    run_dir = tmp_path_factory.mktemp("mimi_straight")
    report = train_mimi.run(_loop_config(run_dir, codec_data, 3))
    return run_dir, report


def _final_state(run_dir, cfg):
    from moshi_jax.training.checkpointing import Checkpointer

    steps = _steps(cfg, make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    with Checkpointer(Path(run_dir) / "checkpoints") as ckpt:
        return jax.device_get(ckpt.restore(ckpt.latest_step(), steps.abstract_state))


def test_kill_and_resume_equals_the_uninterrupted_run(straight_run, codec_data, tmp_path):
    straight_dir, straight = straight_run
    cfg = _loop_config(tmp_path, codec_data, 3)
    mcfg = config_lib.build_mimi_config(cfg)
    from moshi_jax.training.loop import train_loop

    program = train_mimi.mimi_program(cfg, mcfg)
    killed = train_loop(cfg, program, make_mesh((2, 4, 1)), train_mimi.codec_rules(cfg), stop_after=1)
    # (the same mesh as the runs: every run here shares one compiled step)
    assert killed["end_step"] == 1
    resumed = train_mimi.run(cfg)  # a fresh program and steps: restores the state and the data position
    assert resumed["start_step"] == 1 and resumed["end_step"] == 3
    for k in ("loss", "d_loss", "commit_loss", "distill_loss"):
        np.testing.assert_allclose(resumed["final"][k], straight["final"][k], rtol=1e-4, err_msg=k)
    a, b = _final_state(straight_dir, cfg), _final_state(tmp_path, cfg)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))


def test_export_is_loaded_by_the_reference_and_decodes_the_same_audio(straight_run):
    torch = pytest.importorskip("torch")
    from moshi.models import loaders

    from moshi_jax.mimi import checkpoint as mimi_ckpt
    from moshi_jax.mimi.model import MimiCodec

    run_dir, report = straight_run
    weights = Path(run_dir) / "export" / "mimi.safetensors"
    assert str(weights) in report["export"]
    ref_cfg = json.loads((Path(run_dir) / "export" / "mimi.json").read_text())
    mcfg = mimi_ckpt.config_beside(weights)
    assert mcfg == config_lib.build_mimi_config(micro_config())
    ref = loaders.get_mimi(str(weights), mimi_config=ref_cfg, num_codebooks=3).eval()
    codec = MimiCodec(mcfg)
    params = mimi_ckpt.load_reference(weights, mcfg)
    codes = np.random.default_rng(0).integers(0, mcfg.bins, (2, 3, 5)).astype(np.int32)
    ours = np.asarray(codec.decode(params, codes))
    with torch.no_grad():
        theirs = ref.decode(torch.from_numpy(codes.astype(np.int64))).numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=1e-4)
    wav = _batch(micro_config(), 0)["wav"][:2]
    with torch.no_grad():
        ref_codes = ref.encode(torch.from_numpy(wav)).numpy()
    np.testing.assert_array_equal(np.asarray(codec.encode(params, wav, 3)), ref_codes)


def test_codec_cli_reads_the_trained_codec_and_its_config(straight_run, tmp_path):
    from moshi_jax.audio import load_audio, save_audio
    from moshi_jax.cli import main

    run_dir, _ = straight_run
    weights = Path(run_dir) / "export" / "mimi.safetensors"
    src = tmp_path / "in.wav"
    save_audio(src, _batch(micro_config(), 1)["wav"][0, 0], 1600)
    out = tmp_path / "out.wav"
    assert main(["codec", "roundtrip", str(src), "-o", str(out), "--weights", str(weights)]) in (0, None)
    assert load_audio(out, 1600).shape[1] == 64


def test_tokenize_job_loads_the_trained_codec_with_its_config(straight_run):
    from moshi_jax.data import tokenize

    run_dir, _ = straight_run
    codec, params, desc = tokenize.load_mimi(Path(run_dir) / "export" / "mimi.safetensors")
    assert codec.cfg == config_lib.build_mimi_config(micro_config()) and not desc["random"]
    codes = codec.encode(params, _batch(micro_config(), 2)["wav"][:1], 3)
    assert codes.shape == (1, 3, 4)


def test_mimi_program_rejects_bad_codec_settings():
    with pytest.raises(config_lib.ConfigError, match="codec.adversarial"):
        micro_config("codec.adversarial=wgan")
    with pytest.raises(config_lib.ConfigError, match="MimiConfig"):
        micro_config("model.sample_rate=1000")
    with pytest.raises(config_lib.ConfigError, match="every loss on the audio"):
        train_mimi.loss_weights(micro_config("codec.adv_weight=0", "codec.feat_weight=0", "codec.mel_weight=0",
                                             "codec.l1_weight=0").codec)


def test_export_command_writes_the_chosen_step_like_the_end_of_run_export(straight_run, tmp_path):
    """`moshi-jax export` of a codec run (its program kind picks the Mimi exporter): the last step equals the
    export the loop wrote at the end of the run."""
    from safetensors.numpy import load_file

    from moshi_jax.training.export import ExportError, ExportRequest, export_run

    run_dir, _ = straight_run
    result = export_run(ExportRequest(run_dir=Path(run_dir), out_dir=tmp_path / "out", progress=False))
    assert result.kind == "mimi" and result.step == 3
    got, want = load_file(str(tmp_path / "out" / "mimi.safetensors")), load_file(
        str(Path(run_dir) / "export" / "mimi.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    assert json.loads((tmp_path / "out" / "mimi.json").read_text()) == json.loads(
        (Path(run_dir) / "export" / "mimi.json").read_text())
    with pytest.raises(ExportError, match="no LoRA adapter"):
        export_run(ExportRequest(run_dir=Path(run_dir), out_dir=tmp_path / "o2", lora_only=True))


def test_a_non_finite_gan_step_keeps_the_state_and_reports_it():
    """The loop's NaN policy holds for the codec's own step: a NaN batch leaves every tree as it was."""
    cfg = micro_config("steps=1")
    steps = _steps(cfg, make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    state, _ = steps.init()
    before = jax.device_get(state)
    batch = _batch(cfg, 0)
    batch["wav"] = np.full_like(batch["wav"], np.nan)
    shardings = train_mimi.codec_batch_shardings(steps.mesh)
    new, metrics = steps.train(state, {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}, {})
    assert float(metrics["nonfinite"]) == 1.0
    after = jax.device_get(new)
    assert int(after.step) == int(before.step) + 1
    for a, b in zip(jax.tree.leaves(after.gen), jax.tree.leaves(before.gen), strict=True):
        np.testing.assert_array_equal(a, b)


def test_signal_init_makes_a_fresh_decoder_output_depend_on_its_latent():
    """Under the modules' PyTorch-default init a fresh mimi_tiny decoder's output is its biases' (the latent moves
    it by ~1e-3 of its size), so training starts with no signal path; `codec.init=signal` (the default) redraws
    the conv kernels with unit variance gain (Var = 1 / fan_in) and zero biases, and the output is the latent's."""
    from flax import traverse_util

    from moshi_jax.mimi.model import MimiModule, host_init

    cfg = config_lib.load_config("mimi_tiny")
    assert cfg.codec.init == "signal"
    mcfg = config_lib.build_mimi_config(cfg)
    module = MimiModule(mcfg)
    latent = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, mcfg.dimension)), jnp.float32)
    reference = host_init(mcfg, jax.random.PRNGKey(0))
    signal = train_mimi.signal_preserving_init(reference, mcfg, seed=0)

    def latent_share(params):
        y = module.apply({"params": params}, latent, None, method=MimiModule.decode_latent)[0]
        y0 = module.apply({"params": params}, jnp.zeros_like(latent), None, method=MimiModule.decode_latent)[0]
        return float(jnp.std(y - y0) / jnp.std(y))

    assert latent_share(reference) < 0.05
    assert latent_share(signal) > 0.99
    flat = traverse_util.flatten_dict(signal)
    assert not flat[("decoder", "conv_in", "bias")].any()
    kernel = np.asarray(flat[("encoder", "down_3", "kernel")])  # [K, C_in, C_out]: fan_in K * C_in
    assert np.var(kernel) == pytest.approx(1 / (kernel.shape[0] * kernel.shape[1]), rel=0.1)
    up = np.asarray(flat[("decoder", "up_0", "kernel")])  # transposed [C_in, K, C_out]: fan_in C_in * K / stride
    assert np.var(up) == pytest.approx(1 / (up.shape[0] * up.shape[1] / mcfg.ratios[0]), rel=0.1)
    untouched = traverse_util.flatten_dict(reference)
    for path, value in flat.items():  # transformers keep their init
        if "transformer" in path[0]:
            np.testing.assert_array_equal(value, untouched[path])
    with pytest.raises(config_lib.ConfigError, match="codec.init"):
        micro_config("codec.init=xavier")


def test_the_codec_output_is_aligned_with_its_input_no_latency_beyond_the_frame():
    """Held-out SI-SNR compares the output with the input sample by sample, so the codec must not delay it: a
    change of the input inside code frame n changes the output from frame n on (not before: causal; not only
    later: no extra latency to align away)."""
    from moshi_jax.mimi.model import MimiModule, host_init

    cfg = micro_config()
    mcfg = config_lib.build_mimi_config(cfg)
    module = MimiModule(mcfg)
    params = train_mimi.signal_preserving_init(host_init(mcfg, jax.random.PRNGKey(0)), mcfg, seed=0)
    N = mcfg.frame_size
    wav = jnp.asarray(np.random.default_rng(0).standard_normal((1, 6 * N, 1)), jnp.float32)

    def roundtrip(x):
        latent = module.apply({"params": params}, x, None, method=MimiModule.encode_latent)[0]
        return np.asarray(module.apply({"params": params}, latent, None, method=MimiModule.decode_latent)[0])[0, :, 0]

    base = roundtrip(wav)
    n = 3
    changed = np.abs(roundtrip(wav.at[0, n * N + N - 1, 0].add(1.0)) - base) > 1e-6  # last sample of frame n
    assert not changed[: n * N].any()
    assert changed[n * N:(n + 1) * N].any()
