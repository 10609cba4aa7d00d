"""Model inspection: internal embeddings, attention maps, training-metric plots (``megatron_ext.inference.explorer``,
seed 003's ``model_explorer``, gathers these with the run loaders of ``megatron_ext.inference.runs``).

    from megatron_ext.inference import inspection
    out = inspection.get_embeddings(lm, "hello")           # {"logits": [1, s, V], "embeddings": [1, L + 1, s, h]}
    logits, attns = inspection.show_attns(lm, "as business managers know", layers=[0], heads=[0], folder="attn/demo")
    inspection.load_metrics(run_dir)["train/loss"]         # [(step, value), ...]
    inspection.plot_metrics(run_dir, "val/loss")           # -> <run_dir>/plots/val_loss.png

Everything here runs the model once, in eval mode (no dropout), under ``torch.no_grad``, and reads the internals
with forward hooks: the model code is not changed and no private state is left behind (the hooks are removed and
the model's train/eval mode restored, also on error).

Embeddings (``get_embeddings``)
    ``embeddings[:, 0]`` is the input of the decoder stack (token embeddings + learned positions when the model has
    them; rope rotates q/k inside attention instead), ``embeddings[:, i]`` the output of decoder layer ``i - 1``;
    the last one is taken *before* the stack's final norm (``decoder.final_layernorm``; Mega: ``decoder.final_norm``
    of a pre-norm stack): final norm + output layer of the last embedding give the logits. Mega LMs: the
    embedding and each ``MegaLayer``. Encoder-decoder LMs: the decoder's embeddings and layers, with the encoder
    reading ``source``; the decoder input is used as given (training feeds ``bos + target``).

Attention maps (``attention_maps`` / ``show_attns``)
    ``[1, n_layers, n_heads, s, s]`` (selected layers / heads, in the order asked), rows = queries, columns = keys.
    Transformer layers: recomputed from the captured input of each ``self_attention`` with the module's own
    weights -- fused QKV (``[heads, 3, head_dim]`` layout), rope when the model uses it, ``softmax(q k^T /
    sqrt(head_dim))`` over the allowed keys (causal, or the given mask), no dropout -- the exact probabilities the
    layer mixes its values with. Mega layers: the layer's own attention weights (``output_attentions``; one
    head; with chunking the block-diagonal matrix; ``laplace`` / ``relu2`` attention weights are not normalized).
    Encoder-decoder LMs: the decoder's self-attention. Tensor parallelism (heads split over ranks) is not
    supported here (a ConfigError).

Metrics (``load_metrics`` / ``plot_metrics``)
    From the run's ``metrics.jsonl`` (``exp_dir/name/version/metrics.jsonl``, one JSON object per logged step, see
    ``megatron_ext.training.exp_manager``); numeric values only. A last line cut by a crash mid-write is skipped.
    PNGs need matplotlib (an optional extra): without it ``plot_metrics`` and ``show_attns(folder=...)`` raise a
    ConfigError saying so; everything else works.
"""
from __future__ import annotations

import inspect
import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from megatron_ext.errors import ConfigError, DataError
from megatron_ext.modules.common import tp_world_size
from megatron_ext.modules.rotary import apply_rotary

IntList = Optional[Union[int, Sequence[int]]]


# ------------------------------------------------------------------------------------------------ model parts
def _stack(lm):
    """(decoder stack module, list of its layers, "transformer" | "mega")."""
    dec = lm.model.decoder
    if hasattr(dec, "mega") and hasattr(dec.mega, "layers"):  # MegaStack
        return dec, list(dec.mega.layers), "mega"
    return dec, list(dec.layers), "transformer"


def final_norm(lm):
    """The decoder stack's final norm module (None when the stack has none)."""
    dec, _, kind = _stack(lm)
    return getattr(dec, "final_norm" if kind == "mega" else "final_layernorm", None)


def _bound(module, args, kwargs) -> Dict[str, object]:
    """The arguments of a call of ``module`` by parameter name."""
    try:
        return dict(inspect.signature(module.forward).bind(*args, **kwargs).arguments)
    except TypeError:
        names = list(inspect.signature(module.forward).parameters)
        return {**dict(zip(names, args)), **kwargs}


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _inputs(lm, x, source):
    """(decoder/LM tokens [b, s], encoder tokens [b, S] or None)."""
    tokens = lm.as_batch(x)
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise DataError(f"tokens: expected a non-empty sequence (string, id list, 1-D or [batch, seq] tensor), got "
                        f"shape {tuple(tokens.shape)}")
    if lm.family != "encdec":
        if source is not None:
            raise ConfigError(f"source: only an encoder-decoder LM takes a source (this LM is '{lm.family}')")
        return tokens, None
    if source is None:
        raise ConfigError("source: an encoder-decoder LM needs the encoder input (source=...); the tokens are the "
                          "decoder input (training feeds bos + target)")
    src = lm.as_batch(source)
    if src.shape[1] == 0:
        raise DataError("source: expected a non-empty sequence")
    if src.shape[0] != tokens.shape[0]:
        raise DataError(f"source: batch of {src.shape[0]} does not match the {tokens.shape[0]} decoder sequence(s)")
    return tokens, src


