"""Our tokenizers as Hugging Face tokenizer files, checked to give our ids (used by
:mod:`megatron_ext.inference.hf_export`; ``transformers`` / ``tokenizers`` are optional and imported only when an
export runs).

    write_hf_tokenizer(tokenizer, out_dir)                    # tokenizer.json, tokenizer_config.json, ...
    compare_tokenizers(tokenizer, out_dir, texts)             # [(where, text, our ids, HF ids)] that differ

Tokenizer: written as a ``tokenizers`` ``tokenizer.json`` (loaded by ``AutoTokenizer`` as a fast tokenizer,
``tokenizer_class`` ``PreTrainedTokenizerFast``), encoding text to our ids with no special tokens added:

* byte tokenizer: ids 0..255 are the UTF-8 bytes (a byte-level BPE with no merges whose 256 symbols have id =
  byte value), 256 ``<eod>``, 257 ``<pad>``, 258 ``<bos>`` as special tokens. Exact for any text that is valid
  Unicode (a lone surrogate, which our tokenizer passes through with ``surrogatepass``, cannot reach the Rust
  tokenizer at all). ``<eod>`` spelled in text is five bytes, as in ours.
* char tokenizer: one id per character of its list, its special ids as special tokens. Exact for every text ours
  accepts; a character outside the list (ours raises ``DataError``) is silently dropped by the HF tokenizer.
* huggingface (``model.tokenizer.library=huggingface``): the files it was read from (``tokenizer.json``,
  ``tokenizer_config.json``, ``special_tokens_map.json``) are copied as they are; the check below compares ours with
  ``AutoTokenizer``'s defaults (the tokens its post-processor adds included) and with ``add_special_tokens=False``.
* sentencepiece (unigram, bpe, char): the model's pieces and scores, its normalization rules (the precompiled
  charsmap), dummy prefix, whitespace collapsing and byte fallback rebuilt from the ``.model`` proto; the
  ``.model`` file is copied along as ``tokenizer.model``. Text that spells a control, unknown or byte piece
  literally (``</s>``, ``<unk>``, ``<0x41>``) is cut as sentencepiece cuts it: bpe merges never build those
  pieces; in unigram models they get a score no path through known characters loses to, and a run of characters
  that have no piece of their own is cut out before the lattice (it is the unknown id; a control piece spelling
  such a character would otherwise beat it). The unknown id decodes as sentencepiece's `` ⁇ ``. User-defined
  symbols (``--user-defined-symbols``) stay one piece: unigram models get sentencepiece's score bonus for them,
  bpe models cut them out before merging (and then take a word that is a whole vocabulary entry as it is,
  ``ignore_merges``; so a control piece glued to a symbol, ``<mask></s>``, is the one case left that the check
  below refuses). ``word`` models are refused.

Special tokens are never matched in input text, as in ours: ``tokenizer.json`` lists no added tokens (``tokenizers``
would match them anywhere in the text, and its ``encode_special_tokens`` switch is not saved in the file); the
special pieces are in the model's vocabulary with their ids, and ``tokenizer_config.json`` names them
(``added_tokens_decoder``) with ``split_special_tokens: true``, so ``AutoTokenizer`` with its defaults knows them
without matching them either.

Verification: before anything is written, the tokenizer files are loaded back both ways
(``tokenizers.Tokenizer.from_file`` and ``AutoTokenizer.from_pretrained``) and compared with ours on built-in probe
texts and on a sample of up to :data:`VERIFY_LINES` lines of each ``verify_text`` file (default: the text a
sentencepiece model was trained on, its recorded ``trainer_spec.input``, when the files are still there): ids and
decoded text. Any difference raises :class:`TokenizerMismatchError` naming the first differing line and both id
lists; ``allow_tokenizer_mismatch=True`` exports anyway with an ``HFExportWarning`` that counts the lines.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, List, Optional, Sequence, Tuple

from megatron_ext.errors import ConfigError, DataError
from megatron_ext.tokenizers import ByteTokenizer, SentencePieceTokenizer
from megatron_ext.tokenizers.byte import _SPECIALS
from megatron_ext.tokenizers.huggingface import HuggingFaceTokenizer
from megatron_ext.tokenizers.special_tokens import AddedSpecialTokens


def import_transformers():
    """The optional ``transformers`` package, or a ConfigError saying how to install it."""
    try:
        import transformers  # optional: transformers
    except ImportError as e:
        raise ConfigError(f"exporting to Hugging Face needs the optional 'transformers' package, which is not "
                          f"installed ({e}): pip install transformers") from None
    return transformers

#: texts the exported tokenizer is checked on (ours vs. Hugging Face's ids)
PROBE_TEXTS = (
    "Hello world! This is a test.",
    "  leading and trailing spaces   ",
    "multiple   inner    spaces\tand a tab",
    "line one\nline two\r\nline three\n\n",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "numbers 0123456789, 3.14159 and 1,000,000",
    "punctuation: ()[]{}<>!?@#$%^&*_-+=~`|\\/'\";:.,",
    "héllo wörld, naïve café, Ærøskøbing, façade",
    "日本語のテキスト、中文文本",
    "Привет, мир! Ελληνικά. עברית. العربية",
    "emoji: 😀🎉👍🏽 and symbols ∑∫√∞ ™ © ①",
    "full-width ＡＢＣ１２３ and ligature ﬁ",
    "",
    " ",
    "a",
)


#: tokenizer files an export writes (and removes when it writes another kind / none)
TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                             "tokenizer.model"})


#: lines of each verification text file the exported tokenizer is checked on, and how much of a file is read
VERIFY_LINES = 2000
VERIFY_READ_BYTES = 16 << 20


class TokenizerMismatchError(ConfigError):
    """The exported tokenizer would encode some checked text to other ids than the training tokenizer."""


# ---------------------------------------------------------------------------------------------------- helpers
def _byte_backend(tokenizer):
    """``tokenizers.Tokenizer`` for ``ByteTokenizer``: id = byte value; eod/pad/bos after the bytes."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for the bytes (GPT-2's table)
    if len(alphabet) != 256:  # pragma: no cover - fixed by the tokenizers library
        raise ConfigError("tokenizers' ByteLevel alphabet does not have 256 symbols")
    # GPT-2's byte -> character table: printable bytes map to themselves, the others to 256 + k in byte order
    table, extra = {}, 0
    for b in range(256):
        if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    if set(table.values()) != set(alphabet):  # pragma: no cover - guards the table above
        raise ConfigError("tokenizers' ByteLevel alphabet differs from GPT-2's byte table")
    vocab = {table[b]: b for b in range(256)}
    specials = {s: tokenizer.NUM_BYTES + i for i, s in enumerate(_SPECIALS)}
    vocab.update(specials)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    names = {i: s for s, i in specials.items()}
    return tok, {"eos": names[tokenizer.eod], "pad": names[tokenizer.pad], "unk": None,
                 "extra_files": {}}


