"""`ftaudit fix` as a library call: scale down a model's intruder dimensions and write the patched model.

The flow: audit the input as `check` does; for each analysed matrix with intruders at ε, find them
again from its spectra and scale their singular values by λ (ftaudit.patch); write the output folder
file by file and tensor by tensor, every other tensor copied as raw bytes; audit the output against
the same base; record the fix in the output's card. The output appears at `out` only when complete.

What is written depends on the input: a full model gives a full model with the same files, tensor
names, dtypes, metadata and sharding; a LoRA adapter gives an adapter of the same rank (the patched
update cut back to rank r), or with `merge` the base model with the patched merged matrices.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from ftaudit import __version__, cardfile
from ftaudit.audit import AuditOptions, Progress, Tensors
from ftaudit.blockwise import scale_exponent, scaled, unscaled
from ftaudit.cache import SpectrumCache, flushed, tensor_key
from ftaudit.check import Opened, Target, audit_opened, open_target, saved_whole
from ftaudit.errors import InvalidWeightsError, UnsupportedError, UsageError
from ftaudit.fixreport import FixResult, FixSettings, MatrixChange
from ftaudit.layout import as_analysed
from ftaudit.pairing import TensorPair, pair_tensors
from ftaudit.patch import Directions, find_directions, refactor_lora, scale_directions
from ftaudit.policy import Policy
from ftaudit.renderers import fix as fix_render
from ftaudit.renderers.card import BADGE, HEATMAP, REPO_FILES, repo_files
from ftaudit.report import Report
from ftaudit.sources import Snapshot
from ftaudit.sources.adapters import AdaptedTensors, LoraModule, expert_factors
from ftaudit.sources.checkpoint import Checkpoint, is_training_state, training_checkpoints
from ftaudit.sources.local import LocalStorage
from ftaudit.sources.safetensors import FLOAT_DTYPES, TensorInfo
from ftaudit.sources.storage import Storage
from ftaudit.sources.stored_as import StoredAs
from ftaudit.sources.tied import is_head
from ftaudit.spectral import Basis, base_basis, resolve_device, upcast
from ftaudit.writer import ModelFolder, Replace

log = logging.getLogger("ftaudit")

OTHER_WEIGHT_SUFFIXES = (
    ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack", ".onnx", ".onnx_data", ".gguf", ".ot", ".tflite",
)
"""Weights in formats the fix does not rewrite: left out of the output, which would otherwise hold
both the patched and the unpatched values."""
OTHER_COPY_STEMS = ("model", "consolidated")
"""Safetensors files of these names, beside the weights the fix writes, are other copies of them: a full model beside
an adapter (the adapter merged, or its base), Mistral's `consolidated`."""
ADAPTER_CONFIG = "adapter_config.json"
CARD = "README.md"
CONFIG = "config.json"
INDEX = "model.safetensors.index.json"

Phases = Callable[[str], Progress | None]
"""Given a phase's name (`auditing input`, `writing`, `auditing output`), its progress callback."""


@dataclass(frozen=True)
class FixOptions:
    lam: float = 0.75
    """Each intruder's singular value σ becomes λσ (1: nothing changes, 0: the direction is removed)."""
    only_top: int | None = None
    """Scale only this many intruders per matrix, those of largest σ."""
    merge: bool = False
    """For an adapter: write the merged model instead of an adapter."""

    def __post_init__(self) -> None:
        if not 0 <= self.lam <= 1:  # NaN too: it would write NaN weights, and λ > 1 adds forgetting
            raise UsageError(f"λ must be a number from 0 to 1, not {self.lam}")
        if self.only_top is not None and self.only_top < 1:
            raise UsageError(f"only_top must be at least 1, not {self.only_top}")


