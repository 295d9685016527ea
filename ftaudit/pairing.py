"""Matching base and tuned tensors by name, and deciding which pairs are analysed.

Names are aligned by stripping the wrapper prefixes that differ between checkpoints of one
architecture (`base_model.model.`, `model.`, `bert.`, ...): of all candidate prefix pairs, the one
that matches the most names wins. Each matrix gets a module kind from its name; by default only
attention and MLP matrices are analysed. Experts stacked in one 3-D tensor give one pair per expert
(ftaudit.layout).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from ftaudit.layout import Layout, expert_name, is_expert_stack
from ftaudit.sources.safetensors import FLOAT_DTYPES, TensorInfo

KINDS = ("attention", "mlp", "embedding", "head", "norm", "other")
DEFAULT_KINDS = ("attention", "mlp")
VOCAB_KINDS = ("embedding", "head")
"""Kinds whose rows are vocabulary entries: a resized vocabulary is compared on the shared rows."""

_KIND_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    # a norm is the tensor's own module: DBRX's attention lies in `norm_attn_norm`
    ("norm", re.compile(r"(^|\.)([^.]*norm[^.]*|ln_?\w*)(\.(weight|bias))?$")),
    ("embedding", re.compile(r"embed|(^|\.)(wte|wpe|shared)(\.|$)")),
    # RWKV's output head is `head`, Decision Transformer's are `predict_state`, `predict_action`, `predict_return`
    ("head", re.compile(r"(^|\.)(lm_head|classifier|score|qa_outputs|pooler|cls|output_projection)(\.|$)"
                        r"|^(head|predict_(state|action|return))\.")),
    # and the sequence mixers that stand in for attention: state-space (Mamba's mixer, Jamba's and Zamba's `mamba`),
    # LFM2's short convolution, RecurrentGemma's recurrent block; only their linear maps (not Mamba's 2-D `A_log`)
    ("attention", re.compile(
        r"attn|attention|(^|\.)(q|k|v|o|query|key|value|qkv|wq|wk|wv|wo|q_proj|k_proj|v_proj|o_proj"
        r"|out_proj|query_key_value|(mamba|mixer|conv)\.(in_proj|x_proj|dt_proj)|temporal_block\.linear_(x|y|out))"
        r"(\.|$)")),
    # a router is its mixture of experts' (Nemotron-H's `mixer.gate`); Zamba's hybrid layers map the shared
    # transformer block's output through a `linear` of their own
    ("mlp", re.compile(
        r"mlp|ffn|feed_?forward|intermediate|experts|moe|(^|\.)(fc1|fc2|w1|w2|w3|gate_proj|up_proj|down_proj"
        r"|c_fc|dense_h_to_4h|dense_4h_to_h|wi|output\.dense|mixer\.gate|\d+\.linear)(\.|$)")),
]
_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
_POSITIONS = re.compile(r"(^|\.)(wpe|[^.]*pos[^.]*)(\.weight)?$")
"""Position embeddings (GPT-2's wpe, BERT's position_embeddings, OPT's embed_positions)."""


def module_kind(name: str) -> str:
    """attention, mlp, embedding, head, norm or other, from the tensor's name."""
    lowered = name.lower()
    for kind, pattern in _KIND_PATTERNS:
        if pattern.search(lowered):
            return kind
    return "other"


def layer_index(name: str) -> int | None:
    """The first numeric component of the name (the block index), if any."""
    match = _LAYER.search(name)
    return int(match[1]) if match else None


@dataclass(frozen=True)
class TensorPair:
    """A base matrix and its tuned counterpart, floating point of the same shape: 2-D tensors, or one expert's
    matrices of two stacks (`expert`)."""

    name: str
    base_name: str
    tuned_name: str
    kind: str
    layer: int | None
    shape: tuple[int, int]
    """As analysed: out × in, the layer's output dimension first (see `transposed`)."""
    rows: int | None = None
    """Compare only the first `rows` rows (a resized vocabulary); None compares all."""
    transposed: bool = False
    """The base matrix is stored in × out (a Conv1D layer, some stacked experts) and analysed transposed."""
    tuned_transposed: bool = False
    """The tuned matrix is: as the base's but for a family that saves its stacks both ways (ftaudit.layout)."""
    expert: int | None = None
    """The expert's index along the first dimension of both tensors, stacks of experts; None for a 2-D tensor."""


@dataclass
class Pairing:
    """What is analysed, and what could not be paired."""

    pairs: list[TensorPair] = field(default_factory=list)
    missing_in_base: list[str] = field(default_factory=list)
    missing_in_model: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    resized: list[tuple[str, int, int]] = field(default_factory=list)
    not_selected: int = 0
    """Matrices left out by the selection, each expert's of a stack counted."""
    scale_only: list[TensorPair] = field(default_factory=list)
    """Heads and embeddings not analysed in full, whose row-norm drift is still measured."""
    unmatched_globs: list[str] = field(default_factory=list)
    """--include and --exclude globs that match no matrix of either side (a likely typo)."""
    unchanged: list[str] = field(default_factory=list)
    """Selected matrices that the tuned side leaves as the base has them (an adapter's untargeted ones)."""


@dataclass(frozen=True)
class Selection:
    """Which matrices to analyse: module kinds plus name globs, minus excluded globs."""

    kinds: frozenset[str] = frozenset(DEFAULT_KINDS)
    globs: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @classmethod
    def from_options(cls, include: Sequence[str], exclude: Sequence[str]) -> Selection:
        """`--include` values are kinds or globs, added to the default kinds; a value may list several, separated by
        commas (outside a glob's brackets)."""
        include, exclude = _listed(include), _listed(exclude)
        kinds = set(DEFAULT_KINDS) | {i for i in include if i in KINDS}
        globs = tuple(i for i in include if i not in KINDS)
        return cls(frozenset(kinds), globs, tuple(exclude))

    def selects(self, tensor: str, matrix: str, kind: str, also: tuple[str, ...] = ()) -> bool:
        """Whether matrix `matrix` of tensor `tensor` (itself, or `tensor[e]`, an expert's of a stack) is analysed:
        no exclude glob matches any of its names, and its kind is selected or an include glob matches a name. `also`
        gives it other names (a tied head's, for the embedding it shares), whose kinds and globs count as its own."""
        names = {tensor, matrix, *also}
        if any(_matches(n, g) for n in names for g in self.exclude):
            return False
        kinds = {kind, *(module_kind(n) for n in also)}
        return bool(kinds & self.kinds) or any(_matches(n, g) for n in names for g in self.globs)

    def unmatched(self, names: Iterable[str]) -> list[str]:
        """The include and exclude globs that match none of `names`."""
        names = list(names)
        return [g for g in (*self.globs, *self.exclude) if not any(_matches(n, g) for n in names)]


_EXPERT = re.compile(r"\[(\d+)\]")
"""A bracket holding only digits: an expert's index, as in `stack[3]`, never a glob's character class."""
_COMMA = re.compile(r",(?![^\[]*\])")
"""A comma that separates values: not one inside a glob's brackets (`w[1,2]`)."""


def _listed(values: Sequence[str]) -> list[str]:
    """The values given, each option's split at its commas, empty ones dropped."""
    return [item.strip() for value in values for item in _COMMA.split(value) if item.strip()]


def _matches(name: str, glob: str) -> bool:
    """Whether `glob` matches `name`, a bracket of digits in it taken as written: `*[2]` is every stack's expert 2
    (`stack[2]`), not every name that ends in 2 (DBRX's `…mlp.w2`); other brackets are character classes (`[0-3]`)."""
    return fnmatch.fnmatchcase(name, _EXPERT.sub(r"[[]\1[]]", glob))


def _prefixes(names: Iterable[str]) -> set[str]:
    """Candidate wrapper prefixes: each name's first one or two parts, short of its module and tensor (`lm_head.` of
    `lm_head.weight` is none, which would pair it with `model.norm.weight` by their last part)."""
    out = {""}
    for name in names:
        parts = name.split(".")
        out.update(".".join(parts[:i]) + "." for i in (1, 2) if len(parts) > i + 1)
    return out


def _strip(names: Iterable[str], prefix: str) -> dict[str, str]:
    """Normalised name -> original name; names without the prefix stay as they are."""
    out: dict[str, str] = {}
    for name in names:
        key = name[len(prefix):] if prefix and name.startswith(prefix) else name
        out.setdefault(key, name)
    return out


def align(base: Iterable[str], tuned: Iterable[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Normalised-name maps of both sides under the prefix pair that matches the most names."""
    base, tuned = list(base), list(tuned)
    best: tuple[int, int, dict[str, str], dict[str, str]] | None = None
    for pb in sorted(_prefixes(base)):
        b = _strip(base, pb)
        for pt in sorted(_prefixes(tuned)):
            t = _strip(tuned, pt)
            score = (len(b.keys() & t.keys()), -(len(pb) + len(pt)))
            if best is None or score > best[:2]:
                best = (*score, b, t)
    assert best is not None
    return best[2], best[3]


def pair_tensors(
    base: dict[str, TensorInfo], tuned: dict[str, TensorInfo], selection: Selection,
    unchanged: Collection[str] = frozenset(),
    layout: Layout = Layout(),
    aliases: Mapping[str, str] = {},
) -> Pairing:
    """Pair the floating-point matrices of both sides (2-D, or stacked experts) and pick those to analyse.
    `unchanged` names base tensors that the tuned side leaves as they are (an adapter's untargeted ones): not
    missing. `layout` says which tensors hold their matrices in × out. `aliases` gives tuned tensors another name
    that selects them too (an adapter's tied head, by the embedding it shares)."""
    result = Pairing()
    b_map, t_map = align(_matrices(base), _matrices(tuned))
    matrices = {key: _matrix_names(key, (base[b_map[key]] if key in b_map else tuned[t_map[key]]).shape)
                for key in sorted(b_map.keys() | t_map.keys())}
    result.unmatched_globs = selection.unmatched([*matrices, *(n for names in matrices.values() for n in names),
                                                  *aliases.values()])
    for key, names in matrices.items():
        b_name, t_name = b_map.get(key), t_map.get(key)
        kind = module_kind(key)
        also = (aliases[t_name],) if t_name is not None and t_name in aliases else ()
        chosen = [n for n in names if selection.selects(key, n, kind, also)]
        result.not_selected += len(names) - len(chosen)
        if not chosen:
            if kind in VOCAB_KINDS and b_name is not None and t_name is not None:
                result.scale_only.extend(_pairs(key, b_name, t_name, kind, base, tuned))
        elif t_name is None:
            if b_name in unchanged:
                result.unchanged.extend(chosen)
            else:
                result.missing_in_model.append(key)
        elif b_name is None:
            result.missing_in_base.append(key)
        else:
            pairs = _pairs(key, b_name, t_name, kind, base, tuned, layout)
            b_shape, t_shape = base[b_name].shape, tuned[t_name].shape
            if not pairs:
                result.shape_mismatch.append((key, b_shape, t_shape))
                continue
            if pairs[0].rows is not None:
                result.resized.append((key, b_shape[0], t_shape[0]))
            result.pairs.extend(pair for pair in pairs if pair.name in chosen)
    return result


def _matrix_names(key: str, shape: tuple[int, ...]) -> list[str]:
    """The names of the matrices of tensor `key`: itself, or one per expert of a stack."""
    return [expert_name(key, e) for e in range(shape[0])] if is_expert_stack(key, shape) else [key]


def _pairs(
    key: str, b_name: str, t_name: str, kind: str,
    base: dict[str, TensorInfo], tuned: dict[str, TensorInfo], layout: Layout = Layout(),
) -> list[TensorPair]:
    """The pairs to compare: of tensors of the same shape (one per expert of a stack), or of a resized
    vocabulary's shared rows; none otherwise."""
    b_shape, t_shape = base[b_name].shape, tuned[t_name].shape
    b_transposed, t_transposed = layout.transposed(key, b_shape), layout.transposed(key, t_shape)
    shape = _analysed_shape(b_shape, b_transposed)
    if shape == _analysed_shape(t_shape, t_transposed):
        pair = TensorPair(key, b_name, t_name, kind, layer_index(key), (shape[-2], shape[-1]), transposed=b_transposed,
                          tuned_transposed=t_transposed)
        if len(b_shape) == 2:
            return [pair]
        return [replace(pair, name=expert_name(key, e), expert=e) for e in range(b_shape[0])]
    if kind in VOCAB_KINDS and len(b_shape) == len(t_shape) == 2 and b_shape[1] == t_shape[1]:
        rows = min(b_shape[0], t_shape[0])
        return [TensorPair(key, b_name, t_name, kind, layer_index(key), (rows, b_shape[1]), rows)]
    return []


def _analysed_shape(shape: tuple[int, ...], transposed: bool) -> tuple[int, ...]:
    """A tensor's shape with its matrices out × in."""
    return (*shape[:-2], shape[-1], shape[-2]) if transposed else shape


def input_embeddings(tensors: dict[str, TensorInfo], shape: tuple[int | None, int]) -> list[str]:
    """The token embeddings among `tensors` that an output head of `shape` (vocabulary × hidden; any vocabulary
    where it is None) may be tied to: floating-point embedding matrices of that shape, position embeddings aside."""
    return sorted(n for n, t in tensors.items()
                  if len(t.shape) == 2 and shape[0] in (None, t.shape[0]) and t.shape[1] == shape[1]
                  and t.dtype in FLOAT_DTYPES and module_kind(n) == "embedding" and not _POSITIONS.search(n.lower()))


def quantized_matrix(tensors: dict[str, TensorInfo]) -> TensorInfo | None:
    """An attention or MLP matrix, or stack of experts' matrices, stored in an integer or 8-bit float dtype (GPTQ
    and AWQ `qweight`, bitsandbytes, FP8, gpt-oss's MXFP4 `_blocks`): quantized values, not weights that can be
    compared with a base's."""
    for info in tensors.values():
        packed = len(info.shape) in (2, 3) or info.name.endswith("_blocks")
        if packed and info.dtype not in FLOAT_DTYPES and module_kind(info.name) in DEFAULT_KINDS:
            return info
    return None


def _matrices(tensors: dict[str, TensorInfo]) -> list[str]:
    """The floating-point weight matrices: 2-D tensors and stacks of experts' matrices, but not the biases of
    stacked experts (gpt-oss's `down_proj_bias`, E × out)."""
    return [
        n for n, t in tensors.items()
        if t.dtype in FLOAT_DTYPES and not n.endswith("bias")
        and ((len(t.shape) == 2 and min(t.shape) > 0) or is_expert_stack(n, t.shape))
    ]
