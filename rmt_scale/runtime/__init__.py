"""Process-level concerns shared by every layer: the accelerator choice, the CPU allocator, peak memory.

Nothing here imports the rest of the package, so a launcher can use it before the model or DeepSpeed loads.
"""
