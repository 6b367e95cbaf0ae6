"""The LM head, and the log-probability of each target token without all the logits.

Training needs only log p(target) per token. Materialising the logits for it holds
[tokens, vocabulary] fp32 per device, and their gradient as much again (8 x 4096 tokens of a
65,536-piece vocabulary: 8.6 GB each). `target_logps` runs the head over `chunk` positions at a
time, in a scan with its own VJP: the forward keeps only each token's log-sum-exp, the backward
recomputes a chunk's logits to form its gradient. Peak logits memory is one chunk's, on every
platform, and the numbers are the materialised head's (the tests hold them to 1e-5).

ModelConfig.lm_head_chunk = 0 keeps the materialised head (the reference).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from kinoe_jax.models.config import ModelConfig

_LOGITS_AXES = ("batch", "activation_length", "activation_vocab")


class LMHead(nn.Module):
    """hidden [batch, length, embed] -> logits [batch, length, vocab] in the compute dtype.

    Its own module rather than a Proj: the head stays in ModelConfig.dtype whatever
    matmul_dtype says, and `target_logps` reads the same kernel.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, targets=None):
        """Logits, or with `targets` log p(target) chunk by chunk (ModelConfig.lm_head_chunk > 0)."""
        init = nn.with_logical_partitioning(nn.initializers.normal(self.cfg.init_std), ("embed", "vocab"))
        kernel = self.param("kernel", init, (self.cfg.hidden_size, self.cfg.vocab_size), jnp.float32)
        dt = self.cfg.compute_dtype
        if targets is not None:
            return target_logps(x, kernel, targets, self.cfg.lm_head_chunk, dt)
        lead = x.shape[:-1]
        # One 2-D matmul, for the reason Proj gives (XLA:CPU's weight gradient of a 3-D product).
        return (x.astype(dt).reshape(-1, x.shape[-1]) @ kernel.astype(dt)).reshape(*lead, -1)


def target_logps(hidden, kernel, targets, chunk: int, dtype):
    """log softmax(hidden @ kernel)[target] per token, `chunk` positions of every row at a time.

    hidden [batch, length, embed]; kernel [embed, vocab] (fp32 master weights); targets
    [batch, length] -> [batch, length] fp32. Chunks run along the length, which no mesh axis
    splits, so each device computes its own rows' chunks.
    """
    b, t, e = hidden.shape
    c = min(chunk, t)
    n = math.ceil(t / c)
    pad = n * c - t
    h = jnp.pad(hidden.astype(dtype), ((0, 0), (0, pad), (0, 0)))
    y = jnp.pad(targets.astype(jnp.int32), ((0, 0), (0, pad)))
    # [n, batch, chunk, ...]: the scan walks the leading axis.
    h = jnp.moveaxis(h.reshape(b, n, c, e), 1, 0)
    y = jnp.moveaxis(y.reshape(b, n, c), 1, 0)
    out = _chunked(h, kernel.astype(dtype), y)
    return jnp.moveaxis(out, 0, 1).reshape(b, n * c)[:, :t]


def _logits(h, w):
    logits = jnp.einsum("bce,ev->bcv", h, w, preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(logits, _LOGITS_AXES)


@jax.custom_vjp
def _chunked(h, w, y):
    return _chunked_fwd(h, w, y)[0]


def _chunked_fwd(h, w, y):
    def body(_, inp):
        hc, yc = inp
        logits = _logits(hc, w)
        lse = jax.nn.logsumexp(logits, axis=-1)
        hit = jnp.take_along_axis(logits, yc[..., None], axis=-1)[..., 0]
        return None, (hit - lse, lse)

    _, (logp, lse) = jax.lax.scan(body, None, (h, y))
    return logp, (h, w, y, lse)


def _chunked_bwd(res, g):
    h, w, y, lse = res
    vocab = w.shape[1]

    def body(dw, inp):
        hc, yc, lc, gc = inp
        p = jnp.exp(_logits(hc, w) - lc[..., None])
        # d log p(y) / d logits = onehot(y) - softmax
        dlogits = (jax.nn.one_hot(yc, vocab, dtype=jnp.float32) - p) * gc[..., None]
        dlogits = dlogits.astype(h.dtype)
        dh = jnp.einsum("bcv,ev->bce", dlogits, w, preferred_element_type=jnp.float32).astype(h.dtype)
        dw = dw + jnp.einsum("bce,bcv->ev", hc, dlogits, preferred_element_type=jnp.float32)
        return _kernel_constraint(dw), dh

    dw0 = _kernel_constraint(jnp.zeros(w.shape, jnp.float32))
    dw, dh = jax.lax.scan(body, dw0, (h, y, lse, g))
    return dh, dw.astype(w.dtype), None


def _kernel_constraint(x):
    # The accumulated weight gradient is laid out like the kernel (split as the rules split it),
    # not replicated on every device.
    return nn.with_logical_constraint(x, ("embed", "vocab"))


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
