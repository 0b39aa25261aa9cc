"""int8 linears through torchao, the one module that imports it (lazily, inside the functions).

torchao's ``quantize_`` swaps each ``nn.Linear`` weight for an ``Int8Tensor`` subclass:

* ``w8a8``: ``Int8DynamicActivationInt8WeightConfig`` - weights int8 per output channel, activations
  quantised per token at run time; the product is ``torch._int_mm`` (int8 x int8 -> int32, or
  uint8 x int8 on AVX512-VNNI CPUs without AMX), which the op counter sees as int8 work;
* ``weight-only``: ``Int8WeightOnlyConfig`` - int8 weights, dequantised for a float matmul on CPU
  (the counter sees a float32 ``mm``: weight-only int8 saves memory, not arithmetic).

torchao 0.18 has no ``quantize_`` path for ``nn.Conv2d`` (``Int8Tensor`` refuses a 4-D weight:
"shape '[64, 32, 1, 1]' is invalid"); its conv path is PT2E (``prepare_pt2e``/``convert_pt2e``
with ``X86InductorQuantizer``, then ``torch.compile``), whose int8 kernels exist only inside the
compiled graph, where the project's op counter cannot see them. So convolutions stay float here
and the record lists them (see the README, "int8").
"""

from __future__ import annotations

from torch import nn

#: ``int8:mode=...`` -> the torchao config class.
CONFIGS = {"w8a8": "Int8DynamicActivationInt8WeightConfig", "weight-only": "Int8WeightOnlyConfig"}


def torchao_version() -> str:
    import torchao

    return torchao.__version__


def quantize_linears_(denoiser: nn.Module, mode: str, names: list[str]) -> str:
    """Quantise the ``nn.Linear`` modules called ``names`` of ``denoiser`` in place with torchao.

    Args:
        denoiser: The float denoiser.
        mode: ``w8a8`` or ``weight-only`` (a key of :data:`CONFIGS`).
        names: Qualified names of the linears to quantise (others are left as they are).

    Returns:
        The config as torchao prints it (recorded with the library's version).
    """
    import torchao.quantization as tq

    config = getattr(tq, CONFIGS[mode])()
    chosen = set(names)
    tq.quantize_(denoiser, config, filter_fn=lambda module, fqn: isinstance(module, nn.Linear) and fqn in chosen)
    return repr(config)
