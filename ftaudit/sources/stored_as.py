"""One side's tensors named and cut as the other side stores them.

transformers saves a model in its layers' form when asked to (`save_original_format=False`) or when
parts of it are offloaded: experts' stacks such as `mlp.experts.gate_up_proj` (E × 2I × H) where the
checkpoint as published holds `mlp.experts.{e}.gate_proj.weight` and `up_proj.weight` per expert, or
the stacks and routers under other names (ftaudit.stored_stacks). A full fine-tune saved one way and
its base the other are compared on the published matrices: each expert's part is the rows of its
matrix (out × in) that the other side's part holds; a renamed tensor is seen under the other's name.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ftaudit.layout import Layout, as_analysed
from ftaudit.pairing import align
from ftaudit.sources.checkpoint import Checkpoint
from ftaudit.sources.pickled import PickleCheckpoint
from ftaudit.sources.safetensors import TensorInfo
from ftaudit.stored_stacks import EXPERT, Part, first_names, numbered, parts_fit, stored_names, where_stored


@dataclass(frozen=True)
class Source:
    """Where a tensor seen under another name lies: in tensor `tensor`, whole, or as part `part` of an expert's
    matrix of that stack, stored in × out when `transposed`."""

    tensor: str
    part: Part | None = None
    transposed: bool = False


class StoredAs:
    """A side's tensors, those the other side stores otherwise seen as it stores them (the module's docstring)."""

    def __init__(self, side: Checkpoint | PickleCheckpoint, sources: dict[str, Source]) -> None:
        self.side = side
        self._sources = sources
        infos, seen = side.infos, {source.tensor for source in sources.values()}
        self._infos = {name: info for name, info in infos.items() if name not in seen}
        self._views: dict[str, list[str]] = {}
        for name, source in sources.items():
            self._views.setdefault(source.tensor, []).append(name)
            info = infos[source.tensor]
            if source.part is None:
                self._infos[name] = replace(info, name=name)
            else:
                cols = info.shape[1] if source.transposed else info.shape[2]
                self._infos[name] = replace(info.part(source.part.expert), name=name,
                                            shape=(source.part.stop - source.part.start, cols))

    @classmethod
    def of(cls, side: Checkpoint | PickleCheckpoint, other: dict[str, TensorInfo], layout: Layout
           ) -> Checkpoint | PickleCheckpoint | StoredAs:
        """`side` seen as the checkpoint of tensors `other` stores it; `side` itself where nothing is stored
        otherwise."""
        infos = side.infos
        stored = {name: names for name in infos if (names := stored_names(name))}
        if not stored:
            return side
        other_map, own_map = align(other, [*infos, *first_names(stored.values())])
        located = {original: other_map.get(key) for key, original in own_map.items()}
        sources: dict[str, Source] = {}
        for name, names in stored.items():
            if located.get(name) is None:
                sources.update(_stored_as(name, infos[name].shape, names, located, other, layout))
        return cls(side, sources) if sources else side

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def views_of(self, tensor: str) -> list[str]:
        """The names that the side's tensor `tensor` is seen under: its parts, or its other name; none if as stored."""
        return self._views.get(tensor, [])

    def load(self, name: str, expert: int | None = None) -> torch.Tensor:
        """Tensor `name` as seen, or expert `expert`'s matrix of a stack, in its stored dtype; a part out × in."""
        source = self._sources.get(name)
        if source is None:
            return self.side.load(name, expert)
        if source.part is None:
            return self.side.load(source.tensor, expert)
        matrix = as_analysed(self.side.load(source.tensor, source.part.expert), source.transposed)
        return matrix[source.part.start : source.part.stop]

    def assemble(self, tensor: str, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """The side's tensor `tensor` as stored, given new values for some of the names it is seen under."""
        out: torch.Tensor | None = None
        for name, value in values.items():
            source = self._sources[name]
            if source.part is None:
                return value
            if out is None:
                out = self.side.load(tensor).clone()
            matrix = out[source.part.expert].mT if source.transposed else out[source.part.expert]
            matrix[source.part.start : source.part.stop] = value
        assert out is not None, "no new values"
        return out


def _stored_as(name: str, shape: tuple[int, ...], names: list[tuple[str, ...]], located: dict[str, str | None],
               other: dict[str, TensorInfo], layout: Layout) -> dict[str, Source]:
    """Tensor `name` of this `shape` seen as the other side stores it, under one of `names` (`stored_names`): whole,
    under the name, or in the parts of each expert's matrix, these fitting it exactly; nothing if none is stored."""
    found = where_stored(names, located, other)
    if found is None:
        return {}
    own, where = found
    if isinstance(where, str):
        return {own[0]: Source(name)}
    transposed = len(shape) == 3 and layout.transposed(name, shape)
    matrix = (shape[2], shape[1]) if transposed else shape[1:]
    fit = parts_fit(where, other, tuple(matrix)) if len(shape) == 3 and shape[0] == len(where) else None
    if fit is None:
        return {}
    return {numbered(own[j].replace(EXPERT, "0"), e): Source(name, part, transposed)
            for e, parts in enumerate(where) for j, part in enumerate(fit[p] for p in parts)}
