"""``backprop="sublinear"``: replay that keeps every k-th segment's state. Exact against ``bptt`` with dropout on,
on every decoder family, for RMT and ARMT; bounded in the states it keeps; offloaded states give the same
gradients; segments outside the truncated gradient without labels keep nothing."""

from __future__ import annotations

import gc
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import transformers

from rmt_scale import ARMTConfig, RecurrentMemoryModel, RMTConfig
from rmt_scale.model.presets import preset_config
from rmt_scale.model.recurrence import (
    SPILL_PREFIX,
    StateSpillError,
    StateStore,
    last_state_memory,
    needs_backward,
    run_segments,
)

# dropout on everywhere, so that the replayed segments must draw the masks of the first forward
DROPOUT = {
    "opt": dict(dropout=0.1, attention_dropout=0.1),
    "gpt2": dict(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1),
    "llama": dict(attention_dropout=0.1),
    "gpt_neox": dict(hidden_dropout=0.1, attention_dropout=0.1),
}
SEGMENT = 4


def model_for(family: str, variant: str, **config) -> RecurrentMemoryModel:
    torch.manual_seed(0)
    backbone = transformers.AutoModelForCausalLM.from_config(preset_config(f"test-{family}", **DROPOUT[family]))
    if variant == "armt":
        model = RecurrentMemoryModel(
            backbone, ARMTConfig(num_mem_tokens=2, segment_size=SEGMENT, d_mem=4, num_heads=2, **config)
        )
        with torch.no_grad():  # W_v starts at zero: give the memory something to carry
            for memory in model.associative.memories:
                memory.value.weight.normal_(std=0.3)
    else:
        model = RecurrentMemoryModel(backbone, RMTConfig(num_mem_tokens=2, segment_size=SEGMENT, **config))
    return model.train()


def ids(length: int) -> torch.Tensor:
    return torch.randint(3, 96, (2, length), generator=torch.Generator().manual_seed(1))


def loss_and_gradients(model: RecurrentMemoryModel, x: torch.Tensor, labels: torch.Tensor):
    torch.manual_seed(123)  # the same dropout draws for every mode
    loss = model(x, labels=labels).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["opt", "gpt2", "llama", "gpt_neox"])
@pytest.mark.parametrize("variant", ["rmt", "armt"])
def test_sublinear_gives_the_bptt_gradients_with_dropout(family, variant):
    x = ids(9 * SEGMENT - 1)  # 9 segments, the last one short
    loss, grads = loss_and_gradients(model_for(family, variant), x, x)
    assert any(g.abs().sum() > 0 for name, g in grads.items() if "memor" in name)
    for keep_every in (0, 2, 9):
        model = model_for(family, variant, backprop="sublinear", state_keep_every=keep_every)
        other_loss, other = loss_and_gradients(model, x, x)
        torch.testing.assert_close(other_loss, loss, atol=1e-6, rtol=1e-6)
        assert other.keys() == grads.keys()
        for name in grads:
            torch.testing.assert_close(
                other[name], grads[name], atol=1e-5, rtol=1e-4, msg=f"keep_every={keep_every} {name}"
            )


def test_dropout_really_draws_different_masks_per_segment():
    """Without the restored generators the replay would not be exact: two runs with other seeds differ."""
    x = ids(4 * SEGMENT)
    model = model_for("opt", "armt")
    torch.manual_seed(1)
    first = model(x, labels=x).loss
    torch.manual_seed(2)
    assert not torch.allclose(first, model(x, labels=x).loss)


@pytest.mark.parametrize("segments", [16, 64])
def test_sublinear_keeps_about_sqrt_segments_states(segments):
    model = model_for("opt", "armt", backprop="sublinear")
    x = ids(segments * SEGMENT)
    model(x, labels=x).loss.backward()
    kept = last_state_memory()
    assert kept.kept_states == math.ceil(segments / (math.isqrt(segments - 1) + 1))
    assert kept.kept_states <= math.isqrt(segments) + 1
    state_bytes = sum(t.numel() * t.element_size() for t in model.associative.empty_state(2, "cpu"))
    assert kept.kept_bytes == kept.kept_states * state_bytes and kept.offloaded_bytes == 0


def test_replay_keeps_every_state():
    model = model_for("opt", "armt", backprop="replay")
    x = ids(16 * SEGMENT)
    model(x, labels=x).loss.backward()
    assert last_state_memory().kept_states == 16


@pytest.mark.parametrize("mode", ["replay", "sublinear"])
@pytest.mark.parametrize("variant", ["rmt", "armt"])
def test_autograd_grad_and_a_second_loss_see_the_replayed_gradients_once(mode, variant):
    """The replay's parameter gradients leave its Function like any other: ``torch.autograd.grad`` with respect to
    the parameters gives bptt's, and ``.grad`` is written once per backward (a hook counts it), added to what
    another loss of the same graph gives."""
    x = ids(6 * SEGMENT)
    reference = model_for("gpt2", variant)
    torch.manual_seed(123)
    expected = torch.autograd.grad(reference(x, labels=x).loss, list(reference.parameters()), allow_unused=True)
    model = model_for("gpt2", variant, backprop=mode, state_keep_every=2)
    torch.manual_seed(123)
    found = torch.autograd.grad(model(x, labels=x).loss, list(model.parameters()), allow_unused=True)
    for (name, _), want, got in zip(model.named_parameters(), expected, found):
        assert (want is None) == (got is None), name
        if want is not None:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=name)
    fired = []
    embedding = model.backbone.get_input_embeddings().weight
    embedding.register_post_accumulate_grad_hook(lambda p: fired.append(p.grad.clone()))
    torch.manual_seed(123)
    (model(x, labels=x).loss + embedding.sum()).backward()
    assert len(fired) == 1
    position = next(i for i, p in enumerate(model.parameters()) if p is embedding)
    torch.testing.assert_close(fired[0], found[position] + 1)