def fix(
    target: Target,
    out: Path,
    options: AuditOptions,
    fix_options: FixOptions,
    policy: Policy,
    phases: Phases | None = None,
    cache: SpectrumCache | None = None,
) -> FixResult:
    """Write the patched model to `out` (which must not exist, or be empty, and must not be inside the folder of the
    model or its base) and return what was done."""
    phase = phases or (lambda name: None)
    # the destination first: one that cannot be written fails before the work, not after it
    _refuse_out_inside(out, {"model": target.model, "base": target.base})
    with ModelFolder(out) as folder, flushed(cache):
        opened = open_target(target)
        if opened.base.revision is None:  # a local folder the model's card names
            _refuse_out_inside(out, {"base": opened.base.id})
        adapter = opened.tuned_side if isinstance(opened.tuned_side, AdaptedTensors) else None
        if fix_options.merge and adapter is None:
            raise UsageError(f"{opened.tuned.id} is a full model: --merge applies only to LoRA adapters")
        fmt = "model" if adapter is None else "merged" if fix_options.merge else "adapter"
        storage, weights = _weights_to_write(opened, fmt)
        before = audit_opened(opened, options, policy, phase("auditing input"), cache)
        patcher = _Patcher(opened, before, options, fix_options, cache)
        sources, left_out = _sources(opened, fmt)
        untie = fmt == "merged" and patcher.merge_unties()
        if fmt == "merged":
            patcher.check_mergeable()
        if untie and CONFIG not in sources:
            raise UnsupportedError(
                f"{opened.base.storage.label}: has no config.json, in which the merged model must say that its head "
                "is untied from the input embedding (tie_word_embeddings: false), as PEFT's merge saves it: pass the "
                "base with its config.json, or write the adapter instead (without --merge)")
        if fmt == "adapter":
            patcher.check_adapter_can_hold()
        card = _card_to_update(opened.tuned.storage) if patcher.pairs or fmt == "merged" else ""
        replace: Replace = {"model": patcher.model_tensor, "adapter": patcher.adapter_tensor,
                            "merged": patcher.merged_tensor}[fmt]
        heads = patcher.untied_heads() if fmt == "merged" else {}
        _write_weights(folder, storage, weights, replace, phase("writing"), heads)
        rewritten = _untie(folder, sources, weights, heads) if untie else set()
        changed = bool(patcher.changes) or fmt == "merged"
        left_out, unpatched, audit_files = _copy_files(folder, sources, left_out, fmt, weights, keep_card=not changed,
                                                       rewritten=rewritten)
        written = Snapshot(str(out), None, LocalStorage(folder.path, label=str(out)))  # named as it will be
        after = audit_opened(
            open_target(Target(str(out), base=before.base.id, base_revision=before.base.revision, token=target.token,
                               allow_pickle=target.allow_pickle), written),
            options, policy, phase("auditing output"), cache,
        )
        after.base = before.base
        result = FixResult(
            tool={"name": "ftaudit", "version": __version__},
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            output=str(out), format=fmt,
            settings=FixSettings(fix_options.lam, options.epsilon, options.k, fix_options.only_top),
            before=before, after=after, changes=patcher.changes, files_left_out=left_out,
            files_copied_unpatched=unpatched,
        )
        if changed:
            section = fix_render.render_card_section(result, badge_path=BADGE if BADGE in audit_files else None,
                                                     heatmap_path=HEATMAP if HEATMAP in audit_files else None)
            folder.write_bytes(CARD, cardfile.update_card(card, section, fix_render.card_data(result)).encode("utf-8"))
            for name, text in repo_files(result.after, audit_files).items():
                folder.write_bytes(name, text.encode("utf-8"))
        folder.commit()
    return result


def _refuse_out_inside(out: Path, inputs: dict[str, str | None]) -> None:
    """Refuse an `out` inside the folder of an input (`model` or `base`, each a folder or a Hub id): that folder would
    then hold the output, whose files a later audit or fix of it would take for its own."""
    for side, spec in inputs.items():
        folder = Path(spec).expanduser() if spec else None
        # isdir: False for a path that cannot be looked at, whose opening says why
        if folder is not None and os.path.isdir(folder) and folder.resolve() in out.resolve().parents:
            raise UsageError(f"{out}: is inside the {side}'s folder {spec}; choose a --out outside it")


