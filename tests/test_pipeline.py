"""The streaming quantizer end to end: resumable byte-identical runs, clean interrupts, bad input.

Runs the real console script in subprocesses on a 4-layer random Llama so that
SIGKILL and SIGINT hit a real process at real points of its work.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from awq_plugin.config import AwqQuantConfig
from awq_plugin.errors import CalibrationError, CheckpointError, ConfigError, OutputExistsError, TemplateError
from awq_plugin.pipeline.quantize import QuantizeReport, quantize_checkpoint
from awq_plugin.tools import synthetic

CLI = str(Path(sys.executable).parent / "awq-plugin")
FAST = ["--scheme", "uint4_wo_64", "--n-samples", "8", "--seq-len", "64", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    config = synthetic.make_config(
        "tiny-llama", num_hidden_layers=4, hidden_size=128, intermediate_size=256, num_attention_heads=4
    )
    model = synthetic.make_model(config, seed=1, weight_std=1.0)
    return synthetic.write_model(tmp_path_factory.mktemp("src") / "tiny4", model, default_model_dir)


@pytest.fixture(scope="module")
def reference_timed(tmp_path_factory: pytest.TempPathFactory, source: Path) -> tuple[Path, float]:
    """An uninterrupted run's folder, and its working time: from the work dir's appearance
    (imports and model set-up done) to the output's (the rename that publishes it)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    command = [CLI, "quantize", str(source), str(out), *FAST]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/")
    while proc.poll() is None and not (_work_dir(out) / "progress.json").exists():
        time.sleep(0.005)
    started = time.monotonic()
    while proc.poll() is None and not out.exists():
        time.sleep(0.005)
    seconds = time.monotonic() - started
    _, stderr = proc.communicate()
    assert proc.returncode == 0, stderr.decode(errors="replace")
    return out, seconds


@pytest.fixture(scope="module")
def reference_run(reference_timed: tuple[Path, float]) -> Path:
    return reference_timed[0]


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _work_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}.awq-work")


def _wait_for_blocks(proc: subprocess.Popen, work: Path, blocks: int, timeout: float = 300) -> bool:
    """Wait until the run has finished ``blocks`` blocks; False if it ended first."""
    deadline = time.monotonic() + timeout
    progress = work / "progress.json"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if json.loads(progress.read_text()).get("done", 0) >= blocks:
                return True
        except (OSError, json.JSONDecodeError):
            pass
        time.sleep(0.02)
    raise TimeoutError(f"no progress to {blocks} blocks within {timeout} s")


def test_same_inputs_give_the_same_bytes(tmp_path: Path, source: Path, reference_run: Path) -> None:
    out = tmp_path / "again"
    subprocess.run([CLI, "quantize", str(source), str(out), *FAST], check=True, capture_output=True, cwd="/")
    assert _tree_bytes(out) == _tree_bytes(reference_run)
    assert (reference_run / "awq_plugin" / "awq_results.safetensors").is_file()


# One kill point in make test; the others (and the random ones below) in make test-all.
@pytest.mark.parametrize(
    "kill_after_blocks", [pytest.param(0, marks=pytest.mark.full), 1, pytest.param(3, marks=pytest.mark.full)]
)
def test_sigkill_then_rerun_is_byte_identical(
    tmp_path: Path, source: Path, reference_run: Path, kill_after_blocks: int
) -> None:
    out = tmp_path / "out"
    command = [CLI, "quantize", str(source), str(out), *FAST]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
    reached = _wait_for_blocks(proc, _work_dir(out), kill_after_blocks)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert reached, "the run finished before it could be killed"
    assert not out.exists(), "a killed run must not leave a (partial) output folder"
    rerun = subprocess.run(command, capture_output=True, text=True, cwd="/")
    assert rerun.returncode == 0, rerun.stderr
    if kill_after_blocks:
        assert f"resumed after block {kill_after_blocks - 1}" in rerun.stdout or "resumed" in rerun.stdout
    assert _tree_bytes(out) == _tree_bytes(reference_run)
    assert not _work_dir(out).exists()


def _stage(out: Path) -> str:
    """Where a run writing ``out`` is, judged from the files it leaves."""
    if out.exists():
        return "published"
    if any(out.parent.glob(f".{out.name}.tmp-*")):
        return "assembling"
    try:
        return f"{json.loads((_work_dir(out) / 'progress.json').read_text())['done']} blocks done"
    except (OSError, json.JSONDecodeError, KeyError):
        return "starting"