def _char_backend(tokenizer):
    """``tokenizers.Tokenizer`` for the char tokenizer (``tokenizers/char.py``): one id per character, its special
    ids (``<pad>``, ``<eod>``, ...) as special tokens. A character outside the vocabulary, which ours refuses with an
    error, is dropped by the Hugging Face tokenizer (it has no unknown id to give it)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    inv = dict(tokenizer.inv_vocab)
    if sorted(inv) != list(range(int(tokenizer.vocab_size))):
        raise ConfigError(f"char tokenizer: ids are not 0..{int(tokenizer.vocab_size) - 1}; cannot export it")
    specials = {piece: i for i, piece in inv.items() if len(piece) != 1}
    vocab = {piece: i for i, piece in inv.items()}
    if len(vocab) != len(inv):
        raise ConfigError("char tokenizer: a character appears twice in its vocabulary; cannot export it")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: each character is its own token
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in sorted(specials, key=specials.get)])
    return tok, {"eos": inv[int(tokenizer.eod)], "pad": inv[int(tokenizer.pad)], "unk": None, "extra_files": {}}


def _sp_backend(tokenizer):
    """``tokenizers.Tokenizer`` rebuilt from a sentencepiece model proto (see the module docstring)."""
    from sentencepiece import sentencepiece_model_pb2 as pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    path = tokenizer.model_path
    proto = pb2.ModelProto()
    try:
        proto.ParseFromString(tokenizer.processor.serialized_model_proto())
    except Exception as e:  # pragma: no cover - the processor loaded it already
        raise ConfigError(f"{path}: cannot parse the sentencepiece model proto: {e}") from None
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    kind = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}.get(int(ts.model_type), str(ts.model_type))
    if kind not in ("unigram", "bpe", "char"):
        raise ConfigError(f"{path}: sentencepiece model_type={kind} has no exact Hugging Face tokenizers "
                          f"equivalent; export with a unigram or bpe sentencepiece model")
    NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4  # (5 unused, 6 byte)
    pieces = [(p.piece, float(p.score), int(p.type)) for p in proto.pieces]
    normal_scores = [s for _, s, t in pieces if t == NORMAL] or [0.0]
    min_score, max_score = min(normal_scores), max(normal_scores)
    unk_ids = [i for i, (_, _, t) in enumerate(pieces) if t == UNKNOWN]
    unk_id = unk_ids[0] if unk_ids else None
    byte_fallback = bool(ts.byte_fallback)
    user_symbols = [piece for piece, _, t in pieces if t == USER_DEFINED]

    if kind in ("unigram", "char"):
        # control / unknown / byte pieces stay in the lattice of tokenizers' Unigram (it has no way to leave a piece
        # out), so they get a score no path through known characters can lose to; the unknown-id score (this minimum
        # less 10) moves with it, which changes nothing: every path covers an unknown character with the unknown id
        longest = max((len(piece) for piece, _, t in pieces if t != NORMAL), default=1)
        unreachable = (min_score - 1.0) * 1000.0 * (longest + 1)
        vocab = []
        for piece, score, t in pieces:
            if t == USER_DEFINED:  # sentencepiece gives them a bonus so they are always one piece
                score = len(piece) * max_score + 1.0
            elif t != NORMAL:  # never cut out of text by sentencepiece: never worth a path here (see above)
                score = unreachable
            vocab.append((piece, score))
        model = models.Unigram(vocab, unk_id=unk_id, byte_fallback=byte_fallback)
    else:
        vocab_map = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        # merges in sentencepiece's priority order: the merged piece's score, best first
        ranked = sorted(((s, i, piece) for i, (piece, s, t) in enumerate(pieces) if t in (NORMAL, USER_DEFINED)),
                        key=lambda x: (-x[0], x[1]))
        merges = []
        for _, _, piece in ranked:
            for k in range(1, len(piece)):
                left, right = piece[:k], piece[k:]
                if left in vocab_map and right in vocab_map:
                    merges.append((left, right))
        kwargs = dict(vocab=vocab_map, merges=merges, unk_token=pieces[unk_id][0] if unk_id is not None else None,
                      fuse_unk=True, byte_fallback=byte_fallback, dropout=None)
        try:  # with user-defined symbols: a whole-word symbol comes out as itself
            model = models.BPE(**kwargs, **({"ignore_merges": True} if user_symbols else {}))
        except TypeError:  # tokenizers < 0.19 has no ignore_merges; the probe check reports what differs
            model = models.BPE(**kwargs)
    tok = Tokenizer(model)

    norm = []
    if ns.precompiled_charsmap:
        norm.append(normalizers.Precompiled(ns.precompiled_charsmap))
    if ns.remove_extra_whitespaces:
        norm += [normalizers.Replace(Regex(r"\A +"), ""), normalizers.Replace(Regex(r" +\z"), ""),
                 normalizers.Replace(Regex(" {2,}"), " ")]
    if ns.add_dummy_prefix:
        norm.append(normalizers.Append(" ") if ts.treat_whitespace_as_suffix else normalizers.Prepend(" "))
    if ns.escape_whitespaces:
        norm.append(normalizers.Replace(" ", "\u2581"))
    tok.normalizer = normalizers.Sequence(norm) if norm else None
    pre = []
    if ts.split_by_whitespace and ns.escape_whitespaces:  # pieces never span a "▁" boundary: cut the words apart
        behaviour = "merged_with_previous" if ts.treat_whitespace_as_suffix else "merged_with_next"
        pre.append(pre_tokenizers.Split("\u2581", behavior=behaviour))
    if kind in ("unigram", "char"):
        # a run of characters that have no piece of their own is sentencepiece's unknown id (no normal piece holds
        # such a character): cut it out, so that a control piece spelling it (``</s>`` when ``/`` is unknown) cannot
        # cover it in the lattice -- it would beat the unknown id, whose score is below every piece's. User-defined
        # symbols are cut out whole first (always one piece): their characters may have no piece of their own
        # (``<`` of ``<mask>``), and outside a symbol such a character joins the unknown run, as in sentencepiece
        known = {piece for piece, _, t in pieces if t in (NORMAL, USER_DEFINED) and len(piece) == 1} | {"\u2581"}
        unknown = "[^" + "".join(f"\\x{{{ord(c):x}}}" for c in sorted(known)) + "]"
        pattern = unknown + "+"
        if user_symbols:
            symbols = "|".join(re.escape(u) for u in sorted(user_symbols, key=len, reverse=True))
            pattern = f"{symbols}|(?:(?!{symbols}){unknown})+"
        pre.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    if kind == "bpe" and user_symbols:  # sentencepiece's bpe takes them as whole symbols before merging
        alternatives = "|".join(re.escape(u) for u in sorted(user_symbols, key=len, reverse=True))
        pre.append(pre_tokenizers.Split(Regex(alternatives), behavior="isolated"))
    if pre:
        tok.pre_tokenizer = pre[0] if len(pre) == 1 else pre_tokenizers.Sequence(pre)
    dec = [decoders.Replace("\u2581", " ")] if ns.escape_whitespaces else []
    if byte_fallback:
        dec += [decoders.ByteFallback()]
    dec += [decoders.Fuse()]
    if ns.add_dummy_prefix and ns.escape_whitespaces:
        dec.append(decoders.Strip(" ", 0, 1) if ts.treat_whitespace_as_suffix else decoders.Strip(" ", 1, 0))
    if unk_id is not None:  # sentencepiece decodes the unknown id as " ⁇ " (its unk_surface)
        dec.insert(0, decoders.Replace(pieces[unk_id][0], ts.unk_surface or " \u2047 "))
    tok.decoder = decoders.Sequence(dec)
    specials = [piece for piece, _, t in pieces if t in (CONTROL, UNKNOWN)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok, {"eos": pieces[tokenizer.eod][0], "pad": pieces[tokenizer.pad][0],
                 "unk": pieces[unk_id][0] if unk_id is not None else None,
                 "extra_files": {"tokenizer.model": path}}


def build_hf_tokenizer(tokenizer):
    """Our tokenizer -> ``(transformers.PreTrainedTokenizerFast, extra files to copy {name: path})``."""
    transformers = import_transformers()

    if isinstance(tokenizer, AddedSpecialTokens):
        if tokenizer.appended_tokens:
            raise ConfigError(f"the tokenizer has added special tokens {tokenizer.appended_tokens} (BART's mask): "
                              f"only plain GPT tokenizers are exported")
        tokenizer = tokenizer.base
    if isinstance(tokenizer, ByteTokenizer):
        backend, info = _byte_backend(tokenizer)
    elif isinstance(tokenizer, SentencePieceTokenizer):
        backend, info = _sp_backend(tokenizer)
    elif getattr(tokenizer, "name", None) == "char" and hasattr(tokenizer, "chars"):
        backend, info = _char_backend(tokenizer)
    else:
        raise ConfigError(f"model.tokenizer.library={getattr(tokenizer, 'name', type(tokenizer).__name__)!r}: no "
                          f"Hugging Face export for this tokenizer (byte, char and sentencepiece are supported)")
    eos = info["eos"]
    kwargs = dict(tokenizer_object=backend, bos_token=eos, eos_token=eos, pad_token=info["pad"],
                  split_special_tokens=True, clean_up_tokenization_spaces=False, add_prefix_space=None)
    if info["unk"] is not None:
        kwargs["unk_token"] = info["unk"]
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    fast = transformers.PreTrainedTokenizerFast(**kwargs)
    return fast, info["extra_files"]


def write_hf_tokenizer(tokenizer, out_dir: str, model_max_length: Optional[int] = None) -> List[str]:
    """Write our tokenizer as Hugging Face files into ``out_dir``; returns the file names written.

    ``tokenizer.json`` lists no added tokens: ``tokenizers`` matches an added token anywhere in the input text and
    cannot be told otherwise from the file (its ``encode_special_tokens`` switch is not saved), while ours never
    cuts a special piece out of text. The special pieces stay in the model's vocabulary (so ``token_to_id`` and
    decoding know them) and ``tokenizer_config.json`` names them with ``split_special_tokens: true``, so
    ``AutoTokenizer`` knows them as special tokens without matching them in text either."""
    base = tokenizer.base if isinstance(tokenizer, AddedSpecialTokens) else tokenizer
    if isinstance(base, HuggingFaceTokenizer):
        if isinstance(tokenizer, AddedSpecialTokens) and tokenizer.appended_tokens:
            raise ConfigError(f"the tokenizer has added special tokens {tokenizer.appended_tokens} (BART's mask): "
                              f"only plain GPT tokenizers are exported")
        # the files it was read from, as they are: AutoTokenizer reads them as training did
        os.makedirs(out_dir, exist_ok=True)
        for src in base.files:
            shutil.copyfile(src, os.path.join(out_dir, os.path.basename(src)))
        return [n for n in sorted(TOKENIZER_FILES) if os.path.isfile(os.path.join(out_dir, n))]
    hf_tok, extra_files = build_hf_tokenizer(tokenizer)
    if model_max_length is not None:
        hf_tok.model_max_length = int(model_max_length)
    os.makedirs(out_dir, exist_ok=True)
    hf_tok.save_pretrained(out_dir)
    p = os.path.join(out_dir, "tokenizer.json")
    with open(p, encoding="utf-8") as f:
        spec = json.load(f)
    specials = sorted((t["id"], t["content"]) for t in spec.get("added_tokens", []) if t.get("special"))
    spec["added_tokens"] = []
    _portable_tokenizer_config(out_dir, specials)
    with open(p, "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)
    for name, src in extra_files.items():
        shutil.copyfile(src, os.path.join(out_dir, name))
    return [n for n in sorted(TOKENIZER_FILES) if os.path.isfile(os.path.join(out_dir, n))]


def compare_tokenizers(ours, hf_dir: str, texts: Sequence[Any]) -> List[Tuple[str, str, List[int], List[int]]]:
    """Check the tokenizer files in ``hf_dir`` against ours: ``(where, text, our ids, Hugging Face ids)`` for every
    text that ``tokenizers.Tokenizer.from_file(tokenizer.json).encode`` or ``AutoTokenizer.from_pretrained(hf_dir)``
    (both with their defaults, no special tokens added) encodes differently, or whose ids either decodes to another
    string than ours. ``texts``: strings or ``(where, text)`` pairs. Texts ours refuses (the char tokenizer's
    unknown characters) are skipped."""
    from tokenizers import Tokenizer as RawTokenizer

    transformers = import_transformers()
    raw = RawTokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(hf_dir)
    auto.model_max_length = 1 << 40  # no warning about lines longer than the model's context
    base = ours.base if isinstance(ours, AddedSpecialTokens) else ours
    if isinstance(base, HuggingFaceTokenizer):
        return _compare_hf(ours, auto, texts)
    bad = []
    for i, item in enumerate(texts):
        where, t = item if isinstance(item, tuple) else (f"text {i + 1}", item)
        try:
            a = list(ours.tokenize(t))
            text_back = ours.detokenize(a)
        except DataError:
            continue
        b = list(raw.encode(t, add_special_tokens=False).ids)
        c = list(auto(t, add_special_tokens=False)["input_ids"])
        if b != a or c != a:
            bad.append((where, t, a, b if b != a else c))
        elif raw.decode(a) != text_back or auto.decode(a) != text_back:
            bad.append((where, t, a, a))  # the same ids, another decoded text
    return bad


def _compare_hf(ours, auto, texts) -> List[Tuple[str, str, List[int], List[int]]]:
    """A Hugging Face tokenizer against ``AutoTokenizer`` on its own files: ``auto(text)["input_ids"]`` (with the
    tokens its post-processor adds) and with ``add_special_tokens=False``, and the decoded text (special tokens
    skipped)."""
    bad = []
    for i, item in enumerate(texts):
        where, t = item if isinstance(item, tuple) else (f"text {i + 1}", item)
        a, a_plain = list(ours.tokenize(t)), list(ours.tokenize_plain(t))
        b, b_plain = list(auto(t)["input_ids"]), list(auto(t, add_special_tokens=False)["input_ids"])
        if a != b or a_plain != b_plain:
            bad.append((where, t, a, b) if a != b else (where, t, a_plain, b_plain))
        elif auto.decode(a, skip_special_tokens=True) != ours.detokenize(a):
            bad.append((where, t, a, a))
    return bad


def training_text_files(tokenizer) -> List[str]:
    """The text a tokenizer was trained on, where it records it and the files are still there: a sentencepiece
    model's ``trainer_spec.input`` (the ``--input`` of ``tools/train_tokenizer.py``). Other tokenizers record none
    (the run's ``model.data.data_prefix`` is token ids, not text): give ``verify_text``."""
    sp = getattr(tokenizer, "processor", None)
    if sp is None:
        return []
    from sentencepiece import sentencepiece_model_pb2 as pb2

    proto = pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    return [p for p in proto.trainer_spec.input if os.path.isfile(p)]


def sample_lines(path: str, max_lines: int = 0) -> List[Tuple[str, str]]:
    """``(path:line, text)`` for up to ``max_lines`` lines spread evenly over a text file (all when 0). A file
    larger than :data:`VERIFY_READ_BYTES` is sampled from that many bytes spread over it (``path@byte``)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if size <= VERIFY_READ_BYTES:
                found = [(f"{path}:{i + 1}", line) for i, line in enumerate(f.read().split(b"\n"))]
            else:
                found, chunks = [], 64
                for k in range(chunks):
                    off = k * (size // chunks)
                    f.seek(off)
                    block = f.read(VERIFY_READ_BYTES // chunks).split(b"\n")[1:-1]  # whole lines only
                    found += [(f"{path}@byte {off}", line) for line in block]
    except OSError as e:
        raise DataError(f"--verify-text {path}: cannot read it ({e.strerror or e}); expected a text file") from None
    out = []
    for where, line in found:
        try:
            text = line.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            raise DataError(f"--verify-text {where}: not UTF-8 text") from None
        if text.strip():
            out.append((where, text))
    if max_lines and len(out) > max_lines:
        step = len(out) / max_lines
        out = [out[int(i * step)] for i in range(max_lines)]
    return out


def symbol_probes(tokenizer) -> List[str]:
    """Probe texts around each sentencepiece user-defined symbol (always one piece in sentencepiece)."""
    sp = getattr(tokenizer, "processor", None)
    if sp is None:
        return []
    from sentencepiece import sentencepiece_model_pb2 as pb2

    proto = pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    out = []
    for p in proto.pieces:
        if int(p.type) == 4:  # USER_DEFINED
            out += [f"a{p.piece}b", f" {p.piece} and {p.piece}"]
    return out


def _portable_tokenizer_config(out_dir: str, specials: Sequence[Tuple[int, str]] = ()) -> None:
    """Name the generic fast-tokenizer class that both transformers 4.x and 5.x resolve, never match special tokens
    in text, and list the special pieces ``(id, piece)`` (``tokenizer.json`` does not, see
    :func:`write_hf_tokenizer`)."""
    p = os.path.join(out_dir, "tokenizer_config.json")
    with open(p) as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["split_special_tokens"] = True  # AutoTokenizer's default for this directory: never match them in text
    if specials:
        cfg["added_tokens_decoder"] = {str(i): {"content": piece, "lstrip": False, "normalized": False,
                                                "rstrip": False, "single_word": False, "special": True}
                                       for i, piece in specials}
    with open(p, "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)


__all__ = ["PROBE_TEXTS", "TOKENIZER_FILES", "VERIFY_LINES", "VERIFY_READ_BYTES", "TokenizerMismatchError", "import_transformers", "build_hf_tokenizer", "write_hf_tokenizer", "compare_tokenizers", "training_text_files", "sample_lines", "symbol_probes"]
