"""The causal LM loss without full-vocabulary fp32 logits (train.fused_loss).

Full logits cost tokens x vocabulary floats per micro-batch (49k x 2048 tokens: 400 MB, three times
over with the fp32 copy and its gradient). Instead the output head's forward is replaced, on the plain
model before any wrapping, by a LossHead: while summed_loss has given it the targets, the head returns
the summed cross-entropy of the positions that have a target, computed chunk by chunk (logits in the
compute dtype, upcast per chunk): for a plain Linear head outside autocast with the head's gradients
computed in the forward pass (LinearCrossEntropy), else with each chunk recomputed in backward; or by
Liger's fused kernel on CUDA.

Why the head and not the model's inner modules: summed_loss keeps calling the top-level (wrapped)
model, so FSDP2's root hooks (which gather the embeddings and the head), DeepSpeed's engine forward and
ZeRO-3's per-module parameter fetch all run as they do for logits; parameter names do not change.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pipeline.errors import UserError

log = logging.getLogger("ftpipe")
CHUNK_BYTES = 128 * 2**20  # fp32 logits of one chunk


@functools.cache  # asked every micro-batch
def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def loss_kind(mode: str, device_type: str, plain_linear: bool, liger: bool) -> str:
    """What train.fused_loss computes the loss with here: "liger", "chunked" (LinearCrossEntropy or
    checkpointed chunks, see LossHead._loss) or "logits"."""
    if mode == "off":
        return "logits"
    usable = device_type == "cuda" and liger and plain_linear
    if mode == "on" and not usable:
        raise UserError("train.fused_loss: on needs CUDA, liger-kernel installed and a plain linear output "
                        "head (no LoRA on it); use auto for the chunked loss elsewhere")
    return "liger" if usable else "chunked"


class LossHead:
    """Stands in for the output head's forward: logits as usual, or, inside `computing(targets)`, the
    summed cross-entropy over the positions whose target is not -100 (a 0-d tensor)."""

    def __init__(self, head: torch.nn.Module, mode: str):
        self.forward = head.forward  # the head's own forward, bound to it
        self.plain_linear = type(head) is torch.nn.Linear
        # The head's gradients computed in the forward pass (LinearCrossEntropy) where its weight is used
        # as is: a plain Linear (not LoRA's) outside autocast; elsewhere checkpointed chunks.
        self.forward_gradients = self.plain_linear
        self.head = [head]  # in a list: not a submodule of anything
        self.mode = mode
        self.chunk_tokens = max(64, CHUNK_BYTES // (4 * head.out_features))
        self.targets: torch.Tensor | None = None
        self.returned: torch.Tensor | None = None
        self.checked = False  # the model hands on what the head returned (see summed)

    def summed(self, forward: Callable[[], torch.Tensor], targets: torch.Tensor) -> torch.Tensor | None:
        """The summed loss of forward() (the model's forward, returning its logits) for these targets;
        None where the model changed what its head returned (Gemma 2's logit softcapping, Cohere's
        scaling), which turns this head off for the rest of the run. Checked by value, once (a host
        sync): wrappers such as ZeRO-3's hooks hand the same value on as another tensor."""
        with self.computing(targets):
            result = forward()
        returned, self.returned = self.returned, None
        if returned is None or result.shape != ():
            return self._off()
        if not self.checked and bool(returned.detach() != 0):  # a zero loss cannot tell
            self.checked = torch.equal(result.detach(), returned.detach())
            if not self.checked:
                return self._off()
        return result

    def _off(self) -> None:
        log.warning("warning: train.fused_loss: this model transforms its logits after the output head; "
                    "training on with full logits (set train.fused_loss: off to silence this)")
        self.mode = "off"

    @contextlib.contextmanager
    def computing(self, targets: torch.Tensor) -> Iterator[None]:
        self.targets = targets
        try:
            yield
        finally:
            self.targets = None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.targets is None or self.mode == "off":
            return self.forward(hidden)
        self.returned = self._loss(hidden)
        return self.returned

    def _loss(self, hidden: torch.Tensor) -> torch.Tensor:
        targets = self.targets
        kept = targets != -100
        picked = hidden[:, :-1][kept]
        device = hidden.device.type
        kind = loss_kind(self.mode, device, self.plain_linear, liger_available())
        if kind == "liger" and picked.size(0):  # no targets: the chunked path's one empty chunk
            return liger_loss(self.head[0], picked, targets[kept])
        if self.forward_gradients and torch.is_grad_enabled() and not torch.is_autocast_enabled(device):
            head = self.head[0]
            return LinearCrossEntropy.apply(picked, head.weight, head.bias, targets[kept], self.chunk_tokens)
        return chunked_loss(self.forward, picked, targets[kept], self.chunk_tokens)


def chunked_loss(forward: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                 targets: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Summed cross-entropy of (tokens, hidden) against (tokens,), one chunk of logits at a time. An
    empty selection still runs the head once, so every rank's head gets its (zero) gradient."""
    total = None
    for start in range(0, max(1, hidden.size(0)), chunk_tokens):
        part = (forward, hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens])
        loss = checkpoint(_chunk_loss, *part, use_reentrant=False) if torch.is_grad_enabled() \
            else _chunk_loss(*part)
        total = loss if total is None else total + loss
    return total


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T + bias` against `targets`, a chunk of tokens at a time,
    with the gradients computed in the forward pass (as Liger's kernel does on CUDA): each chunk's logits
    live only while its chunk is computed, and the head is not run a second time in backward (the
    checkpointed chunks' cost). Plain fp32 or bf16 weights outside autocast only."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens):
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and bias.requires_grad \
            else None
        # Two chunk-sized buffers for the whole pass: fresh ones per chunk cost a page fault per 4 KiB.
        rows = min(chunk_tokens, hidden.size(0))
        logits, probs = (hidden.new_empty((rows, weight.size(0)), dtype=torch.float32) for _ in range(2))
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.size(0), chunk_tokens):
            part, picked = hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens]
            n = part.size(0)
            chunk = _logits_into(logits[:n], part, weight, bias)
            grad = torch.softmax(chunk, dim=-1, out=probs[:n])  # one pass, where logsumexp + exp took five
            total += _summed_nll(chunk, grad, picked)
            grad[torch.arange(n, device=grad.device), picked] -= 1
            _matmul_into(grad_hidden[start:start + n], grad, weight)
            if grad_weight is not None:
                grad_weight.addmm_(grad.t(), part.float())
            if grad_bias is not None:
                grad_bias += grad.sum(0)
        ctx.save_for_backward(grad_hidden, _cast(grad_weight, weight), _cast(grad_bias, bias))
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        grads = (grad_hidden, grad_weight, grad_bias)
        return (*[None if g is None else g * grad_total.to(g.dtype) for g in grads], None, None)


def _logits_into(out: torch.Tensor, part: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 logits of a chunk, written into `out`."""
    if not part.dtype == weight.dtype == out.dtype:
        return out.copy_(F.linear(part, weight, bias))
    if bias is None:
        return torch.mm(part, weight.t(), out=out)
    return torch.addmm(bias, part, weight.t(), out=out)


def _matmul_into(out: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor) -> None:
    if out.dtype == weight.dtype == grad.dtype:
        torch.mm(grad, weight, out=out)
    else:
        out.copy_(grad.to(weight.dtype) @ weight)


def _summed_nll(logits: torch.Tensor, probs: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    """Summed -log p(target) from the softmax; where p underflowed (a target some 87 nats below the
    best logit), logsumexp - logit from the logits instead. Asking whether any did is a host sync per
    chunk: nothing on the CPU, a short wait on a GPU without liger-kernel (which takes Liger's kernel)."""
    chosen = probs.gather(1, picked[:, None]).squeeze(1)
    tiny = chosen < torch.finfo(torch.float32).tiny * 2**10
    nll = -torch.log(chosen)
    if bool(tiny.any()):
        rows = logits[tiny]
        exact = torch.logsumexp(rows, dim=-1) - rows.gather(1, picked[tiny, None]).squeeze(1)
        nll = nll.masked_scatter(tiny, exact)
    return nll.sum()


def _cast(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    return None if grad is None else grad.to(like.dtype)


def _chunk_loss(forward: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(forward(hidden).float(), targets, reduction="sum")


def liger_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Liger's fused linear cross-entropy (CUDA only: it cannot run on this project's CPU test machines)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(hidden, head.weight, targets, bias=head.bias,
                                            ignore_index=-100, reduction="sum")


def install_loss_head(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """Give a causal LM's output head a LossHead (not for train.fused_loss: off)."""
    head = model.get_output_embeddings()
    if mode != "off" and hasattr(head, "out_features") and not isinstance(head.forward, LossHead):
        head.forward = LossHead(head, mode)
    return model


def loss_head(model: torch.nn.Module) -> LossHead | None:
    """The LossHead of a model, through DDP's or DeepSpeed's wrapper and peft's; None without one."""
    inner = getattr(model, "module", model)
    getter = getattr(inner, "get_output_embeddings", None)
    head = getter() if getter is not None else None
    forward = getattr(head, "forward", None)
    return forward if isinstance(forward, LossHead) and forward.mode != "off" else None
