"""Discrete distributions with exact conditionals for any mask pattern: exact masked denoisers.

Each distribution over sequences x in {0..V-1}^L has
- ``log_prob(tokens)``: log p(x_unmasked) in nats (float64 [B]); positions holding the mask id V are
  marginalised, so with no mask it is the exact log p(x);
- ``__call__(tokens)``: the exact masked denoiser, log p(x_i = v | x_unmasked) as logits [B, L, V];
- ``sample(n, generator)``.
``ExactScore`` turns any masked denoiser into the concrete-score model of the absorbing process.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor


def _random_logits(shape: tuple[int, ...], sharpness: float, generator: torch.Generator | None) -> Tensor:
    return sharpness * torch.randn(shape, generator=generator, dtype=torch.float64)


class ExactDistribution:
    """Shared checks; subclasses implement ``log_prob``, ``__call__`` and ``sample``."""

    vocab_size: int
    length: int

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    def _check(self, tokens: Tensor) -> Tensor:
        if tokens.dtype != torch.long or tokens.dim() != 2 or tokens.shape[1] != self.length:
            raise ValueError(f"expected LongTensor [B, {self.length}], "
                             f"got {tokens.dtype} {tuple(tokens.shape)}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() > self.mask_id):
            raise ValueError(f"tokens must lie in [0, {self.mask_id}] (mask id {self.mask_id})")
        return tokens.cpu()


class IndependentCategorical(ExactDistribution):
    """p(x) = prod_i Cat(x_i; softmax(logits_i)); the conditionals ignore the context."""

    def __init__(self, logits: Tensor):
        self.log_probs = torch.log_softmax(logits.to(torch.float64), dim=-1)  # [L, V]
        self.length, self.vocab_size = self.log_probs.shape

    @classmethod
    def random(cls, vocab_size: int, length: int, *, sharpness: float = 1.5,
               generator: torch.Generator | None = None) -> IndependentCategorical:
        return cls(_random_logits((length, vocab_size), sharpness, generator))

    def log_prob(self, tokens: Tensor) -> Tensor:
        tokens = self._check(tokens)
        observed = tokens != self.mask_id
        per_token = self.log_probs[torch.arange(self.length), tokens.clamp(max=self.vocab_size - 1)]
        return torch.where(observed, per_token, 0.0).sum(dim=1)

    def __call__(self, tokens: Tensor) -> Tensor:
        tokens = self._check(tokens)
        return self.log_probs.expand(tokens.shape[0], -1, -1).clone()

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        draws = torch.multinomial(self.log_probs.exp(), n, replacement=True, generator=generator)  # [L, n]
        return draws.T.contiguous()


class MarkovChain(ExactDistribution):
    """A k-th order Markov chain: p(x) = p(x_{0:k}) prod_{t>=k} T(x_t | x_{t-k:t}).

    ``initial`` [V^k]: distribution of the first k tokens; ``transition`` [V^k, V]: the next-token
    distribution of each context. Contexts are indexed big-endian, s = sum_j x_{t-k+j} V^(k-1-j).
    Conditionals and marginals come from forward-backward on the chain of contexts s_t = x_{t-k+1:t+1}
    (t = k-1..L-1) with deterministic evidence: an unmasked token must equal its digit of the state.
    """

    def __init__(self, initial: Tensor, transition: Tensor, length: int):
        self.num_states, self.vocab_size = transition.shape
        self.order = 1
        while self.vocab_size**self.order < self.num_states:
            self.order += 1
        if self.vocab_size**self.order != self.num_states or initial.shape != (self.num_states,):
            raise ValueError("transition must be [V^k, V] and initial [V^k]")
        if length < self.order:
            raise ValueError(f"length {length} is shorter than the order {self.order}")
        self.length = length
        self.initial = initial.to(torch.float64) / initial.sum()
        self.transition = transition.to(torch.float64) / transition.sum(dim=1, keepdim=True)
        states = torch.arange(self.num_states)
        # digits[s, j]: token j of context s (j = 0 oldest)
        self.digits = torch.stack([(states // self.vocab_size ** (self.order - 1 - j)) % self.vocab_size
                                   for j in range(self.order)], dim=1)
        # state matrix: s -> (s without its oldest token, v) with probability T(v | s)
        self.state_transition = torch.zeros(self.num_states, self.num_states, dtype=torch.float64)
        nxt = (states[:, None] * self.vocab_size) % self.num_states + torch.arange(self.vocab_size)
        self.state_transition.scatter_(1, nxt, self.transition)

    @classmethod
    def random(cls, vocab_size: int, order: int, length: int, *, sharpness: float = 1.5,
               generator: torch.Generator | None = None) -> MarkovChain:
        states = vocab_size**order
        initial = torch.softmax(_random_logits((states,), sharpness, generator), dim=0)
        transition = torch.softmax(_random_logits((states, vocab_size), sharpness, generator), dim=1)
        return cls(initial, transition, length)

    def _evidence(self, tokens: Tensor) -> list[Tensor]:
        """e_t[b, s] = 1 if state s at step t agrees with the unmasked tokens it holds (t = k-1..L-1)."""
        k = self.order
        free = tokens == self.mask_id

        def agree(t: int, j: int) -> Tensor:  # token t is masked or equals digit j of every state
            return free[:, t, None] | (self.digits[None, :, j] == tokens[:, t, None])

        first = torch.stack([agree(t, t) for t in range(k)]).all(dim=0)
        return [first.double()] + [agree(t, k - 1).double() for t in range(k, self.length)]

    def _forward_backward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(log p(x_unmasked) [B], posterior over states gamma [B, L-k+1, S])."""
        evidence = self._evidence(tokens)
        alpha = self.initial * evidence[0]
        log_z = torch.zeros(tokens.shape[0], dtype=torch.float64)
        alphas = []
        for t, e in enumerate(evidence):
            if t:
                alpha = (alpha @ self.state_transition) * e
            norm = alpha.sum(dim=1, keepdim=True)
            log_z += norm.squeeze(1).log()
            alpha = alpha / norm
            alphas.append(alpha)
        beta = torch.ones_like(alpha)
        gammas = [alphas[-1]]
        for t in range(len(evidence) - 2, -1, -1):
            beta = (evidence[t + 1] * beta) @ self.state_transition.T
            beta = beta / beta.sum(dim=1, keepdim=True)
            gamma = alphas[t] * beta
            gammas.append(gamma / gamma.sum(dim=1, keepdim=True))
        return log_z, torch.stack(gammas[::-1], dim=1)

    def log_prob(self, tokens: Tensor) -> Tensor:
        return self._forward_backward(self._check(tokens))[0]

    def __call__(self, tokens: Tensor) -> Tensor:
        gamma = self._forward_backward(self._check(tokens))[1]  # [B, L-k+1, S]
        onehot = torch.nn.functional.one_hot(self.digits, self.vocab_size).double()  # [S, k, V]
        first = torch.einsum("bs,sjv->bjv", gamma[:, 0], onehot[:, :-1])  # tokens 0..k-2 from s_{k-1}
        rest = torch.einsum("bts,sv->btv", gamma, onehot[:, -1])  # token t from s_t's newest digit
        return torch.cat([first, rest], dim=1).log()

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        state = torch.multinomial(self.initial, n, replacement=True, generator=generator)
        tokens = [self.digits[state, j] for j in range(self.order)]
        for _ in range(self.order, self.length):
            nxt = torch.multinomial(self.transition[state], 1, generator=generator).squeeze(1)
            tokens.append(nxt)
            state = (state * self.vocab_size) % self.num_states + nxt
        return torch.stack(tokens, dim=1)

    def joint_table(self) -> JointTable:
        """The same distribution as an explicit table (for small V^L)."""
        configs = JointTable.configurations(self.vocab_size, self.length)
        return JointTable(self.log_prob(configs).exp().reshape([self.vocab_size] * self.length))


