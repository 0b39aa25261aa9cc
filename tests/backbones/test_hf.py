"""un0_bench.backbones.hf: the one module importing diffusers/transformers; and the one-module rule for every vendor."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from un0_bench.backbones import hf
from un0_bench.harness.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("harness", "backbones", "baselines", "un0_impl", "reports", "un0_bench")

#: Each vendor library and the modules whose import statements name it (one module each, imported lazily).
#: backbones/hf.py imports diffusers and transformers by name through importlib, so no statement
#: anywhere names them.
VENDOR_IMPORTERS = {
    "diffusers": [],
    "transformers": [],
    "pynvml": ["harness/meters/nvml.py"],
    "codecarbon": ["harness/meters/codecarbon.py"],
}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_each_vendor_library_is_imported_in_exactly_its_one_module():
    importers: dict[str, list[str]] = {lib: [] for lib in VENDOR_IMPORTERS}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for lib in _imported_roots(path) & set(VENDOR_IMPORTERS):
                importers[lib].append(path.relative_to(ROOT).as_posix())
    assert importers == VENDOR_IMPORTERS


def test_hf_imports_nothing_at_import_time():
    code = ("import sys, un0_bench.backbones.hf, un0_bench.cli, un0_bench.harness.registry; "
            "print(sorted(m for m in ('diffusers', 'transformers', 'pynvml', 'codecarbon') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_classes_resolve_from_top_level_and_submodules():
    from diffusers import UNet2DModel
    from diffusers.models.attention import FeedForward
    from transformers import CLIPTokenizer

    assert hf.diffusers_class("UNet2DModel") is UNet2DModel
    assert hf.diffusers_class("FeedForward") is FeedForward
    assert hf.transformers_class("CLIPTokenizer") is CLIPTokenizer
    names = {c.__name__ for c in hf.text2image_pipeline_classes()}
    assert "StableDiffusionPipeline" in names
    assert hf.from_pretrained_dtype_key() in ("dtype", "torch_dtype")


def test_unknown_class_is_a_programming_error():
    with pytest.raises(KeyError, match="UNet3DModel"):
        hf.diffusers_class("UNet3DModel")
    with pytest.raises(KeyError, match="BertModel"):
        hf.transformers_class("BertModel")


def test_missing_library_is_one_clear_error(monkeypatch):
    # A None entry in sys.modules makes `import diffusers` raise ImportError, as an absent package would.
    for name in [m for m in sys.modules if m == "diffusers" or m.startswith("diffusers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(UserError, match=r"^diffusers is needed here but cannot be imported .*make install"):
        hf.diffusers_class("UNet2DModel")