@pytest.mark.full  # a chain of kills at random points: make test-all
def test_sigkill_at_random_points_then_rerun_is_byte_identical(
    tmp_path: Path, source: Path, reference_timed: tuple[Path, float]
) -> None:
    """SIGKILL at seeded random moments of the work, again and again, resuming each time.

    Each attempt is killed a uniformly drawn time after it opens its work dir (start-up is
    skipped: nothing is written there), anywhere in what is left of an uninterrupted run's
    working time (scaled by the blocks left): calibration capture, the block loop or the
    assembly. The next attempt resumes from whatever the killed one left. Once an attempt is
    let through, the folder must equal the uninterrupted run's, byte for byte.

    The reference's time is one measurement on a shared machine: when a chain ends (an attempt
    finishes or publishes before its kill) with fewer than three kills, the time scale is
    halved and a new chain starts from nothing, so the kills land inside the work whatever
    the machine's speed.
    """
    reference, seconds = reference_timed
    out, progress = tmp_path / "out", _work_dir(tmp_path / "out") / "progress.json"
    command = [CLI, "quantize", str(source), str(out), *FAST]
    rng = random.Random(20261124)
    n_layers = 4
    for _chain in range(6):
        stages = _kill_chain(command, out, progress, rng, seconds, n_layers)
        print(f"time scale {seconds:.2f} s: killed {len(stages)} times at: {stages}")
        if len(stages) >= 3:
            break
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(_work_dir(out), ignore_errors=True)
        seconds /= 2
    assert len(stages) >= 3, stages
    if not out.exists():
        subprocess.run(command, check=True, capture_output=True, cwd="/")
    assert _tree_bytes(out) == _tree_bytes(reference)


def _kill_chain(
    command: list[str], out: Path, progress: Path, rng: random.Random, seconds: float, n_layers: int
) -> list[str]:
    """Start, kill at a random moment, resume, ... until an attempt ends by itself or publishes.

    Returns where each kill landed (``_stage``); a kill after the output was published ends
    the chain and is not counted.
    """
    stages: list[str] = []
    for _ in range(8):
        try:
            done = json.loads(progress.read_text())["done"]
        except OSError:
            done = 0
        remaining = seconds * (n_layers + 1 - done) / (n_layers + 1)  # blocks left + capture/assembly
        launched = time.time()
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
        while proc.poll() is None and not (progress.exists() and progress.stat().st_mtime >= launched):
            time.sleep(0.005)
        try:
            proc.wait(timeout=rng.uniform(0.0, 1.0) * remaining)
        except subprocess.TimeoutExpired:
            stage = _stage(out)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            if out.exists():  # killed after the rename that published the output: it is complete
                return stages
            stages.append(stage)
            continue
        assert proc.returncode == 0
        return stages  # the resumed remainder finished before its kill time
    return stages


@pytest.mark.parametrize("write", ["save_result", "save_block", "save_hidden", "mark_done"])
def test_interrupt_between_state_writes_then_rerun_is_byte_identical(
    tmp_path: Path, source: Path, reference_run: Path, monkeypatch, write: str
) -> None:
    """A run stopped right after any one of block 1's state writes resumes to the same bytes.

    Each finished block writes its result, packed tensors, the next block's inputs and the
    progress marker, one file at a time; a kill can fall between any two of them. The stop
    is an exception raised right after the chosen write (in-process, same threads and
    options as the CLI runs it).
    """
    import awq_plugin.pipeline.quantize as pipeline

    torch.set_num_threads(1)
    real = getattr(pipeline.WorkDir, write)

    def stop_after_block_1(self, *args, **kwargs):
        real(self, *args, **kwargs)
        index = args[0].layer_index if write == "save_result" else args[0] - (write != "save_block")
        if index == 1:
            raise KeyboardInterrupt

    out = tmp_path / "out"
    run = dict(n_samples=8, seq_len=64)
    with monkeypatch.context() as patch:
        patch.setattr(pipeline.WorkDir, write, stop_after_block_1)
        with pytest.raises(KeyboardInterrupt):
            _quantize(source, out, **run)
    assert not out.exists() and _work_dir(out).exists()
    _quantize(source, out, **run)
    assert _tree_bytes(out) == _tree_bytes(reference_run)