class JointTable(ExactDistribution):
    """An explicit probability table over all V^L sequences; every quantity by enumeration."""

    def __init__(self, probs: Tensor):
        self.length = probs.dim()
        self.vocab_size = probs.shape[0]
        if any(size != self.vocab_size for size in probs.shape):
            raise ValueError(f"probs must have shape [V]*L, got {tuple(probs.shape)}")
        self.probs = (probs.to(torch.float64) / probs.sum()).flatten()
        self.configs = self.configurations(self.vocab_size, self.length)  # [V^L, L], row-major order

    @staticmethod
    def configurations(vocab_size: int, length: int) -> Tensor:
        return torch.tensor(list(itertools.product(range(vocab_size), repeat=length)), dtype=torch.long)

    @classmethod
    def random(cls, vocab_size: int, length: int, *, sharpness: float = 1.5,
               generator: torch.Generator | None = None) -> JointTable:
        logits = _random_logits((vocab_size,) * length, sharpness, generator)
        return cls(torch.softmax(logits.flatten(), dim=0).reshape(logits.shape))

    def _posterior(self, tokens: Tensor) -> Tensor:
        """p(config) * [config agrees with the unmasked tokens], [B, V^L]."""
        agree = (tokens[:, None, :] == self.mask_id) | (self.configs[None] == tokens[:, None, :])
        return self.probs * agree.all(dim=2)

    def log_prob(self, tokens: Tensor) -> Tensor:
        return self._posterior(self._check(tokens)).sum(dim=1).log()

    def __call__(self, tokens: Tensor) -> Tensor:
        post = self._posterior(self._check(tokens))
        onehot = torch.nn.functional.one_hot(self.configs, self.vocab_size).double()  # [N, L, V]
        return (torch.einsum("bn,nlv->blv", post, onehot) / post.sum(dim=1)[:, None, None]).log()

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.configs[torch.multinomial(self.probs, n, replacement=True, generator=generator)]


class ExactScore:
    """Concrete score of the absorbing process from a masked denoiser (RADD's factorisation).

    At total noise sigma (mask probability lambda = 1 - e^-sigma), for a masked position i,
    p_sigma(x^{i<-v}) / p_sigma(x) = e^-sigma / (1 - e^-sigma) * p_0(x_i = v | x_unmasked), so
    ``log s = log_softmax(denoiser(tokens)) - log(e^sigma - 1)``. Exact for an exact denoiser.
    """

    def __init__(self, denoiser):
        self.denoiser = denoiser
        self.vocab_size = denoiser.vocab_size

    def __call__(self, tokens: Tensor, sigma: Tensor) -> Tensor:
        log_p = torch.log_softmax(self.denoiser(tokens), dim=-1)
        return log_p - torch.log(torch.expm1(sigma.to(log_p.dtype)))[:, None, None]
