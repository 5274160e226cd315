"""What loaded pipelines weigh, on the device and off it: the numbers the engine evicts by."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    pass


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor really stores: a quantised tensor subclass (torchao's Float8Tensor reports the bf16
    dtype it stands for) is counted by the inner tensors it is made of."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        inner, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in inner)
    return tensor.numel() * tensor.element_size()


def pipeline_bytes(pipe: Any, device: str = "cpu") -> int:
    """Bytes of the parameters and buffers of a pipeline's torch modules that are on `device`'s kind (weights
    an offloading mode keeps in CPU memory do not count against a GPU's budget)."""
    kind = torch.device(device).type
    total = 0
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            tensors = [*component.parameters(), *component.buffers()]
            total += sum(tensor_bytes(t) for t in tensors if t.device.type == kind)
    return total