@pytest.fixture(scope="module")
def long_source(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    """Like ``source`` with 16 layers: an interrupt after block 1 lands well before the end,
    even when a loaded machine delays this test's polling by seconds."""
    config = synthetic.make_config(
        "tiny-llama", num_hidden_layers=16, hidden_size=128, intermediate_size=256, num_attention_heads=4
    )
    model = synthetic.make_model(config, seed=1, weight_std=1.0)
    return synthetic.write_model(tmp_path_factory.mktemp("src") / "tiny16", model, default_model_dir)


def test_sigint_stops_cleanly_with_a_message(tmp_path: Path, long_source: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [CLI, "quantize", str(long_source), str(out), *FAST],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd="/",
        # Ctrl-C as a terminal delivers it, however the suite was started: a background job of a
        # non-interactive shell inherits SIGINT ignored, and Python then never raises on it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert _wait_for_blocks(proc, _work_dir(out), 1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr.decode(errors="replace")[-2000:]
    assert b"interrupted" in stderr and b"resume" in stderr
    assert not out.exists()


# ---- bad input: a clear error and nothing written --------------------------------------------


def _quantize(source: Path, out: Path, **kwargs) -> QuantizeReport:
    kwargs.setdefault("n_samples", 4)
    kwargs.setdefault("seq_len", 64)
    return quantize_checkpoint(source, out, AwqQuantConfig(bits=4, group_size=64), progress=False, **kwargs)


def _no_leftovers(parent: Path, out: Path, resumable: bool = False) -> None:
    """No output and no staging folder. The resume state stays only after an OS error (a full
    disk: free space, rerun, resume); bad input fails the same way again, so it is removed."""
    assert not out.exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]
    assert _work_dir(out).exists() == resumable


def test_existing_model_is_refused_without_overwrite(
    tmp_path: Path, source: Path, reference_run: Path
) -> None:
    before = _tree_bytes(reference_run)
    with pytest.raises(OutputExistsError, match="already holds a model; pass --overwrite"):
        _quantize(source, reference_run)
    assert _tree_bytes(reference_run) == before
    proc = subprocess.run(
        [CLI, "quantize", str(source), str(reference_run), *FAST], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "--overwrite" in proc.stderr


def test_read_only_location_is_refused_before_work(tmp_path: Path, source: Path, monkeypatch) -> None:
    # CI runs as root, for whom permission bits do not bind, so the unwritable parent is
    # simulated through os.access, which is what the check consults.
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode)
    )
    with pytest.raises(PermissionError, match=f"parent directory {tmp_path} is not writable"):
        _quantize(source, tmp_path / "out")
    _no_leftovers(tmp_path, tmp_path / "out")


def test_disk_full_during_write_leaves_nothing(tmp_path: Path, source: Path, monkeypatch) -> None:
    import awq_plugin.format.checkpoint as checkpoint

    real_write = checkpoint.write_safetensors

    def full_disk(*args, **kwargs):
        real_write(*args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_safetensors", full_disk)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        _quantize(source, out, method="rtn")
    _no_leftovers(tmp_path, out, resumable=True)


def test_nan_weight_is_named(tmp_path: Path, source: Path) -> None:
    broken = Path(shutil.copytree(source, tmp_path / "nan-src"))
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.2.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.up_proj\.weight contains NaN or Inf"):
        _quantize(broken, out, method="rtn")
    _no_leftovers(tmp_path, out)


def test_inf_in_embeddings_is_named(tmp_path: Path, source: Path) -> None:
    broken = Path(shutil.copytree(source, tmp_path / "inf-src"))
    tensors = load_file(broken / "model.safetensors")
    tensors["model.embed_tokens.weight"][7, 0] = float("inf")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.embed_tokens\.weight contains NaN or Inf"):
        _quantize(broken, tmp_path / "out")
    _no_leftovers(tmp_path, tmp_path / "out")


def test_nan_in_output_head_is_named(tmp_path: Path, source: Path) -> None:
    """The head is read only while assembling, and still checked there."""
    broken = Path(shutil.copytree(source, tmp_path / "nan-head-src"))
    tensors = load_file(broken / "model.safetensors")
    tensors["lm_head.weight"][3, 1] = float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"lm_head\.weight contains NaN or Inf"):
        _quantize(broken, out, method="rtn")
    _no_leftovers(tmp_path, out)


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_activations_overflowing_to_inf_are_named(tmp_path: Path, source: Path, method: str) -> None:
    """Every weight finite (fp32), yet layer 1's MLP overflows: gate and up outputs near 1e20 each."""
    broken = Path(shutil.copytree(source, tmp_path / "overflow-src"))
    tensors = {k: v.float() for k, v in load_file(broken / "model.safetensors").items()}
    tensors["model.layers.1.post_attention_layernorm.weight"] *= 1e20
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(CalibrationError, match=r"calibration activations became NaN or Inf .* layer 1"):
        _quantize(broken, out, method=method)
    _no_leftovers(tmp_path, out)


