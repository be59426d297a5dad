"""How much the model's output distribution cares about each output channel of each linear: the diagonal of the
Fisher information of the KL divergence with respect to the linears' outputs, in one streamed backward pass.

To second order, the KL divergence a small change δY of a linear's outputs adds to the scored positions is
`½ δYᵀ F δY` with `F = E_y[g gᵀ]`, `g = ∂ Σ_s log p(y_s) / ∂Y` and y sampled from the model itself (the expected
Fisher: exact to second order for the KL to the unperturbed model, unlike the empirical Fisher of the text's
tokens). Keeping F's diagonal and treating the per-channel weights as independent of the token (a K-FAC-style
split of F into an output factor G and the input Hessian) prices a quantized weight W + ΔW without any forward:

    cost(ΔW) ≈ Σ_j G_j · (ΔW A ΔWᵀ)_jj / (2 · scored)          G_j = Σ_windows Σ_t g_tj²,  A = E[x xᵀ] = H / 2

where `scored` is the number of scored positions. `measure(cost="fisher")` uses it for every candidate; the
anchor (one forward per tensor) and exact (a forward per candidate) costs stay available to check it.

The pass streams: the KL windows go forward block by block (each block's input kept: [windows, ctx, hidden]),
the sampled log-likelihood is differentiated at the head, then each block is loaded again, in reverse order, run
with autograd, and released; one block's weights and activations are in memory at a time. For the embedding the
same rule holds per token row: G_emb[v] = Σ over the positions holding token v of the block-0 input gradient².

How good it is (benchmarks/measure_cost.py, results/measure_cost_smol.md, SmolLM2 against the measured KL): within
a type it ranks tensors as the KL does (rank correlation 0.95 over 181 Q4_0 tensors, 0.87 over 30 Q2_K), at 0.8-0.95
of the KL for most roles; attn_v comes out at ~0.2x (attention mixes v's errors across tokens, which the token-
independent split ignores) and a tied embedding at ~0.12x (only its input side is counted, not its use as the head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from twinquant.model import roles
from twinquant.model.forward import block_forward, embed, head
from twinquant.progress import Progress

T = roles.T


class _OutputTap:
    """A LinearHook that keeps the outputs of the named linears for their gradients (see forward.linears)."""

    def __init__(self, names: set[str]):
        self.names = names
        self.outputs: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, x: torch.Tensor) -> None:   # inputs are not needed
        pass

    def tap_output(self, name: str, y: torch.Tensor) -> torch.Tensor:
        if name in self.names:
            y.retain_grad()
            self.outputs[name] = y
        return y


class Fisher:
    """Per-linear output-channel weights G (float64 [out]) and the embedding's per-token-row weights."""

    def __init__(self, weights: dict[str, torch.Tensor], emb_tokens: torch.Tensor, emb_weights: torch.Tensor,
                 scored: int):
        self.weights = weights            # name -> G [out]
        self.emb_tokens = emb_tokens      # int64 [U]: the token ids in the windows
        self.emb_weights = emb_weights    # float64 [U, hidden]
        self.scored = scored              # scored positions in all windows

    def cost(self, name: str, W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor | None,
             sampled: bool = False) -> float:
        """The estimated mean KL per scored token added by W -> W_hat (H: the input Hessian 2·E[xxᵀ]).
        `sampled` (the embedding): W holds only the rows of `emb_tokens`, in that order."""
        d = (W_hat.float() - W.float()).double()
        if name == roles.name(T.TOKEN_EMBD):
            rows = d if sampled else d[self.emb_tokens.to(d.device)]
            return float((self.emb_weights.to(d.device) * rows.square()).sum()) / (2 * self.scored)
        r = ((d @ (H.double() / 2)) * d).sum(1)          # (ΔW A ΔWᵀ)_jj
        return float((self.weights[name].to(d.device) * r).sum()) / (2 * self.scored)


def _block_names(layer: int, wanted: set[str]) -> set[str]:
    return {n for g in roles.shared_input_groups(layer) for n in g if n in wanted}


def output_fisher(model, windows: torch.Tensor, wanted: set[str], seed: int = 0, stream: bool = False,
                  progress: bool = True) -> Fisher:
    """The Fisher weights of every linear in `wanted` (and of the embedding) on `windows` [n, ctx], scoring the
    second half of each window as llama-perplexity does; y is sampled from the model with `seed`."""
    s = model.spec
    n, ctx = windows.shape
    scored = slice(ctx // 2, None)
    gen = torch.Generator().manual_seed(seed)
    acc: dict[str, torch.Tensor] = {}
    with Progress(2 * s.n_layers + 1, "fisher", enabled=progress) as bar:
        with torch.no_grad():
            xs = [embed(model, windows).float()]
            for layer in range(s.n_layers):
                xs.append(torch.cat([block_forward(model, layer, xs[-1][i: i + 1].to(model.dtype)).float()
                                     for i in range(n)]))
                if stream:
                    model.release_block(layer)
                bar.update(layer + 1, f"forward block {layer}")
        out = roles.name(T.OUTPUT)
        x_out = xs.pop()
        grad = torch.zeros_like(x_out)
        with torch.enable_grad():
            for i in range(n):                   # window by window: the logits are [ctx/2, vocab]
                xi = x_out[i: i + 1].requires_grad_(True)
                logits = head(model, xi[:, scored].to(model.dtype))
                logits.retain_grad()
                logp = F.log_softmax(logits.float(), -1).reshape(-1, s.vocab)
                # sampled on the CPU: the same tokens on every device
                y = torch.multinomial(logp.detach().exp().cpu(), 1, generator=gen).to(logp.device)
                logp.gather(1, y).sum().backward()
                if out in wanted:
                    g2 = logits.grad.double().square().sum((0, 1))
                    acc[out] = acc[out] + g2 if out in acc else g2
                grad[i: i + 1] = xi.grad
        del logits, logp, x_out
        bar.update(s.n_layers + 1, "head")
        for layer in reversed(range(s.n_layers)):
            names = _block_names(layer, wanted)
            tap = _OutputTap(names)
            x_in = xs.pop()
            g_in = torch.zeros_like(x_in)
            with torch.enable_grad():
                for i in range(n):               # window by window: one window's autograd graph at a time
                    xi = x_in[i: i + 1].to(model.dtype).requires_grad_(True)
                    block_forward(model, layer, xi, hook=tap).float().backward(grad[i: i + 1])
                    for name, yo in tap.outputs.items():
                        g2 = yo.grad.double().square().sum((0, 1))
                        acc[name] = acc[name] + g2 if name in acc else g2
                    tap.outputs.clear()
                    g_in[i: i + 1] = xi.grad.float()
            grad = g_in
            if stream:
                model.release_block(layer)
            bar.update(2 * s.n_layers + 1 - layer, f"backward block {layer}")
    tokens, inverse = torch.unique(windows.reshape(-1), return_inverse=True)
    emb = torch.zeros(tokens.numel(), s.hidden, dtype=torch.float64)
    emb.index_add_(0, inverse, grad.reshape(-1, s.hidden).double().square().cpu())
    return Fisher(acc, tokens, emb, n * (ctx - ctx // 2))
