"""``un0-bench train TARGET`` reproduces the shipped weights file bit for bit (at the shipped thread count).

The safetensors files carry no metadata (duration, commit and energy live in the JSON beside them),
so a file's SHA-256 is the identity of its tensors. The cheap target runs in ``make test``; the
others take minutes each and are marked slow (``pytest -m slow tests/training/test_reproduce.py``).
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file
from un0_bench.backbones.digits import WEIGHTS_DIR
from un0_bench.harness.registry import TRAINERS
from un0_bench.harness.weights import derivation

import un0_bench.catalog  # noqa: F401  (registers the training targets)

#: The shipped files were trained with OMP_NUM_THREADS=2 (README, "Quick start"); float rounding follows
#: the thread count, so the same seed gives the same bits only at the same count.
SHIPPED_THREADS = 2

#: Target -> the shipped files it writes (``sd-distilled`` writes both students beside its ``--out``).
FILES = {"teacher": ["teacher"], "judge": ["judge"], "sd-int8": ["sd-int8"], "sd-pruned": ["sd-pruned"],
         "sd-distilled": ["sd-distilled-4", "sd-distilled-1"], "un0": ["un0"], "un0-osc": ["un0-osc"]}
OUT = {"sd-distilled": "sd-distilled"}  # the --out the target is given (its files are derived from it)


def _as_loaded(meta: dict) -> dict:
    """A file's config as its loader reads it: fields added since the file was made take their defaults.

    (``un0-osc`` gained ``num_classes``, ``image_channels`` and ``decoder_upsamples`` after it shipped;
    its generator loads the shipped config with ``OscillatorConfig(**config)``.)
    """
    if meta["kind"] == "digits-un0-osc":
        from un0_bench.un0_impl.oscillator import OscillatorConfig

        return OscillatorConfig(**meta["config"]).to_dict()
    return meta["config"]


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _reproduce(target: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(derivation, "_TRAINING_METERS", ("wall",))  # the whole-host meters add seconds, no bits
    before = torch.get_num_threads()
    torch.set_num_threads(SHIPPED_THREADS)
    try:
        TRAINERS.get(target)(out=tmp_path / f"{OUT.get(target, FILES[target][0])}.safetensors")
    finally:
        torch.set_num_threads(before)
    for name in FILES[target]:
        made, shipped = tmp_path / f"{name}.safetensors", WEIGHTS_DIR / f"{name}.safetensors"
        if _sha256(made) != _sha256(shipped):
            a, b = load_file(str(made)), load_file(str(shipped))
            differ = sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k]))
            pytest.fail(f"{name}: {len(differ)} of {len(b)} tensors differ from the shipped file (first: {differ[:3]})")
        made_meta = json.loads(made.with_suffix(".json").read_text())
        shipped_meta = json.loads(shipped.with_suffix(".json").read_text())
        assert (_as_loaded(made_meta), made_meta["kind"]) == (_as_loaded(shipped_meta), shipped_meta["kind"])


def test_sd_int8_calibration_reproduces_the_shipped_file(tmp_path, monkeypatch):
    # ~25 s on two quiet cores: 100 calibration batches of 64 digits through the teacher.
    _reproduce("sd-int8", tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["sd-pruned", "sd-distilled", "un0", "un0-osc", "teacher", "judge"])
def test_training_reproduces_the_shipped_file(target, tmp_path, monkeypatch):
    # Minutes each (the shipped runs took 82 s to 1,077 s), plus the teacher pairs of the students when
    # they are not cached yet.
    _reproduce(target, tmp_path, monkeypatch)
