"""Text-encoder outputs kept per prompt, so the same prompt with another seed skips the encoder.

FLUX.2's encoder is a 24 B Mistral: on a GPU, encoding one prompt costs about as much as a denoising step or
two, and a client varying the seed of one prompt pays it every time. The cache wraps a loaded pipeline's own
`encode_prompt`, which every diffusers FLUX pipeline calls by keyword from `__call__` after its input
checks: each prompt of the batch is looked up, the missing ones are encoded in one call, and the rows are
handed back to the original `encode_prompt` as precomputed embeddings, which adds the text ids as it would.
A negative prompt goes through the same method and is cached alike.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

TEXT_ARGS = ("prompt", "prompt_2")
"""Per-prompt text arguments of `encode_prompt`; FLUX.1 sends `prompt_2` to T5, FLUX.2 has none."""

Key = tuple[Hashable, ...]
Rows = tuple[torch.Tensor, ...]


def _texts(kwargs: dict[str, Any]) -> list[tuple[str | None, ...]] | None:
    """One tuple of text arguments per prompt, or None when the call is not one the cache understands."""
    prompt = kwargs.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        return None
    columns: list[list[str | None]] = [prompts]
    for name in TEXT_ARGS[1:]:
        if name not in kwargs:
            continue
        value = kwargs[name]
        if value is None or isinstance(value, str):
            columns.append([value] * len(prompts))
        elif isinstance(value, list) and len(value) == len(prompts):
            columns.append(value)
        else:
            return None
    return list(zip(*columns, strict=True))


def _nbytes(rows: Rows) -> int:
    return sum(t.numel() * t.element_size() for t in rows)


class PromptCache:
    """Least recently used text-encoder outputs, bounded in bytes; 0 bytes turns it off."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[Key, Rows] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def install(self, pipe: Any, scope: str, embeds: Sequence[str]) -> None:
        """Route `pipe.encode_prompt` through the cache. `scope` names the encoder's weights (a LoRA'd
        transformer shares its base's encoder); `embeds` names the per-prompt outputs, in return order, as
        `encode_prompt` takes them back."""
        if self.budget_bytes <= 0:
            return
        pipe.encode_prompt = self._wrap(pipe.encode_prompt, scope, tuple(embeds))

    def drop(self, scope: str) -> None:
        """Forget a scope's entries (its pipeline was unloaded)."""
        for key in [key for key in self._entries if key[0] == scope]:
            self.bytes -= _nbytes(self._entries.pop(key))

    def _wrap(self, original: Callable[..., Any], scope: str, embeds: tuple[str, ...]) -> Callable[..., Any]:
        def encode_prompt(**kwargs: Any) -> Any:
            texts = _texts(kwargs)
            precomputed = any(kwargs.get(name) is not None for name in embeds)
            if texts is None or precomputed or kwargs.get("num_images_per_prompt", 1) != 1:
                return original(**kwargs)
            skipped = {*TEXT_ARGS, *embeds, "device", "num_images_per_prompt"}
            options = repr(sorted((k, v) for k, v in kwargs.items() if k not in skipped))
            keys: list[Key] = [(scope, options, *text) for text in texts]
            found = {key: self._get(key) for key in dict.fromkeys(keys)}
            missing = [key for key, rows in found.items() if rows is None]
            self.hits += len(keys) - len(missing)
            self.misses += len(missing)
            if missing:
                columns = list(zip(*(key[2:] for key in missing), strict=True))
                text_kwargs = {
                    name: None if all(v is None for v in columns[i]) else list(columns[i])
                    for i, name in enumerate(TEXT_ARGS)
                    if name in kwargs
                }
                outputs = original(**{**kwargs, **text_kwargs})
                for index, key in enumerate(missing):
                    rows = tuple(outputs[j][index : index + 1] for j in range(len(embeds)))
                    found[key] = rows
                    self._put(key, rows)
            joined = {
                name: torch.cat([found[key][j] for key in keys])  # type: ignore[index]
                for j, name in enumerate(embeds)
            }
            rest = {k: v for k, v in kwargs.items() if k not in (*TEXT_ARGS, *embeds)}
            return original(**rest, prompt=None, **joined)

        return encode_prompt

    def _get(self, key: Key) -> Rows | None:
        rows = self._entries.get(key)
        if rows is not None:
            self._entries.move_to_end(key)
        return rows

    def _put(self, key: Key, rows: Rows) -> None:
        size = _nbytes(rows)
        if size > self.budget_bytes:
            return
        while self.bytes + size > self.budget_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= _nbytes(evicted)
        self._entries[key] = rows
        self.bytes += size