def _weights_to_write(opened: Opened, fmt: str) -> tuple[Storage, Checkpoint]:
    """The safetensors checkpoint the output is a patched copy of, and its storage."""
    weights: Tensors
    if fmt == "merged":
        storage, weights = opened.base.storage, opened.base_side
        if opened.base_ref.quantization is not None:
            raise UnsupportedError(
                f"{storage.label}: {opened.base_ref.quantization} weights, which a merged model written in the base's "
                "files and dtypes cannot hold: pass the full-precision base with --base, or write the adapter instead "
                "(without --merge)")
    elif fmt == "adapter":
        assert isinstance(opened.tuned_side, AdaptedTensors)
        storage, weights = opened.tuned.storage, opened.tuned_side.adapter.weights
    else:
        tuned = opened.tuned_side
        storage, weights = opened.tuned.storage, tuned.side if isinstance(tuned, StoredAs) else tuned
    if not isinstance(weights, Checkpoint):
        hint = "; pass --merge to write a merged model instead" if fmt == "adapter" else ""
        raise UnsupportedError(
            f"{storage.label}: the weights are pickle files; ftaudit fix writes safetensors only{hint}")
    return storage, weights


def _write_weights(folder: ModelFolder, storage: Storage, weights: Checkpoint, replace: Replace,
                   progress: Progress | None, heads: dict[str, str]) -> None:
    """Write the weights' files, each with its tensors replaced, and each head of `heads` (head → embedding) added
    after the file that holds its embedding, of that embedding's dtype and shape."""
    files = sorted({ref.file for ref in weights.tensors.values()})
    added: dict[str, list[TensorInfo]] = {}
    for head, embedding in heads.items():
        ref = weights.tensors[embedding]
        added.setdefault(ref.file, []).append(TensorInfo(head, ref.info.dtype, ref.info.shape, 0, ref.info.nbytes))
    total, done = len(weights.tensors) + len(heads), 0
    left = {name: n + 1 for name, n in Counter(weights.copies.values()).items()}
    """The tensors whose values a copy holds too (a tied head's embedding): how many of them and their copies are yet
    to be written."""
    values: dict[str, torch.Tensor | None] = {}

    def step(name: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total, name)

    def new_value(info: TensorInfo) -> torch.Tensor | None:
        """The new value of a tensor; a copy's, and that of the tensor it copies, computed once for both."""
        name = weights.copies.get(info.name, info.name)
        if name not in left:
            return replace(info)
        if name not in values:
            values[name] = replace(weights.tensors[name].info)
        left[name] -= 1
        return values[name] if left[name] else values.pop(name)

    def as_stored(info: TensorInfo) -> torch.Tensor | None:
        """The new value in the file's shape: a stack read from a 2-D tensor (DBRX's experts) goes back to 2-D."""
        new = new_value(info)
        return new if new is None or new.numel() != math.prod(info.shape) else new.reshape(info.shape)

    for file in files:
        folder.write_safetensors(storage, file, as_stored, step, added.get(file, []))


def _untie(folder: ModelFolder, sources: dict[str, Storage], weights: Checkpoint, heads: dict[str, str]) -> set[str]:
    """Write config.json untied (`untied_config`) and the shard index with the added `heads` (head → embedding), as
    PEFT's merge saves them; return the names of the files written, not to be copied."""
    config = untied_config(_json_file(sources, CONFIG))
    folder.write_bytes(CONFIG, (json.dumps(config, indent=2) + "\n").encode("utf-8"))
    written = {CONFIG}
    if heads and INDEX in sources and "model.safetensors" not in {ref.file for ref in weights.tensors.values()}:
        index = _json_file(sources, INDEX)  # the weights are its shards
        for head, embedding in heads.items():
            index["weight_map"][head] = weights.tensors[embedding].file
            if isinstance(index.get("metadata", {}).get("total_size"), int):
                index["metadata"]["total_size"] += weights.tensors[embedding].info.nbytes
        folder.write_bytes(INDEX, (json.dumps(index, indent=2) + "\n").encode("utf-8"))
        written.add(INDEX)
    return written


