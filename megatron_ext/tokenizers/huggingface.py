"""Hugging Face tokenizers (``model.tokenizer.library=huggingface``), read with the ``tokenizers`` library, offline.

    tok = build_tokenizer("huggingface", "hf_model_dir")        # or ".../tokenizer.json"
    tok.tokenize("To be, or not to be")   # == AutoTokenizer.from_pretrained("hf_model_dir")(text)["input_ids"]

``model.tokenizer.model`` is a Hugging Face model directory holding ``tokenizer.json`` (the fast-tokenizer file
``save_pretrained`` writes), or the path of such a ``tokenizer.json``; ``tokenizer_config.json`` and
``special_tokens_map.json`` next to it (both optional) name the special tokens. Nothing is downloaded and no code
is run: the three files are JSON, ``tokenizers`` builds the pipeline (normalizer, pre-tokenizer, model,
post-processor, decoder) from ``tokenizer.json``, and a ``tokenizer_config.json`` that asks for custom code
(``auto_map``) is refused, naming the key. ``transformers`` is not needed.

Ids are ``AutoTokenizer``'s (``AutoTokenizer.from_pretrained(dir)(text)["input_ids"]``, its defaults): the text goes
through ``tokenizer.json``'s pipeline, and the settings ``AutoTokenizer`` takes from ``tokenizer_config.json`` are
applied the way transformers applies them:

* special tokens: ``bos_token`` / ``eos_token`` / ``unk_token`` / ``pad_token`` (a string or an ``AddedToken``
  dict) from ``tokenizer_config.json``, overridden by ``special_tokens_map.json`` when the config has no
  ``added_tokens_decoder`` (an older config; transformers 5 reads that file only then); ``additional_special_tokens``
  / ``extra_special_tokens`` and ``added_tokens_decoder``. Each must be in ``tokenizer.json``'s vocabulary (a
  ConfigError names the key and the file otherwise; transformers would append it with a new id the model has
  never seen); one that is not yet an added token becomes one, as in transformers, so it is matched in text;
* special tokens spelled in the text are matched, as ``AutoTokenizer`` does (``"a</s>b"`` holds the eos id),
  unless ``split_special_tokens: true``;
* the tokens put around every text: ``tokenizer.json``'s post-processor (Llama-2: ``<s>`` first; Llama-3:
  ``<|begin_of_text|>`` first; GPT-2: nothing). ``add_bos_token`` / ``add_eos_token`` in ``tokenizer_config.json``
  are not applied: transformers 5 drops them whenever there is a ``tokenizer.json`` (transformers 4's Llama-style
  classes rebuilt the post-processor from them); when they disagree with the post-processor a warning names the
  key, since the two transformers versions then give other ids;
* truncation and padding saved in ``tokenizer.json`` are switched off (``AutoTokenizer`` does neither by default).

transformers classes that rebuild the pipeline in code instead of reading ``tokenizer.json`` (transformers 5's
``LlamaTokenizer`` builds a ``Metaspace`` pre-tokenizer from ``add_prefix_space`` / ``legacy``) are not imitated:
``tokenizer.json`` is what is read; a ``tokenizer.json`` that ``save_pretrained`` of that transformers version
wrote holds the rebuilt pipeline, and gives the same ids.

Special ids: ``eod`` = the eos token (a tokenizer without one is refused naming ``eos_token``: there would be no
end-of-document id), ``pad`` = the pad token or ``eod``, ``bos`` = the bos token or None. ``vocab_size`` counts
every id, added tokens included (the largest id + 1).

Documents: ``tokenize`` and the preprocessing path (``tokenize_batch_flat(texts, append_eod=True)``) give
``AutoTokenizer``'s ids -- with the tokens the post-processor adds (a Llama-2 document starts with ``<s>``) --
followed by ``eod``, unless the post-processor already ends every text with ``eod`` (``"<s> $A </s>"``):
then nothing more is appended (``ends_with_eod``; the raw-text GPT datasets follow the same rule). ``tokenize_plain`` leaves out the added tokens (``add_special_tokens=False``): it
is what a stop string in generation is encoded with. ``detokenize`` drops special tokens
(``skip_special_tokens=True``).

Identity (``unique_identifiers``, the sample-index cache key): the SHA-256 of ``tokenizer.json`` and of the
settings above (special ids, added tokens, post-processor, ``split_special_tokens``), not the path, so a copy of
the same files (an archive's) reuses the caches and another tokenizer never does.

Threads: the batched encoder uses the ``tokenizers`` library's thread pool (one per process, all cores);
``num_threads = 1`` switches it off in this process (``TOKENIZERS_PARALLELISM=false``), another value sets
``RAYON_NUM_THREADS`` when it is not set yet (it only counts before the library's first parallel call).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from megatron_ext.errors import ConfigError
from megatron_ext.tokenizers.base import Tokenizer, append_eod_flat, ids_to_list

#: the file the pipeline is read from, and the files that name its special tokens (all optional but the first)
TOKENIZER_JSON = "tokenizer.json"
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
HF_TOKENIZER_FILES = (TOKENIZER_JSON,) + CONFIG_FILES

#: larger files are refused before they are read (the largest public tokenizer.json files are a few tens of MB)
MAX_FILE_BYTES = 512 << 20
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
#: tokenizer_config.json keys that ask transformers to import code from the directory
CODE_KEYS = ("auto_map",)


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as exc:  # pragma: no cover - tokenizers is installed with transformers
        raise ConfigError("model.tokenizer.library=huggingface needs the 'tokenizers' package "
                          "(pip install tokenizers)") from exc
    return tokenizers


def hf_tokenizer_files(model: Any, model_key: str = "model.tokenizer.model") -> Tuple[str, List[str]]:
    """``(tokenizer.json path, [the other tokenizer files beside it that exist])`` for a directory or a
    ``tokenizer.json`` path; a ConfigError names ``model_key`` when neither is there."""
    if model is None or (isinstance(model, str) and not model.strip()):
        raise ConfigError(f"{model_key} is required for the huggingface tokenizer: expected a Hugging Face model "
                          f"directory holding {TOKENIZER_JSON} (or the path of a {TOKENIZER_JSON}), got {model!r}")
    path = os.path.abspath(os.path.expanduser(str(model)))
    if not os.path.exists(path):
        raise ConfigError(f"{model_key}: '{path}' does not exist (expected a Hugging Face model directory holding "
                          f"{TOKENIZER_JSON}, or the path of a {TOKENIZER_JSON})")
    if os.path.isdir(path):
        main = os.path.join(path, TOKENIZER_JSON)
        if not os.path.isfile(main):
            have = sorted(n for n in ("tokenizer.model", "vocab.json", "merges.txt", "vocab.txt")
                          if os.path.isfile(os.path.join(path, n)))
            hint = (f" (it has {', '.join(have)}: only the fast-tokenizer file is read; write it with transformers: "
                    f"AutoTokenizer.from_pretrained(dir).save_pretrained(dir))") if have else ""
            raise ConfigError(f"{model_key}: the directory '{path}' has no {TOKENIZER_JSON}{hint}")
    elif os.path.isfile(path):
        main = path
    else:
        raise ConfigError(f"{model_key}: '{path}' is neither a directory nor a file")
    d = os.path.dirname(main)
    return main, [os.path.join(d, n) for n in CONFIG_FILES if os.path.isfile(os.path.join(d, n))]


def _read_bytes(path: str, model_key: str) -> bytes:
    try:
        size = os.path.getsize(path)
        if size > MAX_FILE_BYTES:
            raise ConfigError(f"{model_key}: '{path}' has {size} bytes, more than the {MAX_FILE_BYTES} a tokenizer "
                              f"file may have")
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"{model_key}: cannot read '{path}': {exc.strerror or exc}") from None


def _read_json_object(path: str, model_key: str) -> Dict[str, Any]:
    data = _read_bytes(path, model_key)
    try:
        obj = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{model_key}: '{path}' is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{model_key}: '{path}' holds a JSON {type(obj).__name__}, expected an object")
    return obj


def _token_content(value: Any, where: str) -> Optional[str]:
    """A special-token setting (a string, an ``AddedToken`` dict or null) -> its text."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ConfigError(f"{where}: expected a token string or an object with 'content', got {value!r}")


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (+ ``tokenizer_config.json``); see the module docstring."""

    name = "huggingface"

    def __init__(self, model: Optional[str] = None, num_threads: int = -1, *,
                 model_key: str = "model.tokenizer.model") -> None:
        main, extra = hf_tokenizer_files(model, model_key)
        blobs = {os.path.basename(main): _read_bytes(main, model_key)}
        for p in extra:
            blobs[os.path.basename(p)] = _read_bytes(p, model_key)
        self._path = main
        self._files = [main] + extra
        self._num_threads = -1
        self._load(blobs, model_key)
        self.num_threads = num_threads

    # ------------------------------------------------------------------ loading
    def _load(self, blobs: Dict[str, bytes], model_key: str, warn: bool = True) -> None:
        tokenizers = _import_tokenizers()
        main_name = os.path.basename(self._path)
        raw = blobs[main_name]
        try:
            text = raw.decode("utf-8")
            spec = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{model_key}: '{self._path}' is not valid JSON ({exc}); expected a Hugging Face "
                              f"{TOKENIZER_JSON}") from None
        if not isinstance(spec, dict) or "model" not in spec:
            raise ConfigError(f"{model_key}: '{self._path}' is not a Hugging Face {TOKENIZER_JSON} (expected a JSON "
                              f"object with a 'model' entry)")
        try:
            tok = tokenizers.Tokenizer.from_str(text)
        except Exception as exc:  # tokenizers raises its own Exception subclass on a bad file
            raise ConfigError(f"{model_key}: '{self._path}' is not a valid {TOKENIZER_JSON}: the tokenizers library "
                              f"cannot read it ({str(exc).strip() or type(exc).__name__})") from None
        tok.no_truncation()
        tok.no_padding()
        d = os.path.dirname(self._path)
        cfg_path = os.path.join(d, "tokenizer_config.json")
        cfg = self._json_blob(blobs, "tokenizer_config.json", cfg_path, model_key)
        smap_path = os.path.join(d, "special_tokens_map.json")
        smap = self._json_blob(blobs, "special_tokens_map.json", smap_path, model_key)
        for key in CODE_KEYS:
            if key in cfg:
                raise ConfigError(f"{model_key}: {cfg_path} sets '{key}' (a tokenizer class implemented in Python code "
                                  f"shipped with the model): refused, no code from a model directory is run; only "
                                  f"the {TOKENIZER_JSON} pipeline is supported")

        vocab = tok.get_vocab(with_added_tokens=True)

        def check(content: str, where: str) -> int:
            i = vocab.get(content)
            if i is None:
                raise ConfigError(f"{model_key}: {where} = {content!r} is not in the vocabulary of {self._path} "
                                  f"(expected a token of that {TOKENIZER_JSON})")
            return int(i)

        added = {t.content for t in tok.get_added_tokens_decoder().values()}
        to_add = []

        def mark_special(content: str, props: Optional[Dict[str, Any]] = None) -> None:
            if content in added:
                return
            props = props or {}
            to_add.append(tokenizers.AddedToken(content, special=True,
                                                normalized=bool(props.get("normalized", False)),
                                                lstrip=bool(props.get("lstrip", False)),
                                                rstrip=bool(props.get("rstrip", False)),
                                                single_word=bool(props.get("single_word", False))))
            added.add(content)

        decoder = cfg.get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict):
            raise ConfigError(f"{model_key}: {cfg_path} added_tokens_decoder: expected an object id -> token")
        for sid, props in sorted(decoder.items(), key=lambda kv: str(kv[0])):
            where = f"{cfg_path} added_tokens_decoder[{sid}]"
            content = _token_content(props, f"{model_key}: {where}")
            try:
                want = int(sid)
            except (TypeError, ValueError):
                raise ConfigError(f"{model_key}: {where}: the key must be a token id") from None
            if check(content, where) != want:
                raise ConfigError(f"{model_key}: {where} = {content!r} has id {vocab[content]} in {self._path}, not "
                                  f"{want}")
            mark_special(content, props)

        if "added_tokens_decoder" in cfg:  # transformers reads special_tokens_map.json only for older configs
            smap = {}
        specials: Dict[str, Optional[str]] = {}
        for key in SPECIAL_KEYS:
            value, where = cfg.get(key), f"{cfg_path} {key}"
            if key in smap:
                value, where = smap[key], f"{smap_path} {key}"
            content = _token_content(value, f"{model_key}: {where}")
            if content is not None:
                check(content, where)
                mark_special(content, value if isinstance(value, dict) else None)
            specials[key] = content
        for key in ("additional_special_tokens", "extra_special_tokens"):
            for src, path in ((cfg, cfg_path), (smap, smap_path)):
                value = src.get(key)
                if value is None:
                    continue
                items = list(value.values()) if isinstance(value, dict) else value
                if not isinstance(items, list):
                    raise ConfigError(f"{model_key}: {path} {key}: expected a list of tokens, got {value!r}")
                for j, item in enumerate(items):
                    content = _token_content(item, f"{model_key}: {path} {key}[{j}]")
                    if content is not None:
                        check(content, f"{path} {key}[{j}]")
                        mark_special(content, item if isinstance(item, dict) else None)
        if to_add:
            tok.add_special_tokens(to_add)

        if specials["eos_token"] is None:
            raise ConfigError(f"{model_key}: no eos_token in {cfg_path} or {smap_path}: the huggingface tokenizer "
                              f"needs the end-of-document token (eos_token) that is appended after every document; "
                              f"add \"eos_token\" to tokenizer_config.json")
        ids = {k: (vocab[v] if v is not None else None) for k, v in specials.items()}
        self._eod = int(ids["eos_token"])
        self._bos = ids["bos_token"]
        self._unk = ids["unk_token"]
        self._pad = int(ids["pad_token"]) if ids["pad_token"] is not None else self._eod

        split = cfg.get("split_special_tokens", False)
        if not isinstance(split, bool):
            raise ConfigError(f"{model_key}: {cfg_path} split_special_tokens: expected true or false, got {split!r}")
        tok.encode_special_tokens = split
        for key in ("add_bos_token", "add_eos_token"):
            v = cfg.get(key)
            if v is not None and not isinstance(v, bool):
                raise ConfigError(f"{model_key}: {cfg_path} {key}: expected true or false, got {v!r}")
        self._tok = tok
        if warn:
            self._check_flags(cfg, cfg_path, specials, vocab)
        self._blobs = blobs
        full_vocab = tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(full_vocab.values()) + 1 if full_vocab else 0
        empty = tok.encode("", add_special_tokens=True).ids
        self._around = list(empty)  # what the post-processor puts around every text (on the empty text: all of it)
        self._ends_with_eod = bool(empty) and int(empty[-1]) == self._eod
        h = hashlib.sha256()
        h.update(raw)
        settings = {"specials": specials, "split_special_tokens": split,
                    "added": sorted((int(i), t.content) for i, t in tok.get_added_tokens_decoder().items()
                                    if t.special)}
        h.update(json.dumps(settings, sort_keys=True).encode())
        self._digest = h.hexdigest()
        self._specials = specials

    def _check_flags(self, cfg: Dict[str, Any], cfg_path: str, specials: Dict[str, Optional[str]],
                     vocab: Dict[str, int]) -> None:
        """``add_bos_token`` / ``add_eos_token`` that disagree with what ``tokenizer.json``'s post-processor adds: a
        warning naming the key (transformers 5 drops them when there is a ``tokenizer.json``, as we do; transformers
        4's Llama-style classes rebuilt the post-processor from them, so the two versions give other ids)."""
        around = self._tok.encode("", add_special_tokens=True).ids
        checks = (("add_bos_token", specials["bos_token"], 0), ("add_eos_token", specials["eos_token"], -1))
        for key, token, pos in checks:
            flag = cfg.get(key)
            if flag is None or token is None:
                continue
            adds = bool(around) and int(around[pos]) == int(vocab[token])
            if bool(flag) != adds:
                warnings.warn(f"{cfg_path}: {key}={str(flag).lower()} but the post-processor of {self._path} "
                              f"{'does not add' if flag else 'adds'} {token!r}: the post-processor is followed "
                              f"(as transformers 5 does; transformers 4 followed {key}, giving other ids)",
                              UserWarning, stacklevel=4)

    def _json_blob(self, blobs: Dict[str, bytes], name: str, path: str, model_key: str) -> Dict[str, Any]:
        if name not in blobs:
            return {}
        try:
            obj = json.loads(blobs[name].decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{model_key}: '{path}' is not valid JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise ConfigError(f"{model_key}: '{path}' holds a JSON {type(obj).__name__}, expected an object")
        return obj

    # pickling (DataLoader workers with spawn): the file contents, not the Rust object
    def __getstate__(self) -> Dict[str, Any]:
        return {"path": self._path, "files": self._files, "num_threads": self._num_threads, "blobs": self._blobs}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self._path, self._files = state["path"], state["files"]
        self._num_threads = state["num_threads"]
        self._load(state["blobs"], "model.tokenizer.model", warn=False)

    # ------------------------------------------------------------------ ids
    @property
    def model_path(self) -> str:
        """The ``tokenizer.json`` read."""
        return self._path

    @property
    def files(self) -> List[str]:
        """``tokenizer.json`` and the ``tokenizer_config.json`` / ``special_tokens_map.json`` read with it."""
        return list(self._files)

    @property
    def backend(self):
        """The ``tokenizers.Tokenizer`` (with the settings of ``tokenizer_config.json`` applied)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad

    @property
    def bos(self) -> Optional[int]:
        return self._bos

    @property
    def unk(self) -> Optional[int]:
        return self._unk

    @property
    def special_tokens(self) -> Dict[str, Optional[str]]:
        """``{"bos_token", "eos_token", "unk_token", "pad_token"}`` -> token text (None when not set)."""
        return dict(self._specials)

    @property
    def added_around_text(self) -> List[int]:
        """The ids the post-processor puts around every text (e.g. ``[bos]``)."""
        return list(self._around)

    @property
    def ends_with_eod(self) -> bool:
        """The post-processor ends every text with ``eod`` (documents then get no second one)."""
        return self._ends_with_eod

    @property
    def num_threads(self) -> int:
        return self._num_threads

    @num_threads.setter
    def num_threads(self, value: int) -> None:
        self._num_threads = int(value)
        if self._num_threads == 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        elif self._num_threads > 1:
            os.environ.setdefault("RAYON_NUM_THREADS", str(self._num_threads))

    @property
    def unique_identifiers(self) -> "OrderedDict[str, Any]":
        return OrderedDict([
            ("class", type(self).__name__),
            ("library", self.name),
            ("tokenizer_sha256", self._digest),
            ("vocab_size", self.vocab_size),
            ("eod", self.eod),
            ("pad", self.pad),
            ("bos", self.bos),
        ])

    def describe(self) -> Dict[str, Any]:
        d = super().describe()
        d["model"] = self._path
        d["unk"] = self.unk
        d["added_around_text"] = self.added_around_text
        return d

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return {int(i): t for t, i in self._tok.get_vocab(with_added_tokens=True).items()}

    # ------------------------------------------------------------ encoding
    def tokenize(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=True).ids

    def tokenize_plain(self, text: str) -> List[int]:
        """The ids of ``text`` without the tokens the post-processor adds (``add_special_tokens=False``)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def _encode_batch(self, texts: List[str]):
        fast = getattr(self._tok, "encode_batch_fast", None)  # tokenizers >= 0.20: no offsets computed
        if fast is not None:
            return fast(texts, add_special_tokens=True)
        return self._tok.encode_batch(texts, add_special_tokens=True)  # pragma: no cover - older tokenizers

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        if not isinstance(texts, list):
            texts = list(texts)
        return [e.ids for e in self._encode_batch(texts)]

    def tokenize_batch_flat(self, texts: Sequence[str], append_eod: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        if not isinstance(texts, list):
            texts = list(texts)
        batch = [e.ids for e in self._encode_batch(texts)]
        lengths = np.fromiter(map(len, batch), dtype=np.int64, count=len(batch))
        total = int(lengths.sum())
        tokens = (np.fromiter((t for ids in batch for t in ids), dtype=np.int32, count=total)
                  if total else np.zeros(0, dtype=np.int32))
        if append_eod and not self._ends_with_eod:
            return append_eod_flat(tokens, lengths, self.eod)
        return tokens, lengths

    def detokenize(self, ids: Iterable[int]) -> str:
        ids = ids_to_list(ids)
        for i in ids:
            if i < 0 or i >= self._vocab_size:
                raise ValueError(f"huggingface tokenizer: token id {i} is out of range [0, {self._vocab_size})")
        return self._tok.decode(ids, skip_special_tokens=True)


__all__ = ["HF_TOKENIZER_FILES", "HuggingFaceTokenizer", "TOKENIZER_JSON", "hf_tokenizer_files"]
