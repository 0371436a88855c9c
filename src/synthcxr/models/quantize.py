"""A quantized frozen base for LoRA (QLoRA): the denoiser's Linear layers as bitsandbytes 4-bit NF4.

This is what diffusers' Flux QLoRA example does with `BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=bf16)` (every `nn.Linear` of the transformer, no double
quantization), done here on the loaded module so that it works for every family, every model source
(folder, single file, hub id) and on the CPU, where diffusers' loader refuses to quantize. Weights are
quantized as they move to the training device, one layer at a time, so the GPU never holds the 16-bit
base. Adapters are added afterwards and train in fp32 (masters) on top of the frozen 4-bit weights; the
exported LoRA applies to the unquantized base, as with diffusers' example.
"""

from __future__ import annotations

from typing import Any

from synthcxr.errors import ConfigError, ModelError

QUANT_TYPES = ("nf4",)
"""`model.quantize` values besides "none"."""


def check_quantize_config(cfg: Any) -> None:
    """Refuse a quantized base with any training of whole weights, text encoders or non-LoRA adapters."""
    if cfg.model.quantize == "none":
        return
    name = cfg.method.name
    if name in ("full", "dreambooth"):
        raise ConfigError(f"model.quantize={cfg.model.quantize}: method {name} trains whole weights, which cannot "
                          "be 4-bit (a quantized base is frozen; only LoRA adapters train on top of it)",
                          fix="set method.name=lora (DreamBooth-LoRA: also method.prompts=instance) or remove "
                              "model.quantize")
    if name != "lora":
        raise ConfigError(f"model.quantize={cfg.model.quantize} carries LoRA adapters only (peft has no 4-bit "
                          f"version of {name})", fix="set method.name=lora or remove model.quantize")
    if cfg.method.train_text_encoder:
        raise ConfigError(f"model.quantize={cfg.model.quantize} quantizes the denoiser only; training a text encoder "
                          "beside it is not supported", fix="set method.train_text_encoder=false or remove "
                                                            "model.quantize")


def _probe_4bit(device: Any) -> None:
    """One tiny NF4 layer forward and backward on `device` (raises where bitsandbytes cannot run it)."""
    import bitsandbytes as bnb
    import torch

    layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, compress_statistics=False, quant_type="nf4")
    layer = layer.to(device)
    x = torch.ones(2, 64, device=device, requires_grad=True)
    layer(x).sum().backward()
    if x.grad is None or not bool(torch.isfinite(x.grad).all()):
        raise RuntimeError("the 4-bit layer gave no finite gradient")


def check_quantization_runs(kind: str, device: Any) -> None:
    """Fail at once, naming the reason, where bitsandbytes cannot run `kind` layers on `device`."""
    if kind == "none":
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ModelError(f"model.quantize={kind} needs bitsandbytes, which cannot be imported here: {exc}",
                         fix="install the project's bitsandbytes (pip install -c constraints.txt bitsandbytes) "
                             "or remove model.quantize") from exc
    try:
        _probe_4bit(device)
    except Exception as exc:  # bitsandbytes raises many types for a missing kernel or backend
        raise ModelError(f"model.quantize={kind}: bitsandbytes cannot run 4-bit layers on {device}: {exc}",
                         fix="train on a machine whose GPU (or CPU) bitsandbytes supports, or remove "
                             "model.quantize (the base then stays in the mixed-precision dtype)") from exc


def quantize_linear_layers(module: Any, kind: str, device: Any, compute_dtype: Any) -> int:
    """Replace every `nn.Linear` under `module` by a frozen bitsandbytes 4-bit layer quantized on `device`;
    return how many were replaced. Call before adapters are added."""
    import bitsandbytes as bnb
    import torch

    count = 0
    for name, child in list(module.named_modules()):
        if type(child) is not torch.nn.Linear:
            continue
        layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=False, quant_type=kind,
                                  device="meta")
        layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=False,
                                         quant_type=kind, module=layer)
        if child.bias is not None:
            layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
        layer.to(device)  # quantizes the weight on the device (the 16/32-bit copy is then freed)
        parent, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, attr, layer)
        count += 1
    module.requires_grad_(False)
    return count


def base_parameter_count(module: Any) -> int:
    """Parameters of `module` without adapters, counting a 4-bit weight by its original shape (not its packing)."""
    import math

    total = 0
    for name, param in module.named_parameters():
        if "lora_" in name:
            continue
        state = getattr(param, "quant_state", None)
        total += math.prod(state.shape) if state is not None else param.numel()
    return total
