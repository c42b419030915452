"""Faults: a process killed (SIGKILL) while it writes a checkpoint leaves the previous checkpoint whole and loadable;
a training run killed mid-epoch and resumed with ``--ckpt_path last`` ends where the uninterrupted run ends, with the
same metrics history."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # kills real processes: run by .ci/run, not in the fast tier

ROOT = Path(__file__).resolve().parents[1]

WRITER = textwrap.dedent("""
    import sys, torch, lightning as L
    from xmc_dst.sparse import FixedFanInLinear

    class Big(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.head = FixedFanInLinear(256, 200_000, 64)  # ~50 MB weights + 50 MB indices

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(Big())
    trainer.strategy.setup_environment()
    path = sys.argv[1]
    version = 0
    while True:
        version += 1
        with torch.no_grad():
            trainer.lightning_module.head.weight.fill_(float(version))
        trainer.save_checkpoint(path)
        print(version, flush=True)
""")


def test_kill_during_checkpoint_save_leaves_previous_checkpoint_loadable(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        saved = [int(proc.stdout.readline()) for _ in range(2)]  # two complete saves
        time.sleep(0.15)  # well inside the next save (each writes ~100 MB)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    weight = checkpoint["state_dict"]["head.weight"]
    # whole, and one of the versions that was written completely (never a mix of two)
    assert weight.shape == (200_000, 64)
    version = float(weight[0, 0])
    assert version >= saved[-1] and torch.all(weight == version)
    assert checkpoint["state_dict"]["head.indices"].shape == (200_000, 64)


# ---------------------------------------------------------------------------------------------- kill and resume

DST_FRAGMENT = """
trainer:
  callbacks:
    - class_path: callbacks.DynamicSparseTraining
      init_args: {interval: 25, end: 1.0, threshold: 0.02}
"""
STEPS_PER_EPOCH = 77  # Bibtex: 4,880 training documents (none held out), batch 64


def xmc_dst_fit(tmp_path: Path, logs: Path, *extra: str) -> subprocess.Popen:
    """``python -m xmc_dst fit`` on the shipped Bibtex with dynamic sparse training, 2 epochs, last.ckpt every 30
    steps (never at an epoch end: no multiple of 30 below 154 is one of 77)."""
    fragment = tmp_path / "dst.yaml"
    fragment.write_text(DST_FRAGMENT, encoding="utf-8")
    args = [sys.executable, "-m", "xmc_dst", "fit", "--config", str(ROOT / "configs" / "bibtex.yaml"),
            "--config", str(fragment), "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
            "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.logger.init_args.save_dir", str(logs), "--last_checkpoint.every_n_train_steps", "30", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def final_test_metrics(version_dir: Path) -> dict[str, str]:
    """The test metrics row of a run's metrics.csv (written once, by the test after fit)."""
    with (version_dir / "metrics.csv").open() as f:
        rows = [row for row in csv.DictReader(f) if row.get("test/P@1")]
    assert len(rows) == 1
    return {key: value for key, value in rows[0].items() if key.startswith("test/")}


def test_killed_cli_run_resumes_with_ckpt_path_last_to_the_same_result(tmp_path: Path) -> None:
    straight = xmc_dst_fit(tmp_path, tmp_path / "straight")  # uninterrupted, alongside the killed one
    killed = xmc_dst_fit(tmp_path, tmp_path / "killed")
    version = tmp_path / "killed" / "bibtex" / "version_0"
    last = version / "checkpoints" / "last.ckpt"
    try:
        deadline = time.monotonic() + 120
        while not last.exists() and killed.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        killed.send_signal(signal.SIGKILL)
        output = killed.communicate(timeout=30)[0]
        assert killed.returncode == -signal.SIGKILL, output[-3000:]  # died, did not finish
        straight_output = straight.communicate(timeout=300)[0]
        assert straight.returncode == 0, straight_output[-3000:]
    finally:
        for proc in (straight, killed):
            if proc.poll() is None:
                proc.kill()
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    step = checkpoint["global_step"]
    assert step % 30 == 0 and step % STEPS_PER_EPOCH != 0  # mid-epoch
    loader = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader["batches"] == step % STEPS_PER_EPOCH and loader["length"] == STEPS_PER_EPOCH
    assert "RandomStateCheckpoint" in checkpoint["callbacks"] and "DynamicSparseTraining" in checkpoint["callbacks"]

    resumed = xmc_dst_fit(tmp_path, tmp_path / "killed", "--ckpt_path", "last")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert f"Restoring states from the checkpoint path at {last}" in output
    assert not (version.parent / "version_1").exists()  # continued in the killed run's directory
    expected = final_test_metrics(tmp_path / "straight" / "bibtex" / "version_0")
    assert "test/P@1" in expected and "test/PSP@5" in expected
    assert final_test_metrics(version) == expected  # every test metric, to the last digit logged
    # and the whole history: the killed run's rows up to its checkpoint, then the resumed run's, none twice (before
    # the fix the CSV logger deleted the killed run's rows on resume)
    def history(folder: Path) -> list[dict[str, str]]:  # wall-clock timings differ between any two runs
        with (folder / "metrics.csv").open() as f:
            return [{k: v for k, v in row.items() if not k.endswith("_seconds")} for row in csv.DictReader(f)]

    assert history(version) == history(tmp_path / "straight" / "bibtex" / "version_0")
    assert (version / "config.yaml").is_file() and (version / "config.resumed-1.yaml").is_file()
