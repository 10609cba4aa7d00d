"""megatron_ext.checkpoint.manifest on a plain directory (no training): what the manifest lists, what verify
refuses, and how ranks share the checksums. The same checks on real checkpoints, through resume and the offline
readers: tests/integration/test_bad_inputs.py (section 11c) and test_convert_checkpoint.py (several ranks)."""
import hashlib
import json
import os

import pytest

from megatron_ext.checkpoint import manifest
from megatron_ext.errors import CorruptCheckpointError

META = {"step": 7, "consumed_samples": 14, "tp": 2, "pp": 1, "dp": 1, "zero_stage": 0, "precision": "32",
        "world_size": 2, "model_config": {"num_layers": 2, "optim": {"lr": 1e-3}}, "manifest": "manifest.json"}


def _checkpoint(root):
    """A checkpoint-like directory: two ranks' files (reported), meta.json, one file in a subdirectory that no
    rank reported. Returns the written manifest."""
    root.mkdir()
    (root / "sub").mkdir()
    files = {"a_rank0.pt": b"A" * 1000, "b_rank1.pt": b"B" * 2000, "c_rank0.pt": b"C" * 10, "d_rank1.pt": b"D",
             "sub/other_writer.bin": b"hook"}
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    (root / "meta.json").write_text(json.dumps(META))
    reported = {**manifest.describe(str(root), [str(root / "a_rank0.pt"), str(root / "c_rank0.pt"),
                                                str(root / "meta.json")]),
                **manifest.describe(str(root), [str(root / "b_rank1.pt"), str(root / "d_rank1.pt")])}
    man = manifest.build(str(root), reported, META)
    manifest.write(str(root), man)
    return man


def test_manifest_lists_every_file_whoever_wrote_it(tmp_path):
    root = tmp_path / "step_0000007"
    man = _checkpoint(root)
    assert sorted(man["files"]) == ["a_rank0.pt", "b_rank1.pt", "c_rank0.pt", "d_rank1.pt", "meta.json",
                                    "sub/other_writer.bin"]
    for rel, e in man["files"].items():
        data = (root / rel).read_bytes()
        assert e == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert (man["step"], man["consumed_samples"]) == (7, 14)
    assert man["layout"] == {"tp": 2, "pp": 1, "dp": 1, "zero_stage": 0, "precision": "32", "world_size": 2}
    assert man["config_hash"] == manifest.config_hash({"optim": {"lr": 1e-3}, "num_layers": 2})  # key order free
    assert man["config_hash"] != manifest.config_hash({"num_layers": 2, "optim": {"lr": 3e-4}})
    assert json.loads((root / "manifest.json").read_text()) == man
    assert not [p for p in os.listdir(root) if ".tmp." in p]
    assert manifest.verify(str(root), META) == man


def test_build_refuses_a_reported_file_that_changed(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    (root / "x.pt").write_bytes(b"1234")
    reported = manifest.describe(str(root), [str(root / "x.pt")])
    (root / "x.pt").write_bytes(b"12")
    with pytest.raises(OSError, match=r"x\.pt changed size after it was written \(4 -> 2 bytes\)"):
        manifest.build(str(root), reported, META)


def _flip(path, at=0):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("defect,named,why", [
    ("flip", "b_rank1.pt", "is corrupt: its sha256"),
    ("truncate", "a_rank0.pt", "is truncated or altered: 500 bytes, the manifest says 1000"),
    ("remove", "sub/other_writer.bin", "is missing (listed in"),
    ("add", "zz_new.pt", "is not listed in"),
    ("manifest gone", "manifest.json", "is missing (meta.json says"),
    ("manifest garbage", "manifest.json", "is corrupt or tampered"),
    ("manifest step", "manifest.json", "does not match"),
])
def test_verify_names_the_bad_file(tmp_path, defect, named, why):
    root = tmp_path / "step_0000007"
    _checkpoint(root)
    p = root / named
    if defect == "flip":
        _flip(p, 1000)
    elif defect == "truncate":
        p.write_bytes(p.read_bytes()[:500])
    elif defect in ("remove", "manifest gone"):
        p.unlink()
    elif defect == "add":
        p.write_bytes(b"x")
    elif defect == "manifest garbage":
        p.write_text('{"format": "megatron_ext.manifest.v1", "files": {"/etc/passwd": ')
    else:
        man = json.loads(p.read_text())
        man["step"] = 8
        p.write_text(json.dumps(man))
    with pytest.raises(CorruptCheckpointError) as e:
        manifest.verify(str(root), META)
    assert str(e.value).startswith(f"{p} {why}"), str(e.value)


def test_verify_without_checksums_checks_sizes_only(tmp_path):
    root = tmp_path / "s"
    _checkpoint(root)
    _flip(root / "a_rank0.pt", 10)
    assert manifest.verify(str(root), META, checksums=False)["step"] == 7
    with pytest.raises(CorruptCheckpointError, match="a_rank0.pt is corrupt"):
        manifest.verify(str(root), META)


def test_ranks_share_the_checksums_and_together_cover_every_file(tmp_path):
    """Sorted names a_rank0, b_rank1, c_rank0, d_rank1, meta.json, sub/...: rank 0 of 2 hashes indices 0, 2, 4."""
    root = tmp_path / "r"
    _checkpoint(root)
    _flip(root / "b_rank1.pt", 5)  # index 1: rank 1's share
    assert manifest.verify(str(root), META, rank=0, world=2) is not None
    with pytest.raises(CorruptCheckpointError, match="b_rank1.pt is corrupt"):
        manifest.verify(str(root), META, rank=1, world=2)


def test_checkpoint_without_manifest_is_legacy(tmp_path):
    root = tmp_path / "old"
    root.mkdir()
    old_meta = {k: v for k, v in META.items() if k != "manifest"}
    assert manifest.verify(str(root), old_meta) is None


def test_removing_the_manifest_key_from_meta_does_not_skip_verification(tmp_path):
    root = tmp_path / "step_0000007"
    _checkpoint(root)
    old_meta = {k: v for k, v in META.items() if k != "manifest"}
    (root / "meta.json").write_text(json.dumps(old_meta))  # passes as legacy only if the manifest is ignored
    with pytest.raises(CorruptCheckpointError, match=r"meta\.json is truncated or altered"):
        manifest.verify(str(root), old_meta)
