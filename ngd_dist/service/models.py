"""Built-in models: the small ones of the quickstart, tests and benchmarks, a CIFAR ResNet-18, a GPT,
and Hugging Face ``transformers`` models (:func:`hf_causal_lm`, :func:`hf_sequence_classification`).

Every built-in of this package is made of modules K-FAC handles (``nn.Linear``, ``nn.Conv2d`` with
``groups=1``, dense ``nn.Embedding``) plus normalisation layers that are left to the base
optimizer. The logits module of each built-in is listed by
:func:`ngd_dist.service.catalog.output_module_of`; a Hugging Face model declares its own as
``ngd_output_module``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def mlp(in_features: int = 64, hidden: int = 128, classes: int = 10, depth: int = 2) -> nn.Sequential:
    """A ReLU MLP that flattens its input; ``depth`` hidden layers of width ``hidden``."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def small_cnn(channels: int = 1, classes: int = 10, width: int = 16, side: int = 8) -> nn.Sequential:
    """Two 3x3 convolutions (the second with stride 2) and a linear head."""
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * width * ((side + 1) // 2) ** 2, classes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection (1x1 projection when needed)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, no max-pool, four stages of BasicBlocks, average pool, ``fc``."""

    ngd_output_module = "fc"
    ngd_task = "classification"

    def __init__(
        self, blocks: tuple[int, int, int, int], num_classes: int, in_channels: int, width: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        channels = width
        stages: list[nn.Sequential] = []
        for stage, count in enumerate(blocks):
            out = width * 2**stage
            stride = 1 if stage == 0 else 2
            layers = [BasicBlock(channels, out, stride)] + [BasicBlock(out, out) for _ in range(count - 1)]
            stages.append(nn.Sequential(*layers))
            channels = out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` to logits ``(B, num_classes)``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> ResNet:
    """ResNet-18 for small images (CIFAR-10/100, 32x32): the standard K-FAC convolutional benchmark.

    A 3x3 stem convolution (no max-pool), four stages of two BasicBlocks with ``width``, 2x, 4x and
    8x channels (stride 2 from the second stage on), global average pooling and a linear head named
    ``fc``. Its 20 convolutions (bias-free, groups=1, followed by BatchNorm) and ``fc`` are the 21
    layers K-FAC preconditions; BatchNorm is left to the base optimizer. ``width=64`` is the usual
    11.2M-parameter network; a smaller ``width`` gives a cheap stand-in for tests.
    """
    _positive(num_classes=num_classes, in_channels=in_channels, width=width)
    return ResNet((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, width=width)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate ``q``, ``k``, ``v`` and ``out`` projections."""

    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, d_model)`` to ``(B, T, d_model)``; position t attends to positions <= t."""
        b, t, d = x.shape

        def heads(y: Tensor) -> Tensor:
            return y.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            heads(self.q(x)),
            heads(self.k(x)),
            heads(self.v(x)),
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=True,
        )
        return self.resid_drop(self.out(y.transpose(1, 2).reshape(b, t, d)))


class FeedForward(nn.Module):
    """The transformer MLP: ``fc`` (d to 4d), GELU, ``proj`` (4d to d), dropout."""

    def __init__(self, d_model: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.proj = nn.Linear(4 * d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Position-wise MLP."""
        return self.drop(self.proj(F.gelu(self.fc(x))))


class GPTBlock(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = FeedForward(d_model, dropout)

    def forward(self, x: Tensor) -> Tensor:
        """One residual attention and one residual MLP step."""
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only transformer: token and position embeddings, blocks, final LayerNorm, ``head``."""

    ngd_output_module = "head"
    ngd_task = "language_model"

    def __init__(
        self, vocab_size: int, block_size: int, d_model: int, n_layer: int, n_head: int, dropout: float
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(block_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(GPTBlock(d_model, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            elif param.dim() == 2:  # Linear and Embedding weights; residual projections scaled down
                residual = name.endswith(("attn.out.weight", "mlp.proj.weight"))
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * n_layer) if residual else 0.02)

    def forward(self, idx: Tensor) -> Tensor:
        """Token ids ``(B, T)`` (int64, ``T <= block_size``) to next-token logits ``(B, T, vocab_size)``."""
        if idx.dim() != 2:
            raise ValueError(f"gpt expects token ids of shape (B, T), got {tuple(idx.shape)}")
        b, t = idx.shape
        if t > self.block_size:
            raise ValueError(f"gpt: sequence length {t} exceeds block_size {self.block_size}")
        # positions per (sample, token) so that every embedding row belongs to one token
        positions = torch.arange(t, device=idx.device).expand(b, t)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def gpt(
    vocab_size: int = 256,
    block_size: int = 64,
    d_model: int = 128,
    n_layer: int = 2,
    n_head: int = 4,
    dropout: float = 0.0,
) -> GPT:
    """A small GPT for next-token prediction (byte-level text, synthetic token streams).

    Token and position ``nn.Embedding`` tables, ``n_layer`` pre-LayerNorm blocks (causal
    self-attention through ``scaled_dot_product_attention(is_causal=True)`` with separate ``q``,
    ``k``, ``v``, ``out`` projections; a GELU MLP ``fc``/``proj``), a final LayerNorm and an untied
    linear ``head``. The forward pass maps token ids ``(B, T)`` to logits ``(B, T, vocab_size)``; the
    loss is the caller's (cross-entropy against the next tokens). Every projection is a separate
    ``nn.Linear`` and both tables are dense ``nn.Embedding`` modules, so K-FAC preconditions all of
    them; LayerNorms are left to the base optimizer.
    """
    _positive(vocab_size=vocab_size, block_size=block_size, d_model=d_model, n_layer=n_layer, n_head=n_head)
    if d_model % n_head:
        raise ValueError(f"d_model ({d_model}) must be divisible by n_head ({n_head})")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return GPT(vocab_size, block_size, d_model, n_layer, n_head, dropout)


# -- Hugging Face transformers ---------------------------------------------------------------------


def _transformers() -> Any:
    """The ``transformers`` module, imported with every download switched off."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    return transformers


def _hf_model(auto_class_name: str, name: str, pretrained: str | None, config: dict[str, Any]) -> nn.Module:
    """A ``transformers`` model: from a local directory (``pretrained``; ``config`` overrides its
    configuration) or from a configuration dict (``config``, with ``model_type``). Never downloads.
    """
    transformers = _transformers()
    auto_class = getattr(transformers, auto_class_name)
    if pretrained is not None:
        if not isinstance(pretrained, (str, os.PathLike)) or not Path(pretrained).is_dir():
            raise ValueError(
                f"pretrained: got {pretrained!r}; expected a local directory written by save_pretrained "
                "(nothing is downloaded)"
            )
        model: nn.Module = auto_class.from_pretrained(os.fspath(pretrained), local_files_only=True, **config)
        return model
    if "model_type" not in config:
        raise ValueError(
            f"{name} needs model.args.model_type (e.g. gpt2) and the configuration's fields, or "
            "model.args.pretrained: a local directory"
        )
    settings = transformers.AutoConfig.for_model(**config)
    built: nn.Module = auto_class.from_config(settings)
    return built


def hf_causal_lm(pretrained: str | None = None, **config: Any) -> nn.Module:
    """A ``transformers`` causal language model (``AutoModelForCausalLM``), e.g. a tiny GPT-2.

    ``config`` is the model's configuration (``transformers.AutoConfig.for_model(**config)``:
    ``model_type`` and its fields, e.g. ``{"model_type": "gpt2", "n_layer": 2, "n_head": 2,
    "n_embd": 32, "vocab_size": 64, "n_positions": 64}``), or ``pretrained`` names a local directory
    (``from_pretrained(local_files_only=True)``; ``config`` then overrides fields of its
    configuration). Nothing is ever downloaded. The preconditioner handles GPT-2's ``Conv1D``
    projections as they are, and its tied ``lm_head`` / token embedding once. The model takes dict
    batches (``input_ids``, ``attention_mask``) and returns a ModelOutput whose ``logits`` predict
    the next token; it declares its logits module (``ngd_output_module``, the output embeddings:
    ``lm_head``) and ``ngd_task="language_model"``.
    """
    model: Any = _hf_model("AutoModelForCausalLM", "hf_causal_lm", pretrained, config)
    head = model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    model.ngd_output_module = names.get(id(head), "lm_head")
    model.ngd_task = "language_model"
    result: nn.Module = model
    return result


def hf_sequence_classification(pretrained: str | None = None, **config: Any) -> nn.Module:
    """A ``transformers`` sequence classifier (``AutoModelForSequenceClassification``).

    Arguments as for :func:`hf_causal_lm` (``num_labels`` in ``config`` sets the classes; GPT-2-like
    models need a ``pad_token_id`` for batches of more than one sequence). Its batches are dicts
    whose ``labels`` are ``(N,)`` class ids. It declares its logits module, ``score`` (GPT-2,
    Llama, ...) or ``classifier`` (BERT-like), and ``ngd_task="classification"``.
    """
    auto = "AutoModelForSequenceClassification"
    model: Any = _hf_model(auto, "hf_sequence_classification", pretrained, config)
    children = dict(model.named_children())
    head = next((n for n in ("score", "classifier") if n in children), None)
    if head is None:
        raise ValueError(
            f"hf_sequence_classification: the {type(model).__name__} has no 'score' or 'classifier' "
            "module to read the logits from; build it with your own factory and set ngd_output_module"
        )
    model.ngd_output_module = head
    model.ngd_task = "classification"
    return model


def _positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