def test_weights_beyond_float16_are_named(tmp_path: Path, source: Path) -> None:
    """fp32 weights whose quantization scales overflow the format's float16 (max 65504)."""
    broken = Path(shutil.copytree(source, tmp_path / "big-src"))
    tensors = {k: v.float() for k, v in load_file(broken / "model.safetensors").items()}
    tensors["model.layers.1.mlp.down_proj.weight"] *= 1e30  # activations stay finite (~1e31)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.scales overflows float16"):
        _quantize(broken, out, method="rtn")
    _no_leftovers(tmp_path, out)


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_blocks_run_without_embeddings_or_head_in_memory(
    tmp_path: Path, source: Path, monkeypatch, method: str
) -> None:
    """Memory bound: during the block loop no non-layer weight is held, and the head is read
    after the last block (by AWQ's end-to-end guard, then by the assembly)."""
    import awq_plugin.pipeline.quantize as pipeline

    reads: list[str] = []
    real_get, real_load_block = pipeline.SafetensorsReader.get, pipeline.load_block

    def recording_get(self, name: str, *args, **kwargs) -> torch.Tensor:
        reads.append(name)
        return real_get(self, name, *args, **kwargs)

    def checking_load_block(model, resolved, i, reader, device="cpu"):
        held = [
            n
            for n, p in model.named_parameters()
            if not n.startswith(resolved.decoder_layers + ".") and p.device.type != "meta"
        ]
        assert not held, f"block {i} loaded while {held} are in memory"
        reads.append(f"<block {i}>")
        return real_load_block(model, resolved, i, reader, device)

    monkeypatch.setattr(pipeline.SafetensorsReader, "get", recording_get)
    monkeypatch.setattr(pipeline, "load_block", checking_load_block)
    report = _quantize(source, tmp_path / "out", method=method)
    head_reads = [k for k, name in enumerate(reads) if name == "lm_head.weight"]
    assert len(head_reads) == (1 if method == "rtn" else 2)  # the guard's tail, then the assembly
    assert min(head_reads) > reads.index("<block 3>")
    assert (report.guard is not None) == (method == "awq")


@pytest.mark.parametrize(
    ("calib", "message"),
    [
        ([], "holds no text"),
        (["   ", "\n"], "holds no text"),
        (["just a few words"], r"gives only 0 windows of 64 tokens, fewer than the 4 samples"),
    ],
)
def test_empty_or_short_calibration_text(tmp_path: Path, source: Path, calib, message: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(CalibrationError, match=message):
        _quantize(source, out, calib=calib)
    _no_leftovers(tmp_path, out)


def test_missing_calibration_file(tmp_path: Path, source: Path) -> None:
    with pytest.raises(CalibrationError, match="neither a built-in set"):
        _quantize(source, tmp_path / "out", calib=str(tmp_path / "nope.txt"))
    _no_leftovers(tmp_path, tmp_path / "out")


def test_template_naming_a_missing_module(tmp_path: Path, source: Path) -> None:
    from awq_plugin.templates import load_shipped_templates

    template = json.loads(json.dumps(load_shipped_templates()["llama"]))
    template["scaling_layers"][0]["layers"][0] = "self_attn.q_projj"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(template))
    with pytest.raises(TemplateError, match=r"self_attn\.q_projj.*close matches.*self_attn\.q_proj"):
        _quantize(source, tmp_path / "out", template=str(path))
    _no_leftovers(tmp_path, tmp_path / "out")


