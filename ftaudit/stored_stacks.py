"""Where a checkpoint stores the stacks of experts that transformers' layers hold.

transformers 5 fuses the experts of many mixtures of experts into 3-D stacks as it loads them
(`mlp.experts.gate_up_proj`, E × 2I × H out × in) and writes them back as the checkpoint had them
when it saves. A PEFT adapter names the stacks as the layers do (target_parameters,
modules_to_save); these rules, after transformers' conversion table, find them in the base:

- whole, under another name: GraniteMoE's `input_linear` and `output_linear`, Aria's `fc1`, `fc2`;
- expert by expert, one 2-D matrix per projection, the expert's matrix being its parts one above
  the other: Qwen2/3-MoE, DeepSeek, OLMoE, Jamba and the like (`experts.{e}.gate_proj`, `up_proj`,
  `down_proj`), Mixtral and PhiMoE (`block_sparse_moe.experts.{e}.w1`, `w3`, `w2`), Nemotron-H.

The routers of some of these families are renamed too (Mixtral's and PhiMoE's `block_sparse_moe.gate`,
GraniteMoE's `router.layer`). A model saved in the layers' form (transformers' `save_original_format=False`,
or an offloaded save) is matched to a checkpoint stored as published by the same rules
(ftaudit.sources.stored_as).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from ftaudit.sources.safetensors import TensorInfo

EXPERT = "{e}"
"""Stands for the expert's number in a part's name."""

_STACK = re.compile(r"^(?P<owner>.*\.)?experts\.(?P<stack>gate_up_proj|down_proj|up_proj)$")
_WHOLE = {
    "gate_up_proj": ("input_linear.weight", "experts.fc1.weight"),
    "down_proj": ("output_linear.weight", "experts.fc2.weight"),
}
_PARTS = {
    "gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")),
    "down_proj": (("down_proj",), ("w2",)),
    "up_proj": (("up_proj",),),
}
_OWNERS = (("mlp.", "block_sparse_moe."),)
"""Owners that checkpoints name otherwise (Mixtral, PhiMoE)."""
_ROUTERS = (
    (re.compile(r"^(?P<owner>.*\.)?mlp\.gate\.weight$"), "block_sparse_moe.gate.weight"),
    (re.compile(r"^(?P<owner>.*\.)?mlp\.router\.weight$"), "block_sparse_moe.gate.weight"),
    (re.compile(r"^(?P<owner>.*\.)?block_sparse_moe\.router\.weight$"), "block_sparse_moe.router.layer.weight"),
)
"""Routers that checkpoints name otherwise: Mixtral's and PhiMoE's, GraniteMoE's."""


@dataclass(frozen=True)
class Part:
    """A base tensor that holds rows [start, stop) of expert `expert`'s matrix (out × in) of a layers' stack."""

    expert: int
    start: int
    stop: int


def stored_names(key: str) -> list[tuple[str, ...]]:
    """The names a checkpoint may store layers' tensor `key` under: one name, whole, or the names of an expert's parts
    with `EXPERT` for its number; none for a name that is no layers' stack or renamed router."""
    match = _STACK.match(key)
    if match is None:
        routers = ((pattern.match(key), name) for pattern, name in _ROUTERS)
        return [(f"{found['owner'] or ''}{name}",) for found, name in routers if found]
    owner, stack = match["owner"] or "", match["stack"]
    owners = [owner, *(owner[: -len(a)] + b for a, b in _OWNERS if owner.endswith(a))]
    whole = [(f"{owner}{name}",) for name in _WHOLE.get(stack, ())]
    parts = [tuple(f"{o}experts.{EXPERT}.{p}.weight" for p in names) for o in owners for names in _PARTS[stack]]
    return [*whole, *parts]


def first_names(stored: Iterable[list[tuple[str, ...]]]) -> set[str]:
    """The names to look for in a checkpoint of all the ways of storing (`stored_names`): expert 0's for parts."""
    return {n.replace(EXPERT, "0") for names in stored for found in names for n in found}


def where_stored(names: list[tuple[str, ...]], located: dict[str, str | None], checkpoint: Collection[str]
                 ) -> tuple[tuple[str, ...], str | list[list[str]]] | None:
    """Which of `names` (`stored_names`) a checkpoint stores a layers' tensor under, and where: one tensor, whole, or
    each expert's parts ([[parts of expert 0], [of expert 1], …]); None if under none. `located` gives where the
    checkpoint holds each of `first_names`, if it does."""
    for found in names:
        first = [located.get(n.replace(EXPERT, "0")) for n in found]
        if all(first):
            held = [n for n in first if n is not None]
            return found, held[0] if EXPERT not in found[0] else expert_parts(held, checkpoint)
    return None


def numbered(name: str, expert: int) -> str:
    """Expert 0's part `name` as expert `expert`'s."""
    head, _, tail = ("." + name).rpartition(".experts.0.")
    return f"{head}.experts.{expert}.{tail}"[1:]


def expert_parts(first: list[str], names: Collection[str]) -> list[list[str]]:
    """The parts of each expert, 0, 1, …, as long as the checkpoint (`names`) holds them all: `first` are expert
    0's, found in the checkpoint; each other expert's differ only in its number."""
    experts: list[list[str]] = []
    while True:
        parts = [numbered(name, len(experts)) for name in first]
        if not all(p in names for p in parts):
            return experts
        experts.append(parts)


def parts_fit(experts: list[list[str]], infos: dict[str, TensorInfo], shape: tuple[int, ...]) -> dict[str, Part] | None:
    """Each expert's parts (2-D, out × in) as rows of its matrix of `shape` (out × in); None unless they make it
    exactly."""
    found: dict[str, Part] = {}
    for e, names in enumerate(experts):
        start = 0
        for name in names:
            part = infos[name].shape
            if len(part) != 2 or part[1] != shape[1]:
                return None
            found[name] = Part(e, start, start + part[0])
            start += part[0]
        if start != shape[0]:
            return None
    return found
