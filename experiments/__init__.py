"""Paper experiments and sweeps: one module per experiment, each a config dataclass + ``main(argv)``.

    python -m experiments.sft_m1 max_steps=100 model.path=smollm2 output_dir=runs/m1
    python -m experiments.sweep sft_m1 --grid optim.learning_rate=1e-4,5e-5 --grid lora.rank=8,16 max_steps=100

Every experiment writes ``<output_dir>/result.json`` (config, summary, flat metrics) when it
finishes; see :mod:`experiments.common` for the pattern a new experiment follows.
"""
