"""The base model's denoiser (and the T5 of SD 3 and FLUX) in 4-bit NF4 or 8-bit, while the LoRA on the
denoiser trains in full precision (QLoRA).

The linear layers inside the denoiser's blocks (where nearly all of its weights are) become
bitsandbytes' own `Linear4bit` / `Linear8bitLt`, quantized here, on the CPU, as they are made;
the LoRA adapters then wrap them like any linear layer (PEFT), and only the adapters train. Embeddings,
norms and the layers before and after the blocks stay as they were. A LoRA trained this way is a
plain LoRA: it loads onto the unquantized base as onto the quantized one.

diffusers' `BitsAndBytesConfig` does the same at load time, but refuses to run without a GPU; these
are the same bitsandbytes layers, so the one path trains on a GPU and is tested on the CPU.
"""

from __future__ import annotations

import torch

BLOCK = 64  # bitsandbytes quantizes each weight row in blocks of this many inputs (every real model's widths divide)


def quantize(model: torch.nn.Module, kind: str, blocks: tuple[str, ...], compute_dtype: torch.dtype) -> int:
    """Replace the linear layers under `blocks` (top-level child names) by quantized ones, in place; how many."""
    import bitsandbytes as bnb

    # What the model itself keeps in full precision (T5's `wo`, whose input it casts to the weight's dtype), as
    # transformers' own quantization does.
    kept = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    replaced = 0
    for block in blocks:
        parent = getattr(model, block, None)
        if parent is None:
            continue
        for module in list(parent.modules()):
            for child_name, child in list(module.named_children()):
                if type(child) is not torch.nn.Linear or child_name in kept or child.in_features % BLOCK:
                    continue
                setattr(module, child_name, _quantized(bnb, child, kind, compute_dtype))
                replaced += 1
    return replaced


def _quantized(bnb, linear: torch.nn.Linear, kind: str, compute_dtype: torch.dtype) -> torch.nn.Module:
    has_bias = linear.bias is not None
    weight = linear.weight.data
    if kind == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype,
                                  quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                                    device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if has_bias:
        layer.bias = torch.nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
    return layer.to(weight.device if weight.device.type != "meta" else "cpu")  # quantizes the weight


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether any of the module's weights is a bitsandbytes 4- or 8-bit one."""
    import bitsandbytes as bnb

    return any(isinstance(m, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt) for m in module.modules())
