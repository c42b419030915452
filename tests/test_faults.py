"""A process killed (SIGKILL) while it writes a checkpoint leaves the previous checkpoint whole and loadable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

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
