"""PEFT LoRA and AdaLoRA adapters: the tuned matrices W0 + scaling·B·A, built exactly as PEFT merges them.

Ranks come from the factors' shapes; alphas from `lora_alpha` and `alpha_pattern` (matched the way
PEFT matches it); scaling is alpha/r, or alpha/√r with `use_rslora`; `fan_in_fan_out` transposes
the update (in a family with Conv1D layers, those layers' and no other's, whatever the config says).
Tensors the adapter stores whole (`modules_to_save`) replace the base tensor; rows it
stores (`trainable_token_indices`) replace those rows of the base's embedding, as PEFT's index_copy does;
lora_B's bias (`lora_bias`) is added, scaled, to the layer's bias, as PEFT's merge adds it.

AdaLoRA's ΔW is B·(A ⊙ E)·scaling, E its r × 1 singular values (lora_E), scaling lora_alpha/(init_r + 1e-5), as PEFT
loads it: the rank each module keeps (`rank_pattern`, which its saved factors are cut to) is not what it divides by,
but where lora_alpha ≤ 0, which it takes as the kept rank.

A LoRA on raw parameters (`target_parameters`, most often a mixture of experts' stacks) holds the
factors of all E experts in one pair, A (E·r × in) and B (out × r·E), as PEFT's ParamWrapper does;
which of a module's parameters a pair adapts is read from the shapes, not from PEFT's nesting of
wrappers (`experts.base_layer.lora_A`), which depends on the order it met them.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import torch

from ftaudit.errors import InvalidWeightsError, UnsupportedError
from ftaudit.layout import Layout
from ftaudit.low_rank import LowRankUpdate
from ftaudit.pairing import align, input_embeddings
from ftaudit.sources.checkpoint import Checkpoint
from ftaudit.sources.pickled import PickleCheckpoint
from ftaudit.sources.safetensors import TensorInfo
from ftaudit.sources.storage import Storage
from ftaudit.sources.tied import TIED_HEADS
from ftaudit.stored_stacks import Part, first_names, parts_fit, stored_names, where_stored

PEFT_PREFIX = "base_model.model."
_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?:embedding_)?(?P<side>A|B)(?:\.weight)?$")
_TOKEN_ROWS = re.compile(r"^(?P<module>.+)\.token_adapter\.trainable_tokens_delta$")
_BIAS = re.compile(r"^(?P<module>.+)\.lora_B\.bias$")
_SINGULAR = re.compile(r"^(?P<module>.+)\.lora_E(?:\.weight)?$")
_MAGNITUDE = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.weight)?$")
_BASE_LAYER = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<tensor>weight|bias)$")
FACTOR_CACHE = 2
"""LoRA modules whose factors are kept, in float64: a stack's, and the other stack's of its experts, whose parts the
base may store side by side (experts.0.down_proj, experts.0.gate_proj)."""
_UNSUPPORTED_KEYS = {"lora_diag": "KaSA (kasa_config) diagonals"}
ADALORA_RANK_OFFSET = 1e-5
"""What AdaLoRA adds to init_r before dividing by it (PEFT's ranknum + 1e-5)."""
_MERGE_UNUSED = (".lora_velora_embed.", ".lora_monteclora_sampler.")
"""The state of LoRA variants whose merge is W0 + scaling·B·A all the same (VeLoRA's projection, MonteCLoRA's
sampler): no tensor of the tuned model."""
_UNSUPPORTED_VARIANTS = {"kasa_config": "KaSA", "use_bdlora": "block-diagonal LoRA",
                         "alora_invocation_tokens": "aLoRA", "use_qalora": "QALoRA",
                         "layer_replication": "layer-replicating", "arrow_config": "Arrow router"}
"""LoRA variants whose merge is not W0 + scaling·B·A (nor DoRA's rescaling of it, which `LoraModule.magnitude`
gives): KaSA puts a diagonal between B and A
and truncates W0, block-diagonal LoRA stores A or B as blocks. aLoRA (activated LoRA) adapts only the tokens after its
invocation sequence and has no merge; QALoRA's A acts on inputs pooled by groups, a narrower matrix than W0's.
layer_replication stacks copies of the base's layers, each adapted on its own: layer i of the tuned model need not be
the base's layer i. Arrow's router picks, token by token, among other LoRA adapters; its own factors are unused, and
it has no merge."""
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
"""`init_lora_weights` (or its prefix: pissa_niter_16) that subtract the initial B·A from W0, or quantize it: the factors
apply to that changed base, which the adapter does not hold. PEFT's save_pretrained with
path_initial_model_for_weight_conversion saves a LoRA of the published base instead, marked `init_lora_weights: true`."""


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its factors, rank, alpha and scaling."""

    module: str
    a: str
    b: str
    rank: int
    alpha: float
    scaling: float
    transpose: bool
    """ΔW as stored is (B·A)ᵀ (fan_in_fan_out, an embedding, the stacks of some families)."""
    parameters: tuple[str, ...] = ()
    """For a LoRA on raw parameters: those of its module (target_parameters) it may adapt; the base's shapes pick one."""
    experts: int | None = None
    """For a LoRA on a stack of experts' matrices: E, the number of experts whose factors the pair interleaves."""
    magnitude: str | None = None
    """For DoRA (use_dora): the adapter's tensor of magnitudes m, one per output; the adapted matrix is then
    (W0 + ΔW) with each output's row rescaled to norm m, as PEFT's merge writes it."""
    singular: str | None = None
    """For AdaLoRA: the adapter's tensor E (r × 1) of the values between B and A; ΔW = scaling·B·(A ⊙ E)."""


class LoraAdapter:
    """A PEFT LoRA (or AdaLoRA) adapter: its config and the factors in adapter_model.safetensors."""

    def __init__(self, storage: Storage, config: dict[str, object], weights: Checkpoint | PickleCheckpoint) -> None:
        self.label = storage.label
        self.config = config
        self.adalora = _check_config(config, storage.label)
        self.weights = weights
        self.modules: dict[str, LoraModule] = {}
        self.replaced: dict[str, str] = {}
        self.rows: dict[str, tuple[str, list[int]]] = {}
        """Embedding modules with trained token rows: the adapter's tensor of those rows, and their indices."""
        self.biases: dict[str, str] = {}
        """Modules whose lora_B has a bias (lora_bias), which PEFT's merge adds, scaled, to the layer's bias."""
        self.base_layers: dict[str, str] = {}
        """Tensors of adapted layers that the adapter saves (an embedding's weight, bias="all"'s biases), which PEFT
        loads in place of the base's, by the layer's tensor: the W0 its LoRA or lora_bias adds to."""
        factors: dict[str, dict[str, str]] = {}
        magnitudes: dict[str, str] = {}
        singulars: dict[str, str] = {}
        given = config.get("target_parameters")
        targets = given if isinstance(given, list) else []  # a list of names, or none (_check_config)
        for name in self.weights.infos:
            for key, what in _UNSUPPORTED_KEYS.items():
                if key in name:
                    raise UnsupportedError(f"{self.label}: {what} are not supported ({name})")
            if any(key in f"{name}." for key in _MERGE_UNUSED):
                continue
            match, rows, bias = _FACTOR.match(name), _TOKEN_ROWS.match(name), _BIAS.match(name)
            base_layer, magnitude, singular = _BASE_LAYER.match(name), _MAGNITUDE.match(name), _SINGULAR.match(name)
            if singular and not self.adalora:
                raise InvalidWeightsError(f"{self.label}: {name}: AdaLoRA's singular values (lora_E) in an adapter "
                                          "whose adapter_config.json's peft_type is not ADALORA")
            if singular:
                singulars[_strip_peft(singular["module"])] = name
            elif magnitude:
                magnitudes[_strip_peft(magnitude["module"])] = name
            elif match:
                factors.setdefault(_strip_peft(match["module"]), {})[match["side"]] = name
            elif bias:
                self.biases[_strip_peft(bias["module"])] = name
            elif base_layer:
                self.base_layers[f"{_strip_peft(base_layer['module'])}.{base_layer['tensor']}"] = name
            elif rows:
                module = _strip_peft(rows["module"])
                self.rows[module] = (name, self._token_indices(module, name))
            else:
                self.replaced[_strip_peft(name)] = name
        for key, name in list(self.base_layers.items()):  # a tensor of a layer neither adapted nor given a lora_bias
            module, _, tensor = key.rpartition(".")
            if module not in (factors if tensor == "weight" else self.biases):
                self.replaced[key] = self.base_layers.pop(key)
        for module, pair in sorted(factors.items()):
            if set(pair) != {"A", "B"}:
                raise InvalidWeightsError(f"{self.label}: module {module} has lora_{next(iter(pair))} but not its pair")
            if self.adalora and self.weights.infos[pair["A"]].shape[:1] == (0,):  # rank allocation kept none: ΔW = 0
                singulars.pop(module, None)
                continue
            self.modules[module] = self._module(module, pair["A"], pair["B"], embedding="lora_embedding" in pair["A"],
                                                parameters=_parameter_keys(module, targets))
        if self.adalora:
            for module in sorted(self.modules.keys() | singulars.keys()):
                self.modules[module] = self._with_singular(module, singulars.get(module))
        for module, name in sorted(magnitudes.items()):
            self.modules[module] = self._with_magnitude(module, name)
        if not self.modules and not self.replaced and not self.rows:
            raise InvalidWeightsError(f"{self.label}: the adapter holds no LoRA factors")

    def _module(self, module: str, a: str, b: str, embedding: bool, parameters: tuple[str, ...]) -> LoraModule:
        infos = self.weights.infos
        a_shape, b_shape = infos[a].shape, infos[b].shape
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise UnsupportedError(f"{self.label}: LoRA on non-linear layers ({module}, factor shape {list(a_shape)})")
        if a_shape[0] != b_shape[1]:
            raise InvalidWeightsError(
                f"{self.label}: {module}: lora_A {list(a_shape)} and lora_B {list(b_shape)} disagree on the rank"
            )
        rank = a_shape[0]
        if rank == 0:
            raise InvalidWeightsError(
                f"{self.label}: {module}: lora_A {list(a_shape)} and lora_B {list(b_shape)} have rank 0"
            )
        alpha = self._alpha(module)
        if self.adalora:
            alpha = alpha if alpha > 0 else float(rank)
            scaling = alpha / (self._init_rank() + ADALORA_RANK_OFFSET)
        else:
            scaling = alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank
        transpose = embedding or bool(self.config.get("fan_in_fan_out"))
        # On raw parameters, the rank and alpha are those of the parameter the base's shapes pick (for_parameter)
        return LoraModule(module, a, b, rank, alpha, scaling, transpose, parameters)

    def _with_magnitude(self, module: str, name: str) -> LoraModule:
        """LoRA module `module` as DoRA's, its magnitudes the adapter's tensor `name`: one per output of a linear
        layer's matrix."""
        found = self.modules.get(module)
        if found is None:
            raise InvalidWeightsError(f"{self.label}: module {module} has a DoRA magnitude vector but no LoRA factors")
        if found.parameters or "lora_embedding" in found.a:
            what = "raw parameters (target_parameters)" if found.parameters else "embeddings"
            raise UnsupportedError(f"{self.label}: {module}: DoRA on {what} is not supported: merge the adapter into "
                                   "its base (PEFT's merge_and_unload) and audit the merged model")
        outputs = self.weights.infos[found.b].shape[0]
        if tuple(self.weights.infos[name].shape) != (outputs,):
            raise InvalidWeightsError(f"{self.label}: {module}: the DoRA magnitude vector is "
                                      f"{list(self.weights.infos[name].shape)}, not one value per output ({outputs})")
        return replace(found, magnitude=name)

    def _with_singular(self, module: str, name: str | None) -> LoraModule:
        """AdaLoRA module `module` with its singular values, the adapter's tensor `name`: one per rank."""
        found = self.modules.get(module)
        if found is None or name is None:
            missing = "lora_A and lora_B" if found is None else "lora_E"
            raise InvalidWeightsError(f"{self.label}: AdaLoRA module {module} has no {missing}")
        shape = tuple(self.weights.infos[name].shape)
        if shape != (found.rank, 1):
            raise InvalidWeightsError(f"{self.label}: {module}: lora_E is {list(shape)}, not one value per rank "
                                      f"([{found.rank}, 1])")
        return replace(found, singular=name)

    def _init_rank(self) -> int:
        """AdaLoRA's `init_r` (12 where unsaid), which PEFT divides each module's update by."""
        rank = self.config.get("init_r", 12)
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise InvalidWeightsError(f"{self.label}/adapter_config.json: init_r must be a positive integer (got "
                                      f"{rank!r})")
        return rank

    def for_parameter(self, module: LoraModule, key: str) -> LoraModule | None:
        """`module`, a LoRA on raw parameters, as the LoRA of parameter `key`: its factors side by side for E experts
        of the rank and alpha that `rank_pattern`, `alpha_pattern` (or r, lora_alpha) give `key`; None when they are
        not a whole number of factors of that rank."""
        rows = self.weights.infos[module.a].shape[0]
        rank = _pattern_value(self.config.get("rank_pattern"), key, self.config.get("r", 8))
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise InvalidWeightsError(f"{self.label}/adapter_config.json: the rank of {key} must be a positive integer "
                                      f"(got {rank!r})")
        if rows % rank:
            return None
        alpha = self._alpha(key)
        scaling = alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank
        return replace(module, rank=rank, alpha=alpha, scaling=scaling, parameters=(key,), experts=rows // rank)

    def _alpha(self, key: str) -> float:
        """The alpha of module or parameter `key`: `alpha_pattern`'s, else `lora_alpha` (numbers: _check_config);
        AdaLoRA's is lora_alpha."""
        patterns = None if self.adalora else self.config.get("alpha_pattern")
        alpha = _pattern_value(patterns, key, self.config.get("lora_alpha", 8))
        assert isinstance(alpha, (int, float))
        return float(alpha)

    def _token_indices(self, module: str, name: str) -> list[int]:
        """The token rows that `name` holds: `trainable_token_indices` (a list, or a dict keyed by module name)."""
        given = self.config.get("trainable_token_indices")
        if isinstance(given, dict):
            given = next((v for k, v in given.items() if re.match(rf"(.*\.)?({re.escape(k)})$", module)), None)
        rows = self.weights.infos[name].shape
        if not (isinstance(given, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in given)
                and len(rows) == 2 and rows[0] == len(given) == len(set(given))):
            raise InvalidWeightsError(
                f"{self.label}: {name} {list(rows)} does not match adapter_config.json's trainable_token_indices for "
                f"{module} ({given!r})"
            )
        return given

    def describe(self, modules: dict[str, LoraModule]) -> dict[str, object]:
        """The adapter as the report shows it, with its `modules` (those on raw parameters resolved on the base)."""
        ranks = sorted({m.rank for m in modules.values()})
        return {
            "type": "adalora" if self.adalora else "lora",
            "r": ranks[0] if len(ranks) == 1 else ranks,
            "lora_alpha": self.config.get("lora_alpha"),
            **({"init_r": self._init_rank()} if self.adalora else {}),
            "use_rslora": bool(self.config.get("use_rslora")) and not self.adalora,
            **({"use_dora": True} if any(m.magnitude for m in modules.values()) else {}),
            "modules": len(modules),
            "modules_to_save": sorted(self.replaced),
            **({"trainable_tokens": {m: len(i) for m, (_, i) in sorted(self.rows.items())}} if self.rows else {}),
        }


def _check_config(config: dict[str, object], label: str) -> bool:
    """Refuse an adapter_config.json that ftaudit cannot build the tuned model from; whether it is AdaLoRA's."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type not in ("LORA", "ADALORA"):
        raise UnsupportedError(f"{label}: {peft_type} adapters are not supported (only LoRA and AdaLoRA)")
    adalora = peft_type == "ADALORA"
    if adalora and config.get("target_parameters"):
        raise UnsupportedError(f"{label}: AdaLoRA on raw parameters (target_parameters) is not supported")
    for key, what in _UNSUPPORTED_VARIANTS.items():
        if config.get(key):
            raise UnsupportedError(f"{label}: {what} adapters ({key}) are not supported")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(_BASE_CHANGING_INITS):
        raise UnsupportedError(
            f"{label}: adapters initialised with init_lora_weights={init!r} are not supported: that initialisation "
            "changes the base's weights, which the adapter does not hold (save it with PEFT's "
            "path_initial_model_for_weight_conversion, or audit the merged model)")
    targets = config.get("target_parameters")
    if targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise InvalidWeightsError(f"{label}/adapter_config.json: target_parameters must be a list of parameter names")
    alpha = config.get("lora_alpha", 8)
    if not _is_number(alpha):
        raise InvalidWeightsError(f"{label}/adapter_config.json: lora_alpha must be a number (got {alpha!r})")
    alphas = config.get("alpha_pattern")
    if isinstance(alphas, dict) and not all(_is_number(value) for value in alphas.values()):
        raise InvalidWeightsError(f"{label}/adapter_config.json: alpha_pattern must map module patterns to numbers")
    for key in () if adalora else ("rank_pattern", "alpha_pattern"):  # AdaLoRA's rank_pattern: kept ranks, cut already
        patterns = config.get(key)
        for pattern in patterns if isinstance(patterns, dict) else ():
            try:
                re.compile(_peft_pattern(pattern))
            except re.error:
                raise InvalidWeightsError(
                    f"{label}/adapter_config.json: {key}: {pattern!r} is not a valid regular expression"
                ) from None
    return adalora


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def expert_factors(
    a: torch.Tensor, b: torch.Tensor, module: LoraModule, expert: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B of expert `expert` of a LoRA on a stack, views into PEFT's interleaving (A is (E·r) × in, B is
    out × (r·E)); for any other module, A and B themselves."""
    if module.experts is None:
        return a, b
    return a.view(module.experts, module.rank, -1)[expert], b.view(b.shape[0], module.rank, module.experts)[:, :, expert]


def _parameter_keys(module: str, targets: list[str]) -> tuple[str, ...]:
    """The raw parameters (`target_parameters`) that factors of PEFT module `module` may adapt: none for a layer's
    LoRA, but for a target named without its module ("down_proj"), which any module's may be. PEFT nests one wrapper
    per parameter of a module (`experts.base_layer`), and matches names by suffix."""
    owner = module.replace(".base_layer", "")
    keys = ((f"{owner}.{t.rpartition('.')[2]}", t) for t in targets)
    return tuple(sorted({k for k, t in keys if k == t or k.endswith(f".{t}")}))


def _strip_peft(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def _peft_pattern(pattern: str) -> str:
    """The regular expression PEFT matches module names against for a key of rank_pattern or alpha_pattern."""
    return rf"(.*\.)?({pattern})$"


def _pattern_value(patterns: object, module: str, default: object) -> object:
    """PEFT's rule: the first pattern p with module matching (.*\\.)?(p)$."""
    if isinstance(patterns, dict):
        for pattern, value in patterns.items():
            if re.match(_peft_pattern(pattern), module):
                return value
    return default


def locate(base: Iterable[str], names: Iterable[str]) -> dict[str, str | None]:
    """Each of `names` (as an adapter's modules name them) as the base tensor it is, or None: by `align`'s prefix pair
    that matches the most names, then those left by the pair that matches the most of them among the base tensors left,
    and so on. The parts of a multimodal model are wrapped otherwise each: recent transformers name Llava's
    `model.language_model.` and `model.vision_tower.`, which its checkpoints store as `language_model.model.` and
    `vision_tower.`."""
    located: dict[str, str | None] = dict.fromkeys(names)
    base, left = list(base), list(located)
    while left:
        base_map, names_map = align(base, left)
        found = {original: base_map[key] for key, original in names_map.items() if key in base_map}
        if not found:
            break
        located.update(found)
        taken = set(found.values())
        base, left = [n for n in base if n not in taken], [n for n in left if n not in found]
    return located


class AdaptedTensors:
    """The tuned side of an adapter audit: base tensors with the adapter applied, in float64."""

    def __init__(self, adapter: LoraAdapter, base: Checkpoint | PickleCheckpoint, layout: Layout = Layout()) -> None:
        self.adapter = adapter
        self.base = base
        self.modules = dict(adapter.modules)
        """The adapter's LoRA modules, those on raw parameters with the layout of the tensor they adapt."""
        self._lock = threading.Lock()
        self._factor_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        base_infos = base.infos
        adapter_infos = adapter.weights.infos
        parameters = {k for module in adapter.modules.values() for k in module.parameters}
        stored = {key: stored_names(key) for key in [*adapter.replaced, *parameters]}
        candidates = first_names(stored.values())
        weights = [f"{m}.weight" for m in [*adapter.modules, *adapter.rows]]
        biases = [f"{m}.bias" for m in adapter.biases]
        located = locate(base_infos, [*weights, *biases, *adapter.replaced, *parameters, *candidates])
        parts: dict[str, list[list[str]]] = {}
        """The layers' stacks that the base stores expert by expert: each expert's parts."""
        for key, names in stored.items():
            found = where_stored(names, located, base_infos) if located.get(key) is None else None
            where = None if found is None else found[1]
            if isinstance(where, str):
                located[key] = where
            elif where is not None:
                parts[key] = where
        for m, module in adapter.modules.items():  # a layer's LoRA given parameters by a bare target's name (PEFT's
            # target_parameters=["down_proj"] names one of any module): the base has the layer, and none of those
            if module.parameters and located.get(f"{m}.weight") and not any(
                    located.get(k) or k in parts for k in module.parameters):
                self.modules[m] = replace(module, parameters=())
        layers = [m for m, module in self.modules.items() if not module.parameters]
        self.tied: dict[str, str] = {}
        """Base tensors that an adapted output head shares with the input embedding (tie_word_embeddings, the head
        not stored): the head's tensor, by the embedding's, which its LoRA changes as PEFT's merge does."""
        for m in [*layers, *adapter.rows] if layout.tied_embeddings is not False else ():
            head = f"{m}.weight"
            if located.get(head) is not None or m.rpartition(".")[2] not in TIED_HEADS:
                continue
            embedding = self._tied_embedding(m)
            if embedding is not None:
                located[head], self.tied[embedding] = embedding, head
        parameters = {k for module in self.modules.values() for k in module.parameters}
        wanted = {f"{m}.weight": m for m in [*layers, *adapter.rows]}
        self._sources: dict[str, tuple[str, str]] = {}
        self._parts: dict[str, Part] = {}
        self._experts: dict[tuple[str, int], list[str]] = {}
        """The parts of each expert's matrix, by the adapter's module or tensor that holds it and the expert."""
        self._infos: dict[str, TensorInfo] = {}
        self._base_layers: dict[str, str] = {}
        """The base tensors whose W0 is the adapter's saved base layer (LoraAdapter.base_layers)."""
        for original in located:
            base_name = located.get(original)
            if original in parameters or (original not in wanted and original not in adapter.replaced):
                continue
            if original in adapter.replaced and original in parts:
                self._replaced_parts(adapter.replaced[original], parts[original])
                continue
            if original in adapter.replaced:
                info = adapter_infos[adapter.replaced[original]]
                self._infos[base_name or original] = info
                self._set_source(base_name or original, "replaced", adapter.replaced[original])
                continue
            if base_name is None:
                raise InvalidWeightsError(
                    f"{adapter.label}: adapts {wanted[original]}, which the base does not have: is this the adapter's "
                    "base? (transformers names some layers otherwise than their checkpoints store them, as ViT's "
                    "attention.attention.query, its attention.q_proj: if so, merge the adapter into its base (PEFT's "
                    "merge_and_unload) and audit the merged model)")
            if wanted[original] in adapter.rows:
                self._check_rows(wanted[original], base_infos[base_name])
                self._infos[base_name] = base_infos[base_name]
                self._set_source(base_name, "rows", wanted[original])
                continue
            module = self.modules[wanted[original]]
            if layout.conv1d and "lora_embedding_" not in module.a:  # PEFT sets fan_in_fan_out layer by layer, True
                # for a Conv1D and False for a Linear, the config keeping the last: the layer's, as the base stores it
                module = replace(module, transpose=layout.transposed(base_name, base_infos[base_name].shape))
                self.modules[module.module] = module
            self._base_layer(original, base_name)
            self._check_fit(module, base_infos[base_name])
            self._infos[base_name] = base_infos[base_name]
            self._set_source(base_name, "lora", module.module)
        for m, name in adapter.biases.items():
            base_name = located.get(f"{m}.bias")
            if m not in layers or base_name is None or base_infos[base_name].shape != adapter_infos[name].shape:
                raise InvalidWeightsError(f"{adapter.label}: {name} {list(adapter_infos[name].shape)} (lora_bias) "
                                          f"fits no bias of the base's {m}: is this the adapter's base?")
            self._base_layer(f"{m}.bias", base_name)
            self._infos[base_name] = base_infos[base_name]
            self._sources[base_name] = ("bias", m)
        for module in list(self.modules.values()):
            if module.parameters:
                tensors, self.modules[module.module] = self._parameter(module, located, parts, layout)
                for base_name, part in tensors.items():
                    self._infos[base_name] = base_infos[base_name]
                    self._set_source(base_name, "lora", module.module)
                    if part is not None:
                        self._add_part(base_name, part)

    def _tied_embedding(self, m: str) -> str | None:
        """The base's input embedding that output head `m` (a LoRA's, or trained token rows') is tied to: the one
        token embedding of its shape (of its width, for a LoRA whose rows fit none); None where there is none."""
        infos, module = self.adapter.weights.infos, self.modules.get(m)
        shape = ((infos[module.b].shape[0], infos[module.a].shape[1]) if module is not None
                 else (None, infos[self.adapter.rows[m][0]].shape[1]))
        found = input_embeddings(self.base.infos, shape)
        if not found and module is not None:  # a vocabulary grown before training: the one embedding of the head's
            # width, which the head's saved base layer, or its update, then shows to be of another shape
            wide = input_embeddings(self.base.infos, (None, shape[1]))
            found = wide if len(wide) == 1 else []
        if len(found) > 1:
            raise UnsupportedError(
                f"{self.adapter.label}: {m}, tied to the input embedding, fits more than one of the base's "
                f"embeddings ({', '.join(found)}): merge the adapter into its base (PEFT's merge_and_unload) and audit "
                "the merged model")
        return found[0] if found else None

    def _set_source(self, base_name: str, kind: str, source: str) -> None:
        """Base tensor `base_name` as the adapter's `kind` of tensor `source`: a tensor it adapts once."""
        if base_name in self._sources:
            other = self._sources[base_name][1]
            if base_name in self.tied:
                raise UnsupportedError(
                    f"{self.adapter.label}: adapts both {_strip_peft(other)} and {_strip_peft(source)}, which the base "
                    f"ties into one tensor, {base_name} (tie_word_embeddings): PEFT's merge adds both updates to it, a "
                    "model neither layer computes; if the merged model is the one you use, merge the adapter (PEFT's "
                    "merge_and_unload) and audit that")
            raise InvalidWeightsError(f"{self.adapter.label}: {base_name} is adapted twice")
        self._sources[base_name] = (kind, source)

    def _base_layer(self, key: str, base_name: str) -> None:
        """Take the adapter's saved base layer of tensor `key`, if any, as base tensor `base_name`'s W0."""
        name = self.adapter.base_layers.get(key)
        if name is None:
            return
        shape, base_shape = self.adapter.weights.infos[name].shape, self.base.infos[base_name].shape
        if tuple(shape) != tuple(base_shape):
            raise UnsupportedError(
                f"{self.adapter.label}: {name} {list(shape)}, the layer PEFT loads in place of the base's {base_name} "
                f"{list(base_shape)}, is of another shape (a resized vocabulary): merge the adapter into its base "
                "(PEFT's merge_and_unload) and audit the merged model")
        self._base_layers[base_name] = name

    def _w0(self, name: str, expert: int | None = None) -> torch.Tensor:
        """Base tensor `name` as PEFT loads the adapted model: the adapter's saved base layer, or the base's own."""
        saved = self._base_layers.get(name)
        return self.adapter.weights.load(saved) if saved is not None else self.base.load(name, expert)

    def _replaced_parts(self, name: str, experts: list[list[str]]) -> None:
        """Adapter tensor `name`, a layers' stack saved whole (modules_to_save), as the parts the base stores each
        expert's matrix (out × in) in; each part's info names the adapter's tensor that holds it."""
        shape = self.adapter.weights.infos[name].shape
        found = parts_fit(experts, self.base.infos, tuple(shape[1:])) if len(shape) == 3 else None
        if found is None or shape[0] != len(experts):
            raise InvalidWeightsError(
                f"{self.adapter.label}: {name} {list(shape)} does not fit the base's {len(experts)} experts' "
                f"{', '.join(experts[0])}: is this the adapter's base?")
        dtype = self.adapter.weights.infos[name].dtype
        for base_name, part in found.items():
            self._infos[base_name] = replace(self.base.infos[base_name], name=name, dtype=dtype)
            self._sources[base_name] = ("replaced", name)
            self._add_part(base_name, part)

    def _add_part(self, name: str, part: Part) -> None:
        """Base tensor `name`, whose source is set, as part `part` of an expert's matrix."""
        self._parts[name] = part
        self._experts.setdefault((self._sources[name][1], part.expert), []).append(name)

    def _parameter(self, module: LoraModule, located: dict[str, str | None], parts: dict[str, list[list[str]]],
                   layout: Layout) -> tuple[Mapping[str, Part | None], LoraModule]:
        """The base tensors that a LoRA on raw parameters adapts, those of the one of `module.parameters` its factors
        fit, and the module as that parameter's LoRA, with the tensor's layout: one ΔW per expert of a stack, ΔWᵀ in
        some families (ftaudit.layout). A stack the base stores expert by expert gives each part's rows of the
        expert's ΔW (ftaudit.stored_stacks)."""
        label, infos = self.adapter.label, self.base.infos
        present = {k: where for k in module.parameters if (where := located.get(k)) is not None}
        split = {k: parts[k] for k in module.parameters if k in parts}
        if not present and not split:
            raise UnsupportedError(
                f"{label}: adapts {', '.join(module.parameters)}, which the base's checkpoint does not store "
                "(transformers converts this model's weights as it loads them): merge the adapter into its base "
                "(PEFT's merge_and_unload) and audit the merged model")
        a, b = self.adapter.weights.infos[module.a].shape, self.adapter.weights.infos[module.b].shape
        fits: list[tuple[Mapping[str, Part | None], LoraModule]] = []
        for key, name in present.items():
            shape, candidate = infos[name].shape, self.adapter.for_parameter(module, key)
            if len(shape) == 3 and layout.concatenated(name) and (shape[0] * shape[1], shape[2]) == (b[0], a[1]):
                raise UnsupportedError(
                    f"{label}: {module.module}: a LoRA on DBRX's experts' parameters (target_parameters), which hold "
                    "their matrices one above the other, is not supported: merge the adapter into its base (PEFT's "
                    "merge_and_unload) and audit the merged model")
            if candidate is None:
                continue
            if len(shape) == 3 and shape[0] == candidate.experts:
                # B·A is the expert's ΔW as the layer holds it (ΔWᵀ in some families), and the checkpoint may store the
                # stack the other way round (Qwen3-VL-MoE's published layout)
                stored_other_way = layout.transposed(name, shape) != layout.experts_in_out
                transpose = layout.peft_experts_transposed != stored_other_way
                if tuple(shape[1:]) == ((a[1], b[0]) if transpose else (b[0], a[1])):
                    fits.append(({name: None}, replace(candidate, transpose=transpose)))
            elif len(shape) == 2 and candidate.experts == 1 and tuple(shape) == (b[0], a[1]):
                fits.append(({name: None}, replace(candidate, experts=None)))
        for key, experts in split.items():
            candidate = self.adapter.for_parameter(module, key)
            if candidate is not None and candidate.experts == len(experts):
                candidate = replace(candidate, transpose=layout.peft_experts_transposed)
                found = parts_fit(experts, infos, (a[1], b[0]) if candidate.transpose else (b[0], a[1]))
                if found is not None:
                    fits.append((found, candidate))
        if len(fits) != 1:
            shapes = ", ".join([*(f"{n} {list(infos[n].shape)}" for n in present.values()),
                                *(f"{e[0][0]} … ({len(e)} experts) {list(infos[e[0][0]].shape)}"
                                  for e in split.values())])
            fit = "fit none of" if not fits else "fit more than one of"
            raise InvalidWeightsError(
                f"{label}: {module.module}: lora_A {list(a)} and lora_B {list(b)} {fit} the base's {shapes}: is this "
                "the adapter's base?")
        return fits[0]

    def _check_fit(self, module: LoraModule, info: TensorInfo) -> None:
        infos = self.adapter.weights.infos
        a, b = infos[module.a].shape, infos[module.b].shape
        expected = (a[1], b[0]) if module.transpose else (b[0], a[1])
        if tuple(info.shape) != expected:
            raise InvalidWeightsError(
                f"{self.adapter.label}: {module.module}: the update is {list(expected)} but the base weight is "
                f"{list(info.shape)}: is this the adapter's base?"
            )

    def _check_rows(self, module: str, info: TensorInfo) -> None:
        name, indices = self.adapter.rows[module]
        width = self.adapter.weights.infos[name].shape[1]
        outside = indices and (max(indices) >= info.shape[0] or min(indices) < 0)
        if len(info.shape) != 2 or info.shape[1] != width or outside:
            raise InvalidWeightsError(
                f"{self.adapter.label}: {module}: rows {min(indices, default=0)}–{max(indices, default=0)} of width "
                f"{width} do not fit the base's {list(info.shape)}: is this the adapter's base?"
            )

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def describe(self) -> dict[str, object]:
        """The adapter as the report shows it, with the heads it adapts as their tied embedding."""
        tied = {head.removesuffix(".weight"): embedding for embedding, head in sorted(self.tied.items())}
        return {**self.adapter.describe(self.modules), **({"tied": tied} if tied else {})}

    @property
    def unchanged(self) -> frozenset[str]:
        """The base tensors the adapter leaves as they are: the tuned model has them, unchanged."""
        return frozenset(self.base.infos.keys() - self._infos.keys())

    def token_rows(self, name: str) -> bool:
        """Whether the adapter changes tensor `name` by storing some of its rows (trainable_token_indices)."""
        return self._sources[name][0] == "rows"

    def module(self, name: str) -> LoraModule | None:
        """The LoRA module that adapts tensor `name`, if any."""
        kind, source = self._sources[name]
        return self.modules[source] if kind == "lora" else None

    def load(self, name: str, expert: int | None = None) -> torch.Tensor:
        """Tensor `name` of the adapted model, or expert `expert`'s matrix of a stack; a whole stack that the factors
        adapt comes in the base's dtype, each expert's matrix rounded once, as PEFT's merge rounds it."""
        kind, source = self._sources[name]
        part = self._parts.get(name)
        if kind == "replaced" and part is not None:
            return self.adapter.weights.load(source, part.expert)[part.start:part.stop]
        if kind == "replaced":
            return self.adapter.weights.load(source, expert)
        if kind == "bias":  # PEFT's merge: the base's bias + scaling·lora_B's
            bias = self.adapter.weights.load(self.adapter.biases[source]).double()
            return self._w0(name).double() + self.modules[source].scaling * bias
        if kind == "rows":  # PEFT's merge: the base's rows at the indices replaced, in the base's dtype
            name_of_rows, indices = self.adapter.rows[source]
            base = self.base.load(name)
            rows = self.adapter.weights.load(name_of_rows).to(base.dtype)
            return base.index_copy(0, torch.tensor(indices, dtype=torch.long), rows)
        module = self.modules[source]
        if module.experts is not None and expert is None and part is None:
            stack = self.base.load(name).clone()
            for e in range(module.experts):
                update = self._factors(module, e)
                stack[e] = stack[e].double() + update.left @ update.right
            return stack
        update = self._update(module, name, expert)
        # a float64 copy of W0 that ΔW is added to in place: no float64 product as large as the matrix beside it
        adapted = self._w0(name, expert).to(torch.float64, copy=True).addmm_(update.left, update.right)
        return adapted if module.magnitude is None else self._rescaled(module, adapted)

    def _rescaled(self, module: LoraModule, adapted: torch.Tensor) -> torch.Tensor:
        """DoRA's merge, in place: each output's row of W0 + ΔW (a column where the matrix is stored in × out)
        rescaled to the norm the module's magnitude vector gives it."""
        assert module.magnitude is not None
        magnitude = self.adapter.weights.load(module.magnitude).double()
        if module.transpose:
            return adapted.mul_(magnitude / torch.linalg.vector_norm(adapted, dim=0))
        return adapted.mul_((magnitude / torch.linalg.vector_norm(adapted, dim=1)).unsqueeze(1))

    def low_rank(self, name: str, expert: int | None = None) -> LowRankUpdate | None:
        """ΔW of tensor `name` (or of expert `expert`'s matrix of a stack) as float64 factors; None for a tensor the
        adapter replaces, whole or by rows, rescales (DoRA), or whose W0 it saves (not the base's, to be exact)."""
        kind, source = self._sources[name]
        if kind != "lora" or name in self._base_layers or self.modules[source].magnitude is not None:
            return None
        return self._update(self.modules[source], name, expert)

    def _update(self, module: LoraModule, name: str, expert: int | None) -> LowRankUpdate:
        """ΔW of tensor `name` from `module`'s factors: of expert `expert`'s matrix of a stack, or of the rows of its
        expert's matrix that a part holds."""
        part = self._parts.get(name)
        if part is not None:
            return self._factors(module, part.expert).rows(part.start, part.stop)
        return self._factors(module, expert)

    def part(self, name: str) -> Part | None:
        """Where base tensor `name` lies in the expert's matrix of a layers' stack that the adapter holds (as factors,
        or whole), if the base stores that stack expert by expert."""
        return self._parts.get(name)

    def parts_of(self, name: str) -> list[str]:
        """The tensors holding the matrix of the expert that part `name` belongs to, by their rows."""
        return self._experts[(self._sources[name][1], self._parts[name].expert)]

    def _factors(self, module: LoraModule, expert: int | None = None) -> LowRankUpdate:
        with self._lock:  # a stack's experts ask in turn, each part of each: its factors are read once
            if module.module not in self._factor_cache:
                weights = self.adapter.weights
                a = weights.load(module.a).double()
                if module.singular is not None:  # AdaLoRA's B·(A ⊙ E)
                    a = a * weights.load(module.singular).double()
                self._factor_cache[module.module] = (a, weights.load(module.b).double())
                while len(self._factor_cache) > FACTOR_CACHE:
                    del self._factor_cache[next(iter(self._factor_cache))]
            a, b = self._factor_cache[module.module]
        a, b = expert_factors(a, b, module, expert)
        if module.transpose:  # ΔW = (B·A)ᵀ
            return LowRankUpdate(module.scaling * a.T, b.T)
        return LowRankUpdate(module.scaling * b, a)
