"""The built-in English corpus used when ``model.data.data_prefix`` is empty.

It is made only of text that ships with every CPython install, so training works with no
download and no data of one's own:

* ``pydoc_data.topics.topics`` -- the ``help()`` topics (~0.5 MB), one document per topic,
  in sorted topic order;
* the docstrings (module, class, function, method) of a fixed list of standard-library
  modules, one document per docstring;

deduplicated, and put in a fixed pseudo-random order (so each train/valid/test range of
documents mixes both sources).

Docstrings are read from the modules' *source files* with :mod:`ast` (nothing is imported,
so nothing runs, and it also works under ``python -OO``). Only when a source file is not
installed is the module imported (the list holds only side-effect-free modules) and its
docstrings are taken from the live objects. The result is deterministic for a given Python
install; with the byte tokenizer it is ~1.5 M tokens, enough for a tiny GPT to train a few
hundred steps without repeating much.

The corpus is tokenized once and cached as a Megatron ``.bin``/``.idx`` pair (written with
megatron-core's ``IndexedDatasetBuilder``, ``eod`` after every document) under
``$XDG_CACHE_HOME/megatron_ext/default_corpus`` (``~/.cache/...`` without XDG_CACHE_HOME),
in a file named by the Python version and a hash of the tokenizer's ``unique_identifiers``.
Files are written under temporary names and renamed into place (``.bin``, then ``.idx``, then
the ``.json`` manifest that marks the pair complete), so a crash never leaves a half corpus
that a later run would use; concurrent builders serialize on a lock file where the
filesystem supports ``flock`` and are still correct (identical output, atomic renames)
where it does not.
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib
import inspect
import json
import logging
import os
import platform
import sys
import sysconfig
import uuid
from typing import Iterator, List, Optional, Tuple

import numpy as np

from megatron_ext.errors import DataError

logger = logging.getLogger(__name__)

#: bump when the recipe below changes, so old caches are not reused
CORPUS_VERSION = 1

#: seed of the fixed document order
CORPUS_SEED = 20240601

#: minimum docstring length (characters) worth a document of its own
MIN_DOC_CHARS = 20

#: standard-library modules whose docstrings make up the corpus (paths relative to the
#: stdlib directory, without ``.py``). All are pure Python and free of import side effects.
STDLIB_MODULES: Tuple[str, ...] = (
    "_pydecimal", "abc", "argparse", "ast", "asyncio/base_events", "asyncio/events",
    "asyncio/streams", "asyncio/tasks", "base64", "bdb", "bisect", "calendar", "cmd", "code",
    "codecs", "collections/__init__", "colorsys", "concurrent/futures/_base",
    "concurrent/futures/process", "configparser", "contextlib", "copy", "copyreg", "csv",
    "ctypes/__init__", "dataclasses", "datetime", "difflib", "dis", "doctest",
    "email/_header_value_parser", "email/headerregistry", "email/message", "email/parser",
    "email/utils", "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools",
    "getopt", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html/__init__",
    "html/parser", "http/client", "http/cookiejar", "http/server", "imaplib", "importlib/__init__",
    "importlib/metadata/__init__", "inspect", "io", "ipaddress", "json/__init__", "json/decoder",
    "json/encoder", "keyword", "linecache", "locale", "logging/__init__", "logging/handlers",
    "mailbox", "mimetypes", "multiprocessing/managers", "multiprocessing/pool", "ntpath",
    "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pickletools",
    "platform", "plistlib", "poplib", "posixpath", "pprint", "profile", "pstats", "pydoc",
    "queue", "quopri", "random", "re/__init__", "reprlib", "sched", "secrets", "selectors",
    "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver", "sqlite3/__init__", "ssl",
    "statistics", "string", "stringprep", "struct", "subprocess", "symtable", "sysconfig",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "tomllib/_parser",
    "trace", "traceback", "types", "typing", "unittest/case", "unittest/mock", "urllib/parse",
    "urllib/request", "uuid", "warnings", "wave", "weakref", "xml/dom/minidom",
    "xml/etree/ElementTree", "xmlrpc/client", "xmlrpc/server", "zipfile", "zipimport",
    "zoneinfo/_zoneinfo",
)


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/megatron_ext/default_corpus`` (``~/.cache/...`` if unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "megatron_ext", "default_corpus")


# ----------------------------------------------------------------------------- text
def _topic_documents() -> List[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions split pydoc_data out
        logger.warning("pydoc_data is not installed; the default corpus uses docstrings only")
        return []
    return [topics[k] for k in sorted(topics)]


def _source_docstrings(path: str) -> List[str]:
    with open(path, "r", encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    out = []
    for node in ast.walk(tree):  # breadth-first, deterministic
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                out.append(doc)
    return out


def _imported_docstrings(relname: str) -> List[str]:
    modname = relname.replace("/", ".")
    if modname.endswith(".__init__"):
        modname = modname[: -len(".__init__")]
    try:
        module = importlib.import_module(modname)
    except Exception:  # noqa: BLE001 - a module this install lacks is simply skipped
        return []
    out = []
    if module.__doc__:
        out.append(inspect.cleandoc(module.__doc__))
    for _, obj in sorted(vars(module).items()):
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            if obj.__doc__:
                out.append(inspect.cleandoc(obj.__doc__))
            if inspect.isclass(obj):
                for _, member in sorted(vars(obj).items()):
                    if inspect.isfunction(member) and member.__doc__:
                        out.append(inspect.cleandoc(member.__doc__))
    return out


def _docstring_documents() -> Tuple[List[str], int]:
    stdlib = sysconfig.get_paths()["stdlib"]
    docs, imported = [], 0
    for rel in STDLIB_MODULES:
        path = os.path.join(stdlib, *rel.split("/")) + ".py"
        if os.path.isfile(path):
            docs.extend(_source_docstrings(path))
        else:
            imported += 1
            docs.extend(_imported_docstrings(rel))
    return docs, imported


def corpus_documents() -> List[str]:
    """The documents of the corpus (deduplicated, non-trivial), in a fixed pseudo-random order.

    The order is a fixed permutation (``numpy.random.RandomState(CORPUS_SEED)``, whose stream
    numpy keeps stable across versions) so that the contiguous train/valid/test document
    ranges of ``splits_string`` each mix help topics and docstrings of all modules.
    """
    docs = list(_unique_documents())
    order = np.random.RandomState(CORPUS_SEED).permutation(len(docs))
    return [docs[i] for i in order]


def _unique_documents() -> Iterator[str]:
    seen = set()
    docstrings, imported = _docstring_documents()
    if imported:
        logger.info("default corpus: %d stdlib sources not installed; used their docstrings via import",
                    imported)
    for doc in _topic_documents() + docstrings:
        doc = doc.strip()
        if len(doc) < MIN_DOC_CHARS or doc in seen:
            continue
        seen.add(doc)
        yield doc


# ---------------------------------------------------------------------------- cache
def corpus_key(tokenizer) -> dict:
    """Everything the cached files depend on."""
    return {
        "corpus_version": CORPUS_VERSION,
        "python": f"{platform.python_implementation()}-{platform.python_version()}",
        "python_build": " ".join(platform.python_build()),
        "stdlib": sysconfig.get_paths()["stdlib"],
        "tokenizer": json.loads(json.dumps(tokenizer.unique_identifiers, default=str)),
    }


def corpus_prefix(tokenizer, cache_dir: Optional[str] = None) -> str:
    """The dataset prefix the corpus for ``tokenizer`` has (or will have) in ``cache_dir``."""
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    key = corpus_key(tokenizer)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    name = str(getattr(tokenizer, "name", "tok")).replace(os.sep, "_")
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return os.path.join(cache_dir, f"stdlib_docs_{py}_{name}_{digest}")


def _manifest_path(prefix: str) -> str:
    return prefix + ".json"


def read_manifest(prefix: str) -> Optional[dict]:
    """The manifest of a complete corpus at ``prefix``, or None if it is absent/incomplete."""
    path = _manifest_path(prefix)
    try:
        with open(path, "r", encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            return None
    if os.path.getsize(prefix + ".bin") != manifest.get("bin_bytes"):
        return None
    if os.path.getsize(prefix + ".idx") != manifest.get("idx_bytes"):
        return None
    return manifest


@contextlib.contextmanager
def _file_lock(path: str):
    """An exclusive ``flock`` on ``path`` where the filesystem supports it; a no-op elsewhere."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError:  # e.g. some network filesystems; renames keep us correct anyway
            pass
        yield
    finally:
        f.close()  # releases the lock