def untied_config(config: dict[str, Any]) -> dict[str, Any]:
    """A model's config.json with its head untied from its input embedding: `tie_word_embeddings: false` at its top
    level and in its text_config, where transformers may read it (a multimodal model's)."""
    text = config.get("text_config")
    return {**config, "tie_word_embeddings": False,
            **({"text_config": {**text, "tie_word_embeddings": False}} if isinstance(text, dict) else {})}


def _json_file(sources: dict[str, Storage], name: str) -> dict[str, Any]:
    """A JSON object file of the output's sources (config.json or the shard index, maybe the adapter's own)."""
    storage = sources[name]
    try:
        data = json.loads(storage.read(name, 0, storage.size(name)))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidWeightsError(f"{storage.label}/{name}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InvalidWeightsError(f"{storage.label}/{name}: not a JSON object")
    return data


def _copy_files(
    folder: ModelFolder, sources: dict[str, Storage], left_out: list[str], fmt: str, weights: Checkpoint,
    keep_card: bool, rewritten: set[str],
) -> tuple[list[str], list[str], list[str]]:
    """Copy the input's other files (`_sources`: where each comes from, and those left out already) but those
    `rewritten`; return what is left out (weights in other formats or other copies, and training checkpoint folders,
    as `checkpoint-500/`), the safetensors files in subfolders copied as they are, and, unless `keep_card`, the audit's
    files (badge, heatmap) the input had, which are not copied: they are the card's, to be rewritten with it."""
    written = {ref.file for ref in weights.tensors.values()} | rewritten
    stem = "adapter_model" if fmt == "adapter" else "model"
    sources, left_out = dict(sources), list(left_out)
    audit_files: list[str] = []
    if not keep_card:
        audit_files = [name for name in REPO_FILES if name in sources]
        for name in (CARD, *audit_files):
            sources.pop(name, None)
    checkpoints = training_checkpoints(set(sources) - written)
    unpatched = []
    for name, storage in sorted(sources.items()):
        if name in written or name.startswith(tuple(checkpoints)):
            continue
        if _other_weights(name) or _other_copy(name, stem) or _stale_index(name, stem, written):
            left_out.append(name)
            continue
        if "/" in name and name.endswith(".safetensors"):
            unpatched.append(name)
        folder.copy_file(storage, name)
    if left_out:
        log.warning("left out %d file(s) of weights in other formats or other copies, which would keep the unpatched "
                    "values: %s", len(left_out), ", ".join(sorted(left_out)))
    if checkpoints:
        log.warning("left out %d training checkpoint folder(s), earlier states of the run whose weights are not "
                    "patched: %s", len(checkpoints), ", ".join(checkpoints))
    if unpatched:
        log.warning("copied %d safetensors file(s) in subfolders as they are, neither audited nor patched (the audit "
                    "reads the top-level weights only): %s", len(unpatched), ", ".join(unpatched))
    return sorted(left_out + checkpoints), unpatched, audit_files


def _sources(opened: Opened, fmt: str) -> tuple[dict[str, Storage], list[str]]:
    """Where each file to copy comes from, and the files left out already. A merged model takes the base's files,
    then the adapter's own extras (a head, a tokenizer) over them, but for a full model's weights and index in the
    adapter's folder, which would stand beside or over the base's: those are left out."""
    tuned = opened.tuned.storage
    if fmt != "merged":
        return dict.fromkeys(tuned.files(), tuned), []
    base = opened.base.storage
    sources: dict[str, Storage] = dict.fromkeys(base.files(), base)
    left_out = []
    for name in tuned.files():
        if name == ADAPTER_CONFIG or name.startswith("adapter_model."):
            continue
        if name == INDEX or _other_copy(name, "model"):
            if name not in sources:
                left_out.append(name)
        else:
            sources[name] = tuned
    return sources, left_out


def _factor_tensors(module: LoraModule) -> list[str]:
    """The adapter's tensors that hold `module`'s update: A and B, and AdaLoRA's E."""
    return [module.a, module.b, *([module.singular] if module.singular is not None else [])]


def _stale_index(name: str, stem: str, written: set[str]) -> bool:
    """The shard index beside the single file written (`model.safetensors`), which transformers loads instead of it."""
    return name == f"{stem}.safetensors.index.json" and f"{stem}.safetensors" in written


def _other_copy(name: str, stem: str) -> bool:
    """A safetensors copy of the weights that is not the one written: the shards of `model.safetensors.index.json`
    beside `model.safetensors` (which transformers loads instead), a variant (`model.fp16.safetensors`), a full
    model beside an adapter, ..."""
    if "/" in name or name == f"{stem}.safetensors.index.json":
        return False
    if not name.endswith((".safetensors", ".safetensors.index.json")):
        return False
    return name.startswith(tuple(f"{s}{sep}" for s in (stem, *OTHER_COPY_STEMS) for sep in ".-"))


def _other_weights(name: str) -> bool:
    """A file of weights in another format; not a training run's state (`optimizer.pt`), which is copied."""
    if is_training_state(name):
        return False
    lowered = PurePosixPath(name).name.lower()
    return lowered.endswith(OTHER_WEIGHT_SUFFIXES) or any(
        lowered.endswith(f"{suffix}.index.json") for suffix in OTHER_WEIGHT_SUFFIXES
    )


def _read_card(storage: Storage) -> str:
    """The card as text, line endings untouched ('' when there is none)."""
    if CARD not in storage.files():
        return ""
    try:
        return storage.read(CARD, 0, storage.size(CARD)).decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{storage.label}/{CARD}: the card is not UTF-8 text") from None


def _card_to_update(storage: Storage) -> str:
    """The card, checked now, before the work, that it can take the fix's section and front-matter key."""
    card = _read_card(storage)
    try:
        cardfile.update_card(card, "", {})
    except UsageError as e:
        raise UsageError(f"{storage.label}/{CARD}: {e}") from None
    return card


class _Patcher:
    """The new value of each tensor the output holds, computed when the writer reaches it."""

    def __init__(self, opened: Opened, before: Report, options: AuditOptions, fix_options: FixOptions,
                 cache: SpectrumCache | None) -> None:
        self.tuned = opened.tuned_side
        self.base = opened.base_side
        self.base_tied = opened.base_tied
        self.options = options
        self.lam = fix_options.lam
        self.only_top = fix_options.only_top
        self.cache = cache
        self.device = resolve_device(options.device)
        flagged = {m.name for m in before.matrices if m.intruders > 0} if fix_options.lam != 1 else set()
        aliases = self.tuned.tied if isinstance(self.tuned, AdaptedTensors) else {}
        pairing = pair_tensors(self.base.infos, self.tuned.infos, options.selection, layout=opened.layout,
                               aliases=aliases)
        self.pairs: dict[str, list[TensorPair]] = {}
        """The flagged matrices of each tuned tensor: itself, or experts of a stack."""
        tied = {head["name"]: head["embedding"] for head in opened.tied_heads if head["side"] == "model"}
        for pair in pairing.pairs:
            if pair.name in flagged and pair.tuned_name in tied:
                log.warning("%s, which the model stores as its input embedding %s (tie_word_embeddings), is left as it "
                            "is: scaling its intruders would change the embedding too", pair.name,
                            tied[pair.tuned_name])
            elif pair.name in flagged:
                self.pairs.setdefault(pair.tuned_name, []).append(pair)
        self.changes: list[MatrixChange] = []
        self._pending: dict[str, torch.Tensor] = {}
        self._factor_of: dict[str, list[str]] = {}
        """Each adapter tensor to rewrite: the tuned tensors with flagged matrices that it holds."""
        if isinstance(self.tuned, AdaptedTensors):
            infos = self.tuned.infos
            for name in self.pairs:
                module = self.tuned.module(name)
                for factor in _factor_tensors(module) if module else [infos[name].name]:
                    self._factor_of.setdefault(factor, []).append(name)

    # --- the three kinds of output --------------------------------------------------------------

    def model_tensor(self, info: TensorInfo) -> torch.Tensor | None:
        """A full model's tensor: patched, or None (copy it). A tensor audited as the base stores it (its experts'
        parts, or under another name) is patched there and stored back as it was."""
        views = self.tuned.views_of(info.name) if isinstance(self.tuned, StoredAs) else []
        if not views:
            return self._patched(info.name, self.pairs.get(info.name, []), info.name)
        assert isinstance(self.tuned, StoredAs)
        patched = {name: value for name in views
                   if (value := self._patched(name, self.pairs.get(name, []), info.name)) is not None}
        return self.tuned.assemble(info.name, patched) if patched else None

    def adapter_tensor(self, info: TensorInfo) -> torch.Tensor | None:
        """An adapter file's tensor: new LoRA factors, a patched whole tensor (modules_to_save), or None."""
        if info.name in self._pending:
            return self._pending.pop(info.name)
        names = self._factor_of.pop(info.name, None)
        if names is None:
            return None
        assert isinstance(self.tuned, AdaptedTensors)
        module = self.tuned.module(names[0])
        if module is None and self.tuned.part(names[0]) is not None:
            return self._patched_parts(names, info.name)
        if module is None:
            return self._patched(names[0], self.pairs[names[0]], info.name)
        tensors = _factor_tensors(module)
        for other in tensors:
            self._factor_of.pop(other, None)
        weights = self.tuned.adapter.weights
        new = {n: weights.load(n).clone() for n in tensors}
        changed = False
        for expert, pairs in self._by_expert(names).items():  # the matrix, or the flagged experts of a stack
            found = [(pair, d) for pair in pairs if (d := self._directions(pair)) is not None]
            if not found:
                continue
            w, u = self._expert_update(found)
            if not torch.isfinite(w).all():  # another part of the expert's matrix holds NaN or Inf: keep its factors
                continue
            a, b = expert_factors(new[module.a], new[module.b], module, expert)
            # w is out × in; ΔW as stored is (B·A)ᵀ with fan_in_fan_out, and so B·A out × in for a Conv1D layer
            transpose = module.transpose != pairs[0].transposed
            a64 = upcast(a, self.device)
            if module.singular is not None:  # AdaLoRA's A ⊙ E, written as A' with E' = 1
                a64 = a64 * upcast(new[module.singular], self.device)
                new[module.singular].fill_(1)
            factors = refactor_lora(upcast(b, self.device), a64, w, u, self.lam, module.scaling, transpose)
            for pair, (_, directions) in found:
                self._record(pair, directions, tensors, factors.error)
            a.copy_(factors.a)
            b.copy_(factors.b)
            changed = True
        if not changed:
            return None
        self._pending.update({n: value for n, value in new.items() if n != info.name})
        return new[info.name]

    def _patched_parts(self, names: list[str], stored_as: str) -> torch.Tensor | None:
        """Adapter tensor `stored_as`, a layers' stack saved whole whose experts the base stores in parts, with the
        intruders of its parts `names` scaled; None when none has any."""
        assert isinstance(self.tuned, AdaptedTensors)
        stack: torch.Tensor | None = None
        for name in names:
            patched = self._patched(name, self.pairs[name], stored_as)
            part = self.tuned.part(name)
            if patched is None or part is None:
                continue
            if stack is None:
                stack = self.tuned.adapter.weights.load(stored_as).clone()
            stack[part.expert, part.start:part.stop] = patched
        return stack

    def _by_expert(self, names: list[str]) -> dict[int | None, list[TensorPair]]:
        """The flagged matrices of tuned tensors `names`, which one LoRA adapts, by the expert whose factors hold them
        (None for a layer's LoRA): a stack's experts, or the parts of an expert's matrix the base stores apart."""
        assert isinstance(self.tuned, AdaptedTensors)
        groups: dict[int | None, list[TensorPair]] = {}
        for name in names:
            part = self.tuned.part(name)
            for pair in self.pairs[name]:
                groups.setdefault(part.expert if part else pair.expert, []).append(pair)
        return groups

    def _expert_update(self, found: list[tuple[TensorPair, tuple[torch.Tensor, Directions]]]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The tuned matrix that one pair of factors adapts and the directions to scale in it, as columns: those of
        one matrix, or of the parts of an expert's matrix, each at its rows."""
        assert isinstance(self.tuned, AdaptedTensors)
        first = found[0][0].tuned_name
        if self.tuned.part(first) is None:
            [(_, (w, directions))] = found
            return w, directions.U
        flagged = {pair.tuned_name: w for pair, (w, _) in found}
        w = torch.cat([flagged[name] if name in flagged else upcast(self.tuned.load(name), self.device)
                       for name in self.tuned.parts_of(first)])
        u = w.new_zeros(w.shape[0], sum(len(d.index) for _, (_, d) in found))
        column = 0
        for pair, (_, directions) in found:
            part = self.tuned.part(pair.tuned_name)
            assert part is not None
            u[part.start:part.stop, column:column + len(directions.index)] = directions.U
            column += len(directions.index)
        return w, u

    def merged_tensor(self, info: TensorInfo) -> torch.Tensor | None:
        """A base tensor of the merged model: adapted (and patched), replaced, or None (copy it)."""
        if info.name not in self.tuned.infos:
            return None
        merged = self._patched(info.name, self.pairs.get(info.name, []), info.name)
        if merged is None:
            merged = self.tuned.load(info.name)
        return merged.to(dtype=FLOAT_DTYPES[info.dtype], device="cpu")

    def untied_heads(self) -> dict[str, str]:
        """The heads that the adapter saves whole and that the base ties to its input embedding and stores not (head →
        embedding): PEFT's merge unties them, and the merged model stores them beside the embedding."""
        aliases = {} if isinstance(self.base, StoredAs) else self.base.aliases  # an adapter's base: no StoredAs
        return {name: aliases[name] for name in self.tuned.infos if name in aliases}

    def _saved_tied(self) -> set[str]:
        """The tensors the base's config.json ties (`Opened.base_tied`) that the adapter saves whole."""
        if not isinstance(self.tuned, AdaptedTensors) or isinstance(self.base, StoredAs):
            return set()
        return saved_whole(self.tuned.adapter, self.base) & self.base_tied

    def merge_unties(self) -> bool:
        """Whether PEFT's merge unties the base's head from its embedding: the adapter saves either whole."""
        return bool(self.untied_heads() or self._saved_tied())

    def check_mergeable(self) -> None:
        """Every tensor the adapter stores whole must have a base tensor of its shape to replace, or be a head that the
        merged model stores untied (`untied_heads`), of its embedding's shape; an embedding saved whole whose tied head
        the base stores not, the head saved whole too."""
        saved = self._saved_tied()
        if saved and not self.untied_heads() and not any(is_head(name) for name in self.base_tied):
            raise UnsupportedError(
                f"the adapter saves {', '.join(sorted(saved))} whole, which the base ties to its output head "
                "(tie_word_embeddings) and stores once: PEFT's merge unties the two, the head keeping the base's "
                "values under a name the base does not store: write the adapter instead (without --merge)")
        base = self.base.infos
        for name, info in self.tuned.infos.items():
            if name not in base or base[name].shape != info.shape or base[name].dtype not in FLOAT_DTYPES:
                raise UnsupportedError(
                    f"the adapter's {info.name} has no floating-point tensor of shape {list(info.shape)} to replace "
                    "in the base: write the adapter instead (without --merge)"
                )

    def check_adapter_can_hold(self) -> None:
        """Every matrix to patch must be stored by the adapter as LoRA factors or whole: token rows cannot hold a patch
        of the whole matrix, nor DoRA's factors and magnitudes that of the matrix they rescale."""
        assert isinstance(self.tuned, AdaptedTensors)
        for name, pairs in self.pairs.items():
            module = self.tuned.module(name)
            if module is not None and module.magnitude is not None:
                raise UnsupportedError(
                    f"{pairs[0].name}: a DoRA module (use_dora), whose factors and magnitudes cannot hold the fix of "
                    "the matrix they rescale: pass --merge to write a merged model")
            if self.tuned.token_rows(name):
                raise UnsupportedError(
                    f"{pairs[0].name}: the adapter stores only some of its rows (trainable_token_indices), which cannot "
                    "hold the fix of the whole matrix: pass --merge to write a merged model"
                )

    # --- one tensor, one matrix ---------------------------------------------------------------------

    def _patched(self, name: str, pairs: list[TensorPair], stored_as: str) -> torch.Tensor | None:
        """Tuned tensor `name` with the intruders of its matrices `pairs` scaled (the compared rows of a matrix, the
        experts of a stack), on the CPU; None when none has any. `stored_as` names the tensor in the file written."""
        out: torch.Tensor | None = None
        for pair in pairs:
            found = self._directions(pair)
            if found is None:
                continue
            w, directions = found
            self._record(pair, directions, [stored_as])
            if out is None:
                out = self.tuned.load(name).clone()
            matrix = out if pair.expert is None else out[pair.expert]
            matrix[: pair.rows] = self._scaled(pair, w, directions)
        return out

    def _directions(self, pair: TensorPair) -> tuple[torch.Tensor, Directions] | None:
        """The tuned matrix (float64, on the device; the compared rows; out × in) and its intruders; None when none."""
        raw_w0 = as_analysed(self.base.load(pair.base_name, pair.expert)[: pair.rows], pair.transposed)
        w0 = upcast(raw_w0, self.device)
        tuned = as_analysed(self.tuned.load(pair.tuned_name, pair.expert)[: pair.rows], pair.tuned_transposed)
        w = upcast(tuned, self.device)
        if not (torch.isfinite(w0).all() and torch.isfinite(w).all()):
            return None
        exponent = scale_exponent(raw_w0, tuned)  # measured as the audit measures them; scaling them down is homogeneous
        w0_scaled, w_scaled = scaled(w0, exponent), scaled(w, exponent)
        found = find_directions(self._basis(raw_w0, w0_scaled), w0_scaled, w_scaled, self.options.k,
                                self.options.epsilon, self.only_top)
        found = Directions(found.index, found.U, unscaled(found.sigma, exponent, pair.name), found.max_cos)
        return (w, found) if found.index else None

    def _scaled(self, pair: TensorPair, w: torch.Tensor, found: Directions) -> torch.Tensor:
        """The tuned matrix with its intruders scaled, as stored (in × out again for a Conv1D layer)."""
        return as_analysed(scale_directions(w, found.U, self.lam), pair.tuned_transposed)

    def _basis(self, raw_w0: torch.Tensor, w0: torch.Tensor) -> Basis:
        if self.cache is None:
            return base_basis(w0)
        return self.cache.get_or_compute(tensor_key(raw_w0), lambda: base_basis(w0)).to(self.device)

    def _record(self, pair: TensorPair, found: Directions, tensors: list[str], error: float | None = None) -> None:
        self.changes.append(MatrixChange(
            name=pair.name, tensors=tensors, directions=found.index, sigma_before=found.sigma,
            sigma_after=[self.lam * s for s in found.sigma], max_cos=found.max_cos, truncation_error=error,
        ))