def test_unknown_scheme_and_unpackable_bits_via_cli(tmp_path: Path, source: Path) -> None:
    for scheme, message in (
        ("uint4_wo_48x", "unknown scheme"),
        ("uint3_wo_64", "'bits' = 3: bits=3 cannot be packed"),
    ):
        proc = subprocess.run(
            [CLI, "quantize", str(source), str(tmp_path / "o"), "--scheme", scheme],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()


def test_group_size_not_dividing_k(tmp_path: Path, default_model_dir: Path) -> None:
    config = synthetic.make_config("tiny-llama", hidden_size=96, intermediate_size=192, num_attention_heads=4)
    model = synthetic.make_model(config, seed=0)
    src = synthetic.write_model(tmp_path / "k96", model, default_model_dir)
    with pytest.raises(ValueError, match="in_features=96, not a multiple of group_size=64"):
        _quantize(src, tmp_path / "out", method="rtn")
    _no_leftovers(tmp_path, tmp_path / "out")


def test_already_quantized_source_is_refused(tmp_path: Path, reference_run: Path) -> None:
    with pytest.raises(ConfigError, match="already quantized"):
        _quantize(reference_run, tmp_path / "out")
    _no_leftovers(tmp_path, tmp_path / "out")


def test_rtn_pipeline_matches_reference_math(tmp_path: Path, source: Path) -> None:
    from awq_plugin.numerics import quant_ref
    from awq_plugin.runtime import modeling

    out = tmp_path / "rtn"
    _quantize(source, out, method="rtn")
    quantized = modeling.load_awq_model(out, backend="reference")
    fp = modeling.load_fp_model(source)
    name = "model.layers.1.mlp.down_proj"
    expected = quant_ref.fake_quantize(fp.get_submodule(name).weight.float(), 4, 64)
    assert torch.equal(quantized.get_submodule(name).dequantized_weight(), expected)


def test_report_marks_the_blocks_that_did_not_keep_awq() -> None:
    from awq_plugin.pipeline.quantize import QuantizeReport

    blocks = [
        {"layer": 0, "mse_rtn": 2.0, "mse_awq": 1.0, "choice": "awq"},
        {"layer": 1, "mse_rtn": 2.0, "mse_awq": 2.0, "choice": "rounding"},
    ]
    report = QuantizeReport("out", "awq", "uint4_wo_64", 1.0, 1, 2, 1, 4, 64, 1, 0, blocks=blocks)
    lines = report.render().splitlines()
    (first,) = [line for line in lines if line.lstrip().startswith("layer   0")]
    (second,) = [line for line in lines if line.lstrip().startswith("layer   1")]
    assert "(" not in first and "AWQ lost" in second


def test_a_run_fit_to_the_model_resumes_with_both_streams(tmp_path: Path, source: Path, monkeypatch) -> None:
    """``fit_to="model"`` carries the full-precision model's hidden states beside the quantized
    ones; a run stopped after block 1's inputs were saved resumes from both to the same bytes
    (and a resume that lost the full-precision stream would not: the check can fail)."""
    import awq_plugin.pipeline.quantize as pipeline
    from awq_plugin.algorithm.options import AwqOptions

    torch.set_num_threads(1)
    run = dict(n_samples=16, options=AwqOptions(fit_to="model", search_tokens=256))
    whole = tmp_path / "whole"
    _quantize(source, whole, **run)
    real = pipeline.WorkDir.save_hidden
    streams = []

    def stop_after_block_1(self, next_layer, hidden, extra=None, reference=None):
        real(self, next_layer, hidden, extra, reference)
        streams.append(reference is not None)
        if next_layer == 2:
            raise KeyboardInterrupt

    for lose_the_stream in (False, True):
        out = tmp_path / f"out-{lose_the_stream}"
        with monkeypatch.context() as patch:
            patch.setattr(pipeline.WorkDir, "save_hidden", stop_after_block_1)
            with pytest.raises(KeyboardInterrupt):
                _quantize(source, out, **run)
        assert streams == [True, True]
        streams.clear()
        with monkeypatch.context() as patch:
            if lose_the_stream:
                patch.setattr(pipeline.WorkDir, "load_reference", lambda self, *args: None)
            _quantize(source, out, **run)
        assert (_tree_bytes(out) == _tree_bytes(whole)) != lose_the_stream
