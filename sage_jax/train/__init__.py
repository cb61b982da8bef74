"""Training: losses, SFT/DPO steps and loops, Orbax checkpointing, preemption handling, metrics."""