def _write_corpus(tokenizer, prefix: str) -> dict:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    docs = corpus_documents()
    if not docs:
        raise RuntimeError("the default corpus is empty: this Python install has no stdlib sources or docs")
    flat = getattr(tokenizer, "tokenize_batch_flat", None)
    if flat is not None:
        tokens, lengths = flat(docs, append_eod=True)
    else:
        batch = tokenizer.tokenize_batch(docs)
        lengths = np.asarray([len(ids) + 1 for ids in batch], dtype=np.int64)
        tokens = np.fromiter(
            (t for ids in batch for t in list(ids) + [tokenizer.eod]), dtype=np.int64, count=int(lengths.sum())
        )
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= tokenizer.vocab_size):
        raise RuntimeError(f"tokenizer {tokenizer.name!r} produced ids outside [0, {tokenizer.vocab_size})")
    tokens = tokens.astype(dtype, copy=False)

    tmp = f"{prefix}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_files = [tmp + ".bin", tmp + ".idx", tmp + ".json"]
    try:
        builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        for i in range(len(lengths)):
            builder.add_document(tokens[offsets[i] : offsets[i + 1]], [int(lengths[i])])
        builder.finalize(tmp + ".idx")
        manifest = {
            "key": corpus_key(tokenizer),
            "documents": int(len(lengths)),
            "tokens": int(lengths.sum()),
            "dtype": np.dtype(dtype).name,
            "bin_bytes": os.path.getsize(tmp + ".bin"),
            "idx_bytes": os.path.getsize(tmp + ".idx"),
        }
        with open(tmp + ".json", "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        for src in tmp_files[:2]:
            with open(src, "rb") as f:
                os.fsync(f.fileno())
        # .bin first, .idx next, the manifest last: the manifest means "complete"
        os.replace(tmp + ".bin", prefix + ".bin")
        os.replace(tmp + ".idx", prefix + ".idx")
        os.replace(tmp + ".json", _manifest_path(prefix))
    finally:
        for path in tmp_files:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    return manifest


def ensure_default_corpus(tokenizer, cache_dir: Optional[str] = None) -> str:
    """Build (once) and return the dataset prefix of the built-in corpus for ``tokenizer``.

    ``cache_dir`` defaults to :func:`default_cache_dir`. Safe to call from several processes
    at once; later calls reuse the cached files without rebuilding.
    """
    prefix = corpus_prefix(tokenizer, cache_dir)
    directory = os.path.dirname(prefix)
    manifest = read_manifest(prefix)
    if manifest is None:
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as err:
            raise DataError(
                f"cannot create the default-corpus cache directory {directory}: {err}; set "
                f"model.data.default_corpus_dir (or XDG_CACHE_HOME) to a writable directory"
            ) from err
        try:
            with _file_lock(prefix + ".lock"):
                manifest = read_manifest(prefix)  # another process may have finished meanwhile
                if manifest is None:
                    logger.info("building the default corpus at %s", prefix)
                    manifest = _write_corpus(tokenizer, prefix)
                    logger.info(
                        "default corpus built: %d documents, %d tokens (%s) at %s",
                        manifest["documents"], manifest["tokens"], tokenizer.name, prefix,
                    )
                    return prefix
        except PermissionError as err:
            raise DataError(
                f"cannot write the default corpus to {directory}: {err}; set model.data.default_corpus_dir "
                f"(or XDG_CACHE_HOME) to a writable directory"
            ) from err
    logger.info(
        "default corpus: %d documents, %d tokens (%s) at %s (cached)",
        manifest["documents"], manifest["tokens"], tokenizer.name, prefix,
    )
    return prefix
