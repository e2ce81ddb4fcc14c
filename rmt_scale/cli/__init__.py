"""The command lines, each a ``main()``: ``launchers/train.py`` and ``launchers/eval.py``, ``tools/make_shards.py``
and ``tools/profile_flops.py`` call them, and ``pyproject.toml`` installs them as ``rmt-train``, ``rmt-eval``,
``rmt-make-shards`` and ``rmt-profile-flops``.

The launchers' modules import only ``rmt_scale.runtime`` at their top: they restart the process under the CPU
allocator first thing, and must choose the accelerator before anything imports DeepSpeed.
"""
