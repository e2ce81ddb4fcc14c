"""Checkpoints: which directory --resume picks."""

from __future__ import annotations

import pytest

from rmt_scale.training import checkpoint


def test_resume_names_a_complete_checkpoint(tmp_path):
    assert checkpoint.find(tmp_path, "auto") is None  # nothing yet: start fresh
    (tmp_path / "checkpoints" / ".tmp-step000004").mkdir(parents=True)  # a save killed half-way
    with pytest.raises(ValueError, match="is not a complete checkpoint"):
        checkpoint.find(tmp_path, ".tmp-step000004")
    done = tmp_path / "checkpoints" / "step000002"
    done.mkdir()
    (done / "trainer_state_rank0.pt").write_bytes(b"")
    (tmp_path / "checkpoints" / "latest").write_text("step000002")
    assert checkpoint.find(tmp_path, "auto") == done
    assert checkpoint.find(tmp_path, "step000002") == done
    assert checkpoint.find(tmp_path, str(done)) == done
