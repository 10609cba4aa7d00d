"""Import a local Hugging Face model directory (GPT-2, Llama incl. grouped-query attention, Mega) as our model: a
``.mext`` archive, a consolidated ``.pt`` or a training checkpoint in a chosen TP x PP layout.

    python tools/convert_from_hf.py --input hf/llama --output llama.mext
    python tools/convert_from_hf.py --input hf/gpt2 --output gpt2.pt --tokenizer-library byte
    python tools/convert_from_hf.py --input hf/llama --output experiments/llama/imported --target-tp 2 --target-pp 2

``--output``: ending in ``.mext`` -> an archive (weights, the mapped config, the tokenizer; layout-free); ending in
``.pt`` -> a consolidated weights file (layout-free); anything else -> a *run directory* holding
``checkpoints/step_0000000`` for ``--target-tp`` x ``--target-pp`` (``target_tp * target_pp`` CPU processes write
it, as ``tools/convert_checkpoint.py --output-dir`` does) and its ``config.yaml``.

Continue pretraining (weights only, a fresh optimizer) from any of them, at any layout::

    python pretrain_gpt.py model.ckpt_path=llama.mext <the model.* line this tool prints> ...

A Mega model (transformers 4.x's ``MegaForCausalLM``; mapping and refusals in
``megatron_ext/inference/hf_import_mega.py``) is written as a ``.mext`` archive only; the tool prints its model
config (``model.arch=mega`` and the ``model.mega.*`` keys), e.g. for ``pretrain_gpt.py
--config-path=configs/mega --config-name=gpt_mega model.ckpt_path=mega.mext ...``.

The run's ``model.*`` architecture keys must describe the imported model: the tool prints them as one line of
overrides (the archive also holds them in its ``config.yaml``), and a run whose keys differ is refused naming the
key. ``--input`` is read as untrusted (see ``megatron_ext/inference/hf_import.py``); nothing is downloaded.

Tokenizer: the run trains with ``model.tokenizer``, which must have exactly the model's ``vocab_size`` ids. By
default, when ``--input`` holds a ``tokenizer.json``, that is it (``model.tokenizer.library=huggingface
model.tokenizer.model=<--input>``); otherwise give ``--tokenizer-library`` / ``--tokenizer-model``.

Errors print one line ``convert_from_hf: error: ...`` and exit with status 2. Existing outputs are refused unless
``--overwrite``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from typing import Any, Dict, Optional, Sequence

from megatron_ext.errors import ConfigError, run_entry_point
from megatron_ext.output_files import check_outputs

PROG = "convert_from_hf"

#: our model.* keys that describe the architecture (printed as overrides, checked when weights are loaded)
OVERRIDE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                 "max_position_embeddings", "position_embedding_type", "rotary_base", "normalization",
                 "layernorm_epsilon", "activation", "bias", "share_embeddings_and_output_weights")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert_from_hf.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="a local Hugging Face model directory (config.json + weights)")
    p.add_argument("--output", required=True, help="X.mext (archive), X.pt (consolidated) or a run directory")
    p.add_argument("--target-tp", type=int, default=None, help="tensor-parallel size of a run-directory output")
    p.add_argument("--target-pp", type=int, default=None, help="pipeline-parallel size of a run-directory output")
    p.add_argument("--tokenizer-library", default=None,
                   help="the tokenizer the model trains with (default: huggingface from --input's tokenizer.json)")
    p.add_argument("--tokenizer-model", default=None, help="its model file / directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return p


def resolve_tokenizer_spec(args, hf_dir: str) -> Dict[str, Optional[str]]:
    if args.tokenizer_library or args.tokenizer_model:
        library = args.tokenizer_library or "sentencepiece"
        return {"library": library, "model": args.tokenizer_model}
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        return {"library": "huggingface", "model": os.path.abspath(hf_dir)}
    raise ConfigError("--tokenizer-library: not given and --input has no tokenizer.json: name the tokenizer the model "
                      "trains with (--tokenizer-library byte|sentencepiece|huggingface|... --tokenizer-model FILE); it "
                      "must have exactly the model's vocab_size ids")


def check_tokenizer(spec: Dict[str, Optional[str]], vocab: int):
    from megatron_ext.tokenizers import build_tokenizer  # start-up cost: tokenizer stack

    tok = build_tokenizer(spec["library"], spec["model"], library_key="--tokenizer-library",
                          model_key="--tokenizer-model")
    if int(tok.vocab_size) != int(vocab):
        raise ConfigError(f"--tokenizer-library {spec['library']}: the tokenizer has {tok.vocab_size} ids but the "
                          f"model's config.json has vocab_size={vocab}; give the tokenizer the model was trained "
                          f"with")
    return tok


def run_config(model_config: Dict[str, Any], tokenizer: Dict[str, Optional[str]],
               family: str = "gpt") -> Dict[str, Any]:
    """The resolved default run config (of the family's entry point) with the imported ``model.*`` keys and
    tokenizer (an archive's config.yaml)."""
    from omegaconf import OmegaConf

    from megatron_ext.config.loader import load_config  # start-up cost: config stack
    from megatron_ext.models.families import get_family  # start-up cost: model stack

    cfg = load_config(get_family(family).schema)
    mc = dict(model_config)
    if mc.get("seq_length") is None:  # a training length the model's positions allow
        mc["seq_length"] = min(int(cfg.model.seq_length),
                               int(mc.get("max_position_embeddings") or cfg.model.seq_length))
    cfg.model = OmegaConf.merge(cfg.model, mc)
    cfg.model.tokenizer.library = tokenizer["library"]
    cfg.model.tokenizer.model = tokenizer["model"]
    return OmegaConf.to_container(cfg, resolve=True)


def override_line(model_config: Dict[str, Any], tokenizer: Dict[str, Optional[str]], ckpt: str) -> str:
    rope = str(model_config.get("position_embedding_type")).lower() == "rope"
    items = [f"model.{k}={_fmt(model_config[k])}" for k in OVERRIDE_KEYS
             if model_config.get(k) is not None and (rope or k != "rotary_base")]
    items.append(f"model.tokenizer.library={tokenizer['library']}")
    if tokenizer.get("model"):
        items.append(f"model.tokenizer.model={shlex.quote(str(tokenizer['model']))}")
    items.append(f"model.ckpt_path={shlex.quote(ckpt)}")
    return " ".join(items)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    out = args.output
    layout_out = not (out.endswith(".mext") or out.endswith(".pt"))
    tp = 1 if args.target_tp is None else args.target_tp
    pp = 1 if args.target_pp is None else args.target_pp
    for key, v in (("--target-tp", tp), ("--target-pp", pp)):
        if v < 1:
            raise ConfigError(f"{key}={v}: expected an integer >= 1")
        if not layout_out and v != 1:
            raise ConfigError(f"{key}={v}: a .mext / .pt output has no layout (any layout loads it); give a run "
                              f"directory as --output for a checkpoint in a TP x PP layout")
    if layout_out and os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--output {out}: exists and is not a directory (expected X.mext, X.pt or a run "
                          f"directory)")
    check_outputs([("--output", os.path.join(out, "") if layout_out else out)], [args.input, args.tokenizer_model],
                  overwrite=args.overwrite)
    from megatron_ext.inference.hf_import import import_from_hf  # start-up cost: model stack

    obj = import_from_hf(args.input)
    gpt = obj["family"] == "gpt" and str(obj["model_config"].get("arch", "transformer")) == "transformer"
    if not gpt and not out.endswith(".mext"):
        raise ConfigError(f"--output {out}: --input {args.input} is a {obj['family']} model "
                          f"(model.arch={obj['model_config'].get('arch', 'transformer')}); it is written as a .mext "
                          f"archive only (the .pt and checkpoint forms hold GPT transformer weights)")
    spec = resolve_tokenizer_spec(args, args.input)
    check_tokenizer(spec, obj["vocab_size"])
    mc = obj["model_config"]
    mc["tokenizer"] = dict(spec)
    config = run_config(mc, spec, obj["family"])
    obj["model_config"] = config["model"]
    n = sum(t.numel() for t in obj["state_dict"].values())
    if out.endswith(".mext"):
        from megatron_ext.checkpoint.archive import write_archive  # start-up cost: model stack

        write_archive(out, state_dict=obj["state_dict"], config=config, family=obj["family"],
                      vocab_size=obj["vocab_size"], tokenizer_library=str(spec["library"]),
                      tokenizer_file=spec["model"], source={"hf": obj["source"]})
        ckpt = out
    elif out.endswith(".pt"):
        from megatron_ext.checkpoint.consolidated import save_consolidated  # start-up cost: model stack

        save_consolidated(obj, out)
        ckpt = out
    else:
        from megatron_ext.checkpoint.consolidated import save_consolidated  # start-up cost: model stack
        from megatron_ext.cli.convert_checkpoint import write_layout_checkpoint  # start-up cost: model stack

        with tempfile.TemporaryDirectory(prefix="convert_from_hf-") as tmp:
            path = os.path.join(tmp, "consolidated.pt")
            save_consolidated(obj, path)
            write_layout_checkpoint(path, out, tp, pp)
        ckpt = out
    return {"model_type": obj["source"]["hf_model_type"], "params": n, "vocab_size": obj["vocab_size"],
            "output": out, "layout": (tp, pp) if layout_out else None,
            "overrides": override_line(obj["model_config"], spec, ckpt) if gpt else None, "model": mc}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    rc, info = run_entry_point(PROG, run, args)
    if rc:
        return rc
    where = f"a tp {info['layout'][0]} x pp {info['layout'][1]} checkpoint in {info['output']}" if info["layout"] \
        else info["output"]
    print(f"{PROG}: {info['model_type']}, {info['params'] / 1e6:.2f}M parameters, vocab {info['vocab_size']} -> "
          f"{where}", flush=True)
    if info["overrides"]:
        print(f"{PROG}: continue pretraining with: python pretrain_gpt.py {info['overrides']}", flush=True)
    else:
        mc = {k: v for k, v in info["model"].items() if k != "tokenizer"}
        print(f"{PROG}: model config (its config.yaml; LM.restore_from({info['output']!r}) loads it): "
              f"{json.dumps(mc, sort_keys=True)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
