"""Seed 003's ``model_explorer`` in one namespace: loading a run back and inspecting the model.

    from megatron_ext.inference import explorer
    lm, data, train_stats, params = explorer.get_model_by_timestamp("2026-11-23_10-00-00")
    explorer.verify_stable_load(run_dir)
    out = explorer.get_embeddings(lm, "hello")
    logits, attns = explorer.show_lm_attns(lm, "as business managers know", layers=[0], heads=[0], folder_name="demo")
    explorer.plot_metrics(run_dir, "val/loss")

The code lives in :mod:`megatron_ext.inference.inspection` (embeddings, attention maps, metric plots) and
:mod:`megatron_ext.inference.runs` (run loading, stable-load check); this module only gathers their public names
under the seed's spelling, and depends on both (neither imports it).
"""
from __future__ import annotations

from megatron_ext.inference.inspection import (attention_maps, final_norm, get_embeddings, load_metrics,
                                               plot_metrics, show_attns)
from megatron_ext.inference.runs import get_model_by_timestamp, load_run, verify_stable_load


def show_lm_attns(lm, x, layers=None, heads=None, folder_name=None, **kwargs):
    """Seed 003's spelling of :func:`show_attns` (``folder_name`` = ``folder``)."""
    return show_attns(lm, x, layers=layers, heads=heads, folder=folder_name, **kwargs)


__all__ = ["get_embeddings", "attention_maps", "show_attns", "final_norm", "load_metrics", "plot_metrics",
           "load_run", "get_model_by_timestamp", "verify_stable_load", "show_lm_attns"]
