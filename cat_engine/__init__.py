"""cat-engine: Contrastive Adapter Training of LoRA adapters on Stable-Diffusion-class UNets.

Sub-packages map onto the repository's top-level folders (see pyproject.toml):
``cat_engine.kernels`` (Triton LoRA kernels), ``cat_engine.engine`` (LoRA layers, split batch,
memory plan, model loading), ``cat_engine.cat`` (the CAT objective, data, training recipe, KPS,
CLI) and ``cat_engine.bench`` (profiling).
"""

__version__ = "0.1.0"