def test_replay_needs_the_parameters_it_differentiates():
    with pytest.raises(ValueError, match="backprop='replay' differentiates with respect to the step's parameters"):
        run_segments(lambda state, segment: (state, segment.sum(), None), (), [torch.ones(2)], "replay")


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_offloaded_states_give_the_same_gradients_and_leave_no_files(offload, tmp_path):
    x = ids(9 * SEGMENT)
    loss, grads = loss_and_gradients(model_for("llama", "armt", backprop="sublinear"), x, x)
    model = model_for("llama", "armt", backprop="sublinear", state_offload=offload, state_offload_dir=str(tmp_path))
    other_loss, other = loss_and_gradients(model, x, x)
    torch.testing.assert_close(other_loss, loss)
    for name in grads:
        torch.testing.assert_close(other[name], grads[name], msg=name)
    kept = last_state_memory()
    assert kept.kept_states == 3 and kept.offloaded_bytes == kept.kept_bytes > 0
    gc.collect()
    assert not list(tmp_path.glob(f"{SPILL_PREFIX}*")), "the spill directory outlived the step"


def test_a_spill_directory_that_cannot_be_made_is_named(tmp_path):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    store = StateStore("disk", str(not_a_directory))
    with pytest.raises(OSError, match=f"cannot create a state spill directory in {not_a_directory}.*state_offload"):
        store.put(0, (torch.zeros(2),))


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_spill_disk_raises_one_line_naming_the_file_and_leaves_nothing(tmp_path):
    """torch reports the full disk as a RuntimeError of several lines ("unexpected pos ..."), without errno."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], check=True)
    try:
        store = StateStore("disk", str(disk))
        store.put(0, (torch.zeros(1000),))  # 4 KB: fits
        with pytest.raises(StateSpillError) as raised:
            store.put(1, (torch.zeros(100_000),))  # 400 KB: does not
        message = str(raised.value)
        del raised  # its traceback holds the store and the failed file
        assert "\n" not in message and re.fullmatch(
            rf"cannot spill a segment state to {disk}/{SPILL_PREFIX}\S+/state-1\.pt \((No space left on device|no "
            r"space left on the device)\): free space there, pass another state_offload_dir, or use "
            r"state_offload='cpu'\.",
            message,
        ), message
        assert [p.name for p in next(disk.glob(f"{SPILL_PREFIX}*")).iterdir()] == ["state-0.pt"]
        torch.testing.assert_close(store.pop(0)[0], torch.zeros(1000))
        del store
        gc.collect()
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_segments_without_labels_outside_the_truncated_gradient_keep_nothing():
    assert needs_backward([False] * 5 + [True], bptt_depth=2) == [False, False, False, True, True, True]
    assert needs_backward([True] + [False] * 5, bptt_depth=0) == [True, False, False, False, False, True]
    assert needs_backward([False] * 4, bptt_depth=-1) == [True] * 4
    x = ids(16 * SEGMENT)
    labels = torch.full_like(x, -100)
    labels[:, -SEGMENT:] = x[:, -SEGMENT:]  # loss only in the last segment
    results = {}
    for mode in ("bptt", "sublinear"):
        model = model_for("opt", "armt", backprop=mode, bptt_depth=2)
        results[mode] = loss_and_gradients(model, x, labels)
    # k = 4: only the last block (segments 12..15) holds segments that the backward visits
    assert last_state_memory().kept_states == 1
    (loss, grads), (other_loss, other) = results["bptt"], results["sublinear"]
    torch.testing.assert_close(other_loss, loss)
    for name in grads:
        torch.testing.assert_close(other[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_spill_directories_of_killed_processes_are_removed(tmp_path):
    """A run killed mid-step (SIGKILL runs no cleanup) leaves its spill directory; the next spill in the same
    place removes it, and leaves those of live processes alone."""
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    first = StateStore("disk", str(tmp_path))
    first.put(0, (torch.zeros(2),))  # its directory's name gives the prefix of this host's spills
    host_prefix = next(tmp_path.glob(f"{SPILL_PREFIX}*")).name.rsplit("-", 2)[0]
    del first
    orphan = tmp_path / f"{host_prefix}-{killed.pid}-abcd"
    orphan.mkdir()
    (orphan / "state-0.pt").write_bytes(b"x" * 1000)
    alive = tmp_path / f"{host_prefix}-{os.getpid()}-efgh"
    alive.mkdir()
    killed.kill()
    killed.wait()
    gc.collect()
    store = StateStore("disk", str(tmp_path))
    store.put(0, (torch.ones(2),))
    assert not orphan.exists() and alive.exists()
    torch.testing.assert_close(store.pop(0)[0], torch.ones(2))
