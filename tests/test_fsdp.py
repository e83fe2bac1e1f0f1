"""The fused loss gathers an FSDP-sharded lm_head correctly (2 CPU processes, gloo, torchrun).

accelerate runs multi-process CPU jobs as DDP only (its FSDP needs GPUs), so this drives
``torch.distributed.fsdp.fully_shard`` (FSDP2, what accelerate's ``fsdp_version: 2`` uses)
directly on the same loss entry points the training loop calls.
"""

import json
import os
import subprocess
import sys
from pathlib import Path


def test_fused_loss_on_fsdp2_sharded_student_matches_unsharded(tmp_path):
    out = tmp_path / "result.json"
    worker = Path(__file__).with_name("fsdp_worker.py")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(worker), str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["lm_head_was_sharded"], "the student's lm_head should be a sharded DTensor at rest"
    assert result["lm_head_in_loss_full"], "the loss must see the whole [vocab, hidden] lm_head"
    assert result["grad_norm"] > 1e-3
    assert result["max_grad_diff"] < 1e-6
    assert result["loss_diff"] < 1e-6
