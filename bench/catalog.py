"""`ptdit models`: one row per registry entry — sizes, attention layout, parameters ours vs the
published count."""

import ptdit
from ptdit.configs import entry


def describe(name: str) -> dict:
    """One row about a named model: sizes, attention layout, parameters ours vs published."""
    config, source, paper = entry(name)
    model = ptdit.build(name, device="meta")
    params = sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return {
        "model": name,
        "family": config.family,
        "params_m": round(params / 1e6, 3),
        "paper_params_m": paper,
        "params_diff_pct": None if paper is None else round(100 * (params / 1e6 / paper - 1), 2),
        "frozen_params_m": round(frozen / 1e6, 3),
        "depth": config.depth,
        "width": config.hidden_size,
        "heads": config.num_heads,
        "head_dim": config.hidden_size // config.num_heads,
        "patch": config.patch_size,
        "condition": config.condition,
        "attention": config.attention_layout(),
        "source": source,
    }


def table(fmt: str = "table") -> str:
    """`ptdit models`: every registry entry's row, rendered."""
    import pandas as pd

    from .markdown import render

    return render(pd.DataFrame([describe(name) for name in ptdit.list_models()]), fmt)
