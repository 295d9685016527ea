"""Real safetensors checkpoints made in tests: small Llama-shaped models and tuned variants."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import save, save_file

MODULES = {
    "self_attn.q_proj": "hh", "self_attn.k_proj": "hh", "self_attn.v_proj": "hh", "self_attn.o_proj": "hh",
    "mlp.gate_proj": "fh", "mlp.up_proj": "fh", "mlp.down_proj": "hf",
}


def llama_like(layers: int = 2, hidden: int = 32, ffn: int = 48, vocab: int = 50, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A random model with Llama's tensor names and shapes (embeddings, norms, head included)."""
    g = torch.Generator().manual_seed(seed)
    dims = {"h": hidden, "f": ffn}
    tensors = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g)}
    for i in range(layers):
        for module, (rows, cols) in MODULES.items():
            tensors[f"model.layers.{i}.{module}.weight"] = torch.randn(dims[rows], dims[cols], generator=g) / hidden**0.5
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(hidden)
    tensors["model.norm.weight"] = torch.ones(hidden)
    tensors["lm_head.weight"] = torch.randn(vocab, hidden, generator=g)
    return {k: v.to(dtype) for k, v in tensors.items()}


def low_rank_update(tensors: dict[str, torch.Tensor], rank: int = 2, scale: float = 3.0, seed: int = 1,
                    only: str = "proj") -> dict[str, torch.Tensor]:
    """Add a strong random rank-`rank` update to every matrix whose name contains `only`: intruders."""
    g = torch.Generator().manual_seed(seed)
    out = dict(tensors)
    for name, w in tensors.items():
        if w.ndim == 2 and only in name:
            b = torch.randn(w.shape[0], rank, generator=g)
            a = torch.randn(rank, w.shape[1], generator=g)
            delta = b @ a
            delta *= scale * torch.linalg.matrix_norm(w.float(), ord=2) / torch.linalg.matrix_norm(delta, ord=2)
            out[name] = (w.float() + delta).to(w.dtype)
    return out


def small_update(tensors: dict[str, torch.Tensor], scale: float = 1e-3, seed: int = 2) -> dict[str, torch.Tensor]:
    """Add a small dense update everywhere: a gentle full fine-tune, no intruders."""
    g = torch.Generator().manual_seed(seed)
    return {k: (v.float() + scale * torch.randn(v.shape, generator=g) * v.float().std()).to(v.dtype)
            for k, v in tensors.items()}


def card(base: str | list[str] | None = None, **extra: object) -> str:
    """A model card with YAML front matter."""
    meta = {"license": "apache-2.0", **({"base_model": base} if base is not None else {}), **extra}
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n# A model\n\nSome text.\n"


def write_model(folder: Path, tensors: dict[str, torch.Tensor], *, readme: str | None = None,
                shards: int = 1) -> Path:
    """Write tensors as model.safetensors, or as `shards` files with an index."""
    folder.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        save_file(tensors, folder / "model.safetensors")
    else:
        names = sorted(tensors)
        weight_map = {}
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = names[i::shards]
            save_file({n: tensors[n] for n in part}, folder / file)
            weight_map.update(dict.fromkeys(part, file))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if readme is not None:
        (folder / "README.md").write_text(readme)
    return folder


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file of a folder, for serving from the test Hub."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save(tensors)


def pickled_copies(root: Path, tensors: dict[str, dict[str, torch.Tensor]], to: Path) -> Path:
    """`to`, holding copies of root/base and root/tuned whose weights are `tensors[side]` pickled (pytorch_model.bin)
    in place of their safetensors."""
    for side in ("base", "tuned"):
        shutil.copytree(root / side, to / side, ignore=shutil.ignore_patterns("*.safetensors"))
        torch.save(tensors[side], to / side / "pytorch_model.bin")
    return to


TRAINER_STATE = ["optimizer.pt", "rng_state.pth", "scaler.pt", "scheduler.pt", "training_args.bin"]
"""What transformers' Trainer saves beside the weights in a checkpoint folder, besides trainer_state.json."""


def write_trainer_state(folder: Path) -> Path:
    """Save into `folder` a training run's state as transformers' Trainer does in a checkpoint folder: its
    TrainingArguments, optimizer, scheduler, scaler and random states (pickles, none of them weights)."""
    import random

    from transformers import TrainingArguments

    torch.save(TrainingArguments(output_dir=str(folder), report_to=[]), folder / "training_args.bin")
    weight = torch.nn.Parameter(torch.ones(4, 4))
    optimizer = torch.optim.AdamW([weight], lr=1e-3)
    weight.sum().backward()
    optimizer.step()
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0).state_dict(), folder / "scheduler.pt")
    torch.save(torch.amp.GradScaler("cpu").state_dict(), folder / "scaler.pt")
    torch.save({"python": random.getstate(), "cpu": torch.random.get_rng_state()}, folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    return folder


def trainer_run(folder: Path, tensors: dict[str, torch.Tensor], steps: int = 2, save_model: bool = True) -> Path:
    """`folder`: the output folder of a real transformers Trainer run of a small Llama (llama_like's shapes) that
    starts from `tensors`: `checkpoint-1/` ... `checkpoint-{steps}/` (weights, config, optimizer, scheduler, random
    states, trainer_state.json), then, with `save_model`, the final model saved at the top. The learning rate is too
    small to move the weights visibly: the model keeps what `tensors` hold (intruders included)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    hidden = tensors["model.norm.weight"].numel()
    vocab, ffn = tensors["model.embed_tokens.weight"].shape[0], tensors["model.layers.0.mlp.up_proj.weight"].shape[0]
    layers = sum(name.endswith("input_layernorm.weight") for name in tensors)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=16)
    model = LlamaForCausalLM(config)
    model.load_state_dict(tensors, strict=False)  # the norms llama_like lacks keep their initial ones
    ids = torch.randint(0, vocab, (2 * steps, 8), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(output_dir=str(folder), max_steps=steps, save_steps=1, per_device_train_batch_size=2,
                             learning_rate=1e-9, use_cpu=True, report_to=[], logging_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": row, "labels": row} for row in ids])
    trainer.train()
    if save_model:
        trainer.save_model()
    return folder