def _select(values: IntList, n: int, name: str, what: str) -> List[int]:
    if values is None:
        return list(range(n))
    if isinstance(values, int) and not isinstance(values, bool):
        values = [values]
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if (not isinstance(values, (list, tuple, range)) or not values
            or any(isinstance(v, bool) or not isinstance(v, int) for v in values)):
        raise ConfigError(f"{name}={values!r}: expected None (all), an integer or a non-empty list of integers in "
                          f"[0, {n}) ({n} {what})")
    bad = [v for v in values if not 0 <= v < n]
    if bad:
        raise ConfigError(f"{name}={list(values)!r}: {bad[0]} is out of range; the model has {n} {what} "
                          f"(valid: 0..{n - 1})")
    return [int(v) for v in values]


def _recompute_probs(attn, captured: Dict[str, object]) -> torch.Tensor:
    """Attention probabilities ``[b, heads, s, s]`` of a ``ParallelSelfAttention`` from its call arguments."""
    cached = [k for k, v in captured.items() if "cache" in k and v is not None]
    if cached:
        raise RuntimeError(f"attention maps are recomputed from a plain forward; the layer was called with {cached[0]}")
    h = captured["hidden_states"]
    mask = captured.get("attention_mask")
    rotary = captured.get("rotary_cos_sin")
    b, s, _ = h.shape
    nh, hd = attn.num_heads_per_partition, attn.head_dim
    q, k, _v = attn.split_qkv(h)
    if rotary is not None:
        cos, sin = rotary
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    q, k = q.transpose(1, 2).float(), k.transpose(1, 2).float()
    if k.shape[1] != nh:  # grouped-query attention: each key head serves nh / ng query heads
        k = k.repeat_interleave(nh // k.shape[1], dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(hd)
    if mask is not None:
        blocked = mask if mask.dtype == torch.bool else mask > 0.5
        scores = scores.masked_fill(blocked, float("-inf"))
    elif attn.causal:
        upper = torch.ones(s, s, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(upper, float("-inf"))
    return torch.softmax(scores, dim=-1)


def _inspect(lm, x, source, *, embeddings: bool, attn_layers: Optional[List[int]]):
    """One forward; -> (logits [b, s, vocab], embeddings [b, L + 1, s, h] or None,
    {layer: probs [b, heads, s, s]} or None)."""
    tokens, src = _inputs(lm, x, source)
    model = lm.model
    dec, layers, kind = _stack(lm)
    if attn_layers is not None and kind == "transformer":
        if tp_world_size() > 1:
            raise ConfigError("attention maps: tensor_model_parallel_size > 1 splits the heads over ranks; inspect "
                              "attention with a TP=1 copy of the model")
    stack_in: List[torch.Tensor] = []
    outs: Dict[int, torch.Tensor] = {}
    attn_in: Dict[int, Dict[str, object]] = {}
    mega_w: Dict[int, torch.Tensor] = {}
    handles = []
    want = set(attn_layers or [])

    def stack_pre(module, args, kwargs):
        bound = _bound(module, args, kwargs)
        stack_in.append(next(iter(bound.values())))

    def layer_post(i):
        def hook(module, args, output):
            outs[i] = _first(output)
            if kind == "mega" and i in want:
                mega_w[i] = output[2]
        return hook

    def mega_pre(module, args, kwargs):
        kwargs = dict(kwargs)
        kwargs["output_attentions"] = True
        return args, kwargs

    def attn_pre(i):
        def hook(module, args, kwargs):
            attn_in[i] = _bound(module, args, kwargs)
        return hook

    was_training = model.training
    model.eval()
    try:
        if embeddings:
            handles.append(dec.register_forward_pre_hook(stack_pre, with_kwargs=True))
        for i, layer in enumerate(layers):
            if embeddings or (kind == "mega" and i in want):
                handles.append(layer.register_forward_hook(layer_post(i)))
            if i in want:
                if kind == "mega":
                    handles.append(layer.register_forward_pre_hook(mega_pre, with_kwargs=True))
                else:
                    handles.append(layer.self_attention.register_forward_pre_hook(attn_pre(i), with_kwargs=True))
        with torch.no_grad():
            if src is None:
                logits = model(tokens)
            else:
                logits = model(src, tokens)
            logits = model.gather_logits(logits)
            maps = None
            if attn_layers is not None:
                maps = {}
                for i in attn_layers:
                    if kind == "mega":
                        w = mega_w.get(i)
                        if w is None:
                            raise RuntimeError(f"Mega layer {i} returned no attention weights")
                        maps[i] = w.float()
                    else:
                        if i not in attn_in:
                            raise RuntimeError(f"the self-attention of layer {i} was not called")
                        maps[i] = _recompute_probs(layers[i].self_attention, attn_in[i])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    emb = None
    if embeddings:
        if len(stack_in) != 1 or len(outs) != len(layers):
            raise RuntimeError(f"expected one call of the decoder stack and of each of its {len(layers)} layers, saw "
                               f"{len(stack_in)} and {len(outs)}")
        emb = torch.stack([stack_in[0]] + [outs[i] for i in range(len(layers))], dim=1)
    return logits, emb, maps


# ------------------------------------------------------------------------------------------------ public API
def get_embeddings(lm, tokens, *, source=None) -> Dict[str, torch.Tensor]:
    """``{"logits": [b, s, vocab], "embeddings": [b, num_layers + 1, s, hidden]}`` for ``tokens`` (a string, id
    list, 1-D tensor or ``[b, s]`` batch). Encoder-decoder LMs: ``tokens`` is the decoder input and ``source``
    the encoder input. See the module docstring for what each embedding is."""
    logits, emb, _ = _inspect(lm, tokens, source, embeddings=True, attn_layers=None)
    return {"logits": logits, "embeddings": emb}


def _num_heads(lm) -> int:
    _, layers, kind = _stack(lm)
    if kind == "mega":
        return 1
    return int(layers[0].self_attention.num_heads_per_partition)


def _maps(lm, x, layers, heads, source):
    tokens, _ = _inputs(lm, x, source)
    if tokens.shape[0] != 1:
        raise DataError(f"x: attention maps are for a single sequence, got a batch of {tokens.shape[0]}")
    _, all_layers, _ = _stack(lm)
    sel_layers = _select(layers, len(all_layers), "layers", "layers")
    sel_heads = _select(heads, _num_heads(lm), "heads", "attention heads per layer")
    logits, _, maps = _inspect(lm, tokens, source, embeddings=False, attn_layers=sel_layers)
    attns = torch.stack([maps[i][:, sel_heads] for i in sel_layers], dim=1)  # [1, nl, nh, s, s]
    return logits, attns, sel_layers, sel_heads


def attention_maps(lm, x, layers: IntList = None, heads: IntList = None, *, source=None) -> torch.Tensor:
    """Attention probabilities ``[1, n_layers, n_heads, s, s]`` of the single sequence ``x`` (string, id list,
    1-D tensor or ``[1, s]``); ``layers`` / ``heads``: indices to keep (None = all)."""
    return _maps(lm, x, layers, heads, source)[1]


def _token_labels(lm, ids: Sequence[int]) -> List[str]:
    out = []
    for t in ids:
        try:
            text = lm.decode([int(t)])
        except Exception:  # a tokenizer that cannot show a lone id (e.g. a partial UTF-8 byte)
            text = f"<{int(t)}>"
        out.append(text.replace("\n", "\\n") if text.strip() else repr(text))
    return out


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("writing PNGs needs matplotlib, which is not installed: pip install matplotlib") from None
    return Figure


def _make_dir(folder, name: str) -> str:
    path = os.path.abspath(os.path.expanduser(os.fspath(folder)))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{name}='{folder}': exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{name}='{folder}': cannot create the directory ({exc.strerror})") from None
    return path


def show_attns(lm, x, layers: IntList = None, heads: IntList = None, folder=None, *,
               source=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(logits [1, s, vocab], attns [1, n_layers, n_heads, s, s])`` for the single sequence ``x``. With
    ``folder`` also one heatmap per selected (layer, head): ``<folder>/layer<L>_head<H>.png`` (queries down,
    keys across, tokens on the axes up to 64 tokens; needs matplotlib)."""
    if folder is not None:
        if not isinstance(folder, (str, os.PathLike)):
            raise ConfigError(f"folder={folder!r}: expected a directory path or None")
        Figure = _figure_class()  # fail before the forward pass
    logits, attns, sel_layers, sel_heads = _maps(lm, x, layers, heads, source)
    if folder is None:
        return logits, attns
    out_dir = _make_dir(folder, "folder")
    ids = lm.as_batch(x)[0].tolist()
    labels = _token_labels(lm, ids) if len(ids) <= 64 else None
    s = len(ids)
    for li, layer in enumerate(sel_layers):
        for hi, head in enumerate(sel_heads):
            fig = Figure(figsize=(max(4.0, 0.28 * s + 2), max(3.5, 0.28 * s + 1.5)))
            ax = fig.add_subplot(1, 1, 1)
            im = ax.imshow(attns[0, li, hi].cpu().numpy(), cmap="viridis", interpolation="nearest", aspect="auto")
            fig.colorbar(im, ax=ax)
            ax.set_title(f"layer {layer}, head {head}")
            ax.set_xlabel("key")
            ax.set_ylabel("query")
            if labels is not None:
                ax.set_xticks(range(s))
                ax.set_yticks(range(s))
                ax.set_xticklabels(labels, rotation=90, fontsize=7)
                ax.set_yticklabels(labels, fontsize=7)
            fig.tight_layout()
            fig.savefig(os.path.join(out_dir, f"layer{layer}_head{head}.png"), dpi=100)
    return logits, attns


# ------------------------------------------------------------------------------------------------ metrics
def _metrics_path(run_dir) -> str:
    path = os.path.abspath(os.path.expanduser(os.fspath(run_dir)))
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise DataError(f"run_dir='{run_dir}': no such run directory (expected exp_dir/name/version with a "
                        f"metrics.jsonl)")
    metrics = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(metrics):
        raise DataError(f"run_dir='{run_dir}': has no metrics.jsonl (expected a run directory exp_dir/name/version "
                        f"written by the trainer)")
    return metrics


def load_metrics(run_dir) -> Dict[str, List[Tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` (file order) from ``<run_dir>/metrics.jsonl`` (``run_dir`` may also be the
    file itself). Only numeric values are kept; NaN stays NaN."""
    path = _metrics_path(run_dir)
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    out: Dict[str, List[Tuple[int, float]]] = {}
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        last = n == len(lines)  # no newline after it: possibly cut by a crash mid-write
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            if last:
                continue
            raise DataError(f"{path}, line {n}: not valid JSON ({exc})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}, line {n}: expected a JSON object, got a JSON {type(rec).__name__}")
        step = rec.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise DataError(f"{path}, line {n}: expected an integer 'step', got {step!r}")
        for key, value in rec.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            out.setdefault(key, []).append((step, float(value)))
    return out


def plot_metrics(run_dir, key: str, filename=None) -> str:
    """Plot metric ``key`` of the run against the step; writes a PNG and returns its path. Default path:
    ``<run_dir>/plots/<key with '/' replaced by '_'>.png``; ``filename``: the path to write instead (``.png``
    appended when it has no extension). An unknown ``key`` is an error listing the run's metrics."""
    metrics = load_metrics(run_dir)
    if not isinstance(key, str) or key not in metrics:
        avail = ", ".join(sorted(metrics)) or "(none)"
        raise ConfigError(f"key={key!r}: not a metric of this run; available: {avail}")
    points = [(s, v) for s, v in metrics[key] if math.isfinite(v)]
    if not points:
        raise DataError(f"key={key!r}: the run logged no finite value of this metric")
    if filename is None:
        path = _metrics_path(run_dir)
        safe = key.replace("/", "_").replace(os.sep, "_")
        out = os.path.join(os.path.dirname(path), "plots", f"{safe}.png")
    else:
        if not isinstance(filename, (str, os.PathLike)) or not os.fspath(filename):
            raise ConfigError(f"filename={filename!r}: expected a file path or None")
        out = os.path.abspath(os.path.expanduser(os.fspath(filename)))
        ext = os.path.splitext(out)[1]
        if not ext:
            out += ".png"
        elif ext.lower() != ".png":
            raise ConfigError(f"filename='{filename}': plot_metrics writes PNG files; use a name ending in .png "
                              f"(or no extension)")
    Figure = _figure_class()
    _make_dir(os.path.dirname(out), "filename")
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    steps, values = zip(*points)
    ax.plot(steps, values, marker="." if len(points) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(key)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out


__all__ = ["get_embeddings", "attention_maps", "show_attns", "final_norm", "load_metrics", "plot_metrics"]
