"""Shared by the lesson's exercises: the shipped tiny pretrained backbones and one small connector per strategy.

Everything runs offline on a CPU in seconds. One thread and fixed seeds make every printed number the same on
each run of one machine (timings excepted: the exercises print them after a "~"). Figures that come out of
training also depend on how the CPU rounds; the docs mark them with "≈". The exercises that train take
`--seed N` (default 0) to show how far another seed moves them.
"""

from __future__ import annotations

import argparse

import torch
from transformers.utils import logging as hf_logging

from kopru import KopruConfig, KopruForConditionalGeneration, VisionTowerConfig
from kopru.backbones import default_backbones

# Sized for the tiny backbones (width 128): a 2-layer MLP, a 2-layer Q-Former with 16 queries, and a gated
# cross-attention block before every 2nd of the LLM's 4 layers.
CONNECTORS: dict[str, dict] = {
    "projection": {"kind": "mlp", "depth": 2},
    "qformer": {"num_queries": 16, "hidden_size": 128, "num_layers": 2, "num_heads": 4, "intermediate_size": 256},
    "cross_attention": {"every_n_layers": 2},
}


def setup() -> int:
    """One thread, quiet loading, and the seed from `--seed` (default 0), which is returned and set."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0, help="seeds the connector's initialisation and the "
                        "order of the training samples")
    seed = parser.parse_args().seed
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    return seed


def tiny_config(strategy: str) -> KopruConfig:
    paths = default_backbones()
    return KopruConfig(vision=VisionTowerConfig(str(paths["vision"])), llm=str(paths["llm"]), strategy=strategy,
                       connector=dict(CONNECTORS[strategy]))


def build(strategy: str, seed: int = 0):
    """(model, processor) for `strategy` on the tiny backbones, in eval mode."""
    torch.manual_seed(seed)
    model, processor = KopruForConditionalGeneration.from_backbones(tiny_config(strategy))
    return model.eval(), processor


def shape(tensor: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in tensor.shape) + "]"
