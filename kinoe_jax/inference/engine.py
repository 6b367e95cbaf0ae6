"""The batched generation and log-likelihood engine.

    engine = Engine(model_cfg, params)            # params as trained: sharded on the run's mesh
    outs = engine.generate([[BOS, ...], ...], max_new_tokens=64, stop_strings=("\\n\\n",))
    scores = engine.loglikelihood([(context_ids, continuation_ids), ...])

Prompts are grouped by length into batches; each batch is left-padded to a power-of-two bucket,
and the KV cache holds bucket + a power-of-two number of new tokens, so a whole evaluation
compiles a handful of programs, whatever its prompt lengths. Compiled programs are shared by all
engines of the same model config, mesh and parameter layout: the training loop builds a new
engine on each evaluation's parameters and compiles only the first time.

Every process of a multi-host run calls the engine with the same requests (the parameters span
all of them); inputs are made global with make_array_from_callback, results come back
replicated, and every host decision (stop strings, when to stop) is taken from those results,
so all processes agree.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kinoe_jax.inference import layout, programs
from kinoe_jax.parallel.rules import MESH_AXES, logical_to_mesh

log = logging.getLogger(__name__)

OVERFLOW = ("truncate_left", "error")
_COMPILED: dict = {}


class PromptTooLong(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Completion:
    ids: list          # new token ids, without the stop id (up to where a stop string ends)
    text: str          # their text, cut before the stop string
    finish_reason: str  # "stop" (a stop id), "stop_string" or "length"
    truncated: int = 0  # prompt tokens dropped from the left to fit the context


@dataclasses.dataclass(frozen=True)
class LogLikelihood:
    logprob: float   # sum of log p over the continuation's tokens
    is_greedy: bool  # every continuation token is the argmax (lm-eval-harness' "greedy")
    num_tokens: int


class Engine:
    """Generation and scoring on `params`, laid out on `mesh` (default: the params' own mesh, or
    one device for host arrays). `overflow` says what a prompt longer than the context gets:
    "truncate_left" keeps its first token (BOS) and as many of its last tokens as fit, counting
    and logging each one; "error" refuses it with PromptTooLong."""

    def __init__(self, model_cfg, params, mesh: Mesh | None = None, *, vocab=None, batch_size: int = 16,
                 min_bucket: int = 16, decode_chunk: int = 16, ll_rows: int = 8, overflow: str = "truncate_left"):
        if overflow not in OVERFLOW:
            raise ValueError(f"Engine: overflow {overflow!r} not one of {OVERFLOW}")
        if batch_size < 1 or min_bucket < 1 or decode_chunk < 1 or ll_rows < 1:
            raise ValueError("Engine: batch_size, min_bucket, decode_chunk and ll_rows must be >= 1")
        self.cfg = model_cfg
        self.mesh = mesh or _mesh_of(params)
        self.params = _place(params, model_cfg, self.mesh)
        self._param_key = _layout_key(self.params)
        self._vocab = vocab
        self.batch_size, self.min_bucket, self.decode_chunk, self.ll_rows = batch_size, min_bucket, decode_chunk, ll_rows
        self.overflow = overflow
        self.stats = {"compiles": 0, "compile_seconds": 0.0, "programs": [], "truncated_prompts": 0,
                      "truncated_tokens": 0, "generated_tokens": 0, "generate_seconds": 0.0}

    @property
    def vocab(self):
        if self._vocab is None:
            from kinoe_jax.data.vocab import get_vocabulary

            self._vocab = get_vocabulary()
        return self._vocab

    # ------------------------------------------------------------------ generation
    def generate(self, prompt_ids: list[list[int]], max_new_tokens: int, stop_ids=None, stop_strings=(),
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0) -> list[Completion]:
        """One Completion per prompt, in order. stop_ids default to EOS and the chat template's
        <|end|> (when the tokenizer has it); decoding is greedy unless temperature > 0."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens {max_new_tokens} must be >= 1")
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(f"sampling: temperature {temperature} must be >= 0, top_p {top_p} in (0, 1], "
                             f"top_k {top_k} >= 0")
        stop_ids = self.default_stop_ids() if stop_ids is None else tuple(int(i) for i in stop_ids)
        if len(stop_ids) > programs.MAX_STOP_IDS:
            raise ValueError(f"at most {programs.MAX_STOP_IDS} stop ids, got {len(stop_ids)}")
        stop_strings = tuple(s for s in stop_strings if s)
        prompts, truncated = self._fit(prompt_ids, self.cfg.max_seq_len - max_new_tokens, "generate")
        t0 = time.perf_counter()
        stops = np.full((programs.MAX_STOP_IDS,), -1, np.int32)
        stops[:len(stop_ids)] = stop_ids
        sampling = (np.float32(temperature), np.int32(top_k), np.float32(top_p))
        results: list = [None] * len(prompts)
        rows = layout.batch_rows(len(prompts), self.batch_size)
        for group in layout.groups([len(p) for p in prompts], self.batch_size):
            outs = self._generate_batch([prompts[i] for i in group], group, rows, max_new_tokens, stops, stop_ids,
                                        stop_strings, sampling, seed)
            for i, c in zip(group, outs):
                results[i] = dataclasses.replace(c, truncated=truncated[i])
        self.stats["generate_seconds"] += time.perf_counter() - t0
        self.stats["generated_tokens"] += sum(len(c.ids) for c in results)
        return results

    def default_stop_ids(self) -> tuple[int, ...]:
        from kinoe_jax.data.vocab import EOS_ID

        end = self.vocab.tokenizer.piece_to_id("<|end|>")
        has_end = self.vocab.tokenizer.id_to_piece(end) == "<|end|>"
        return (EOS_ID, end) if has_end else (EOS_ID,)

    def _generate_batch(self, prompts, request_ids, rows, max_new, stops, stop_ids, stop_strings, sampling, seed):
        bucket = layout.next_pow2(max(len(p) for p in prompts), self.min_bucket)
        # The cache (and the buffer of new tokens) is rounded up too: the decode program depends
        # on its length alone, so datasets of different prompt and answer lengths share it.
        cache_len = layout.next_cache_len(bucket + max_new)
        b = layout.left_padded(prompts, request_ids, rows, bucket)
        batch = self._put(rows, b.tokens, b.positions, b.segments)
        per_row = self._put(rows, b.lengths, b.row_ids, b.valid)
        scalars = self._replicated(np.int32(seed), sampling, stops)
        args = (self.params, *batch, *per_row, *scalars)
        prefill = self._program(("prefill", rows, bucket, cache_len),
                                lambda: jax.jit(programs.make_prefill(self.cfg, cache_len),
                                                out_shardings=self._state_shardings()), args)
        state = prefill(*args)
        n = 1
        while True:
            done, n = np.asarray(state["done"]), int(state["n"])
            if stop_strings:  # the host reads the text so far; rows that reached a stop string are done
                out = np.asarray(state["out"])
                hit = [r for r in range(len(prompts))
                       if not done[r] and self._reached_stop_string(out[r, :n], stop_ids, stop_strings)]
                if hit:
                    done = done.copy()
                    done[hit] = True
                    state = {**state, "done": self._replicated(done)[0]}
            if n >= max_new or done[:len(prompts)].all():
                break
            limit = min(max_new, n + self.decode_chunk) if stop_strings else max_new
            dargs = (self.params, state, per_row[1], per_row[2], *scalars, self._replicated(np.int32(limit))[0])
            decode = self._program(("decode", rows, cache_len),
                                   lambda: jax.jit(programs.make_decode(self.cfg, cache_len), donate_argnums=(1,),
                                                   out_shardings=jax.tree.map(lambda x: x.sharding, state)), dargs)
            state = decode(*dargs)
        out = np.asarray(state["out"])[:, :n]
        return [self._completion(out[r], stop_ids, stop_strings) for r in range(len(prompts))]

    def _reached_stop_string(self, ids, stop_ids, stop_strings) -> bool:
        text = self.vocab.decode(_cut_at_stop(ids, stop_ids).tolist())
        return any(s in text for s in stop_strings)

    def _completion(self, ids, stop_ids, stop_strings) -> Completion:
        cut = _cut_at_stop(ids, stop_ids)
        reason = "stop" if len(cut) < len(ids) else "length"
        ids = cut.tolist()
        text = self.vocab.decode(ids)
        hits = [text.index(s) for s in stop_strings if s in text]
        if hits:
            text, reason = text[:min(hits)], "stop_string"
            # The shortest prefix whose text reaches the stop string.
            ids = next(ids[:k] for k in range(1, len(ids) + 1)
                       if any(s in self.vocab.decode(ids[:k]) for s in stop_strings))
        return Completion(ids=ids, text=text, finish_reason=reason)

    # ------------------------------------------------------------------ log-likelihood
    def loglikelihood(self, pairs: list[tuple[list[int], list[int]]]) -> list[LogLikelihood]:
        """log p(continuation | context) of each pair. Pairs are packed with segment ids into rows
        of one power-of-two length, `ll_rows` rows per call."""
        if not pairs:
            return []
        for i, (context, continuation) in enumerate(pairs):
            if not context or not continuation:
                raise ValueError(f"pair {i}: context and continuation must both be non-empty "
                                 f"(start the context with BOS)")
        limit = self.cfg.max_seq_len + 1  # a sequence is fed without its last token
        contexts, truncated = self._fit([c for c, x in pairs], [limit - len(x) for c, x in pairs], "loglikelihood")
        pairs = [(c, list(x)) for c, (_, x) in zip(contexts, pairs)]
        row_len = layout.next_pow2(max(len(c) + len(x) - 1 for c, x in pairs), self.min_bucket)
        row_len = min(row_len, self.cfg.max_seq_len)
        packed = layout.pack_pairs(pairs, row_len)
        n_rows = packed.inputs.shape[0]
        rows = layout.batch_rows(n_rows, self.ll_rows)
        logprob = np.zeros(packed.inputs.shape, np.float32)
        greedy = np.zeros(packed.inputs.shape, bool)
        for start in range(0, n_rows, rows):
            chunk = [np.zeros((rows, row_len), np.int32) for _ in range(4)]
            stop = min(start + rows, n_rows)
            for dst, src in zip(chunk, (packed.inputs, packed.targets, packed.positions, packed.segments)):
                dst[:stop - start] = src[start:stop]
            args = (self.params, *self._put(rows, *chunk))
            fn = self._program(("loglikelihood", rows, row_len),
                               lambda: jax.jit(programs.make_token_logprobs(self.cfg),
                                               out_shardings=self._replicated_sharding()), args)
            lp, gr = fn(*args)
            logprob[start:stop], greedy[start:stop] = np.asarray(lp)[:stop - start], np.asarray(gr)[:stop - start]
        return [LogLikelihood(float(logprob[r, a:b].sum(dtype=np.float64)), bool(greedy[r, a:b].all()), b - a)
                for r, a, b in packed.spans]

    # ------------------------------------------------------------------ helpers
    def _fit(self, seqs, limits, what):
        """Each sequence cut to its limit by the overflow policy; returns (seqs, tokens dropped)."""
        limits = [limits] * len(seqs) if isinstance(limits, int) else list(limits)
        out, dropped = [], []
        for i, (ids, limit) in enumerate(zip(seqs, limits)):
            ids = [int(t) for t in ids]
            if not ids:
                raise ValueError(f"{what}: request {i} is empty (a prompt starts with BOS)")
            if len(ids) > limit:
                if self.overflow == "error" or limit < 2:
                    raise PromptTooLong(f"{what}: request {i} has {len(ids)} tokens; the context "
                                        f"({self.cfg.max_seq_len} tokens) leaves room for {max(limit, 0)}")
                dropped.append(len(ids) - limit)
                ids = ids[:1] + ids[len(ids) - limit + 1:]
            else:
                dropped.append(0)
            out.append(ids)
        count = sum(1 for d in dropped if d)
        if count:
            self.stats["truncated_prompts"] += count
            self.stats["truncated_tokens"] += sum(dropped)
            log.warning("%s: %d of %d requests longer than the context (%d tokens) were truncated from the left "
                        "(%d tokens dropped)", what, count, len(seqs), self.cfg.max_seq_len, sum(dropped))
        return out, dropped

    def _program(self, shape_key, build, args):
        key = (shape_key, self.cfg, self.mesh, self._param_key)
        exe = _COMPILED.get(key)
        if exe is None:
            t0 = time.perf_counter()
            # Activation constraints off: batch rows need not divide the mesh (a training
            # loop may call this inside its own rules context); XLA propagates the layout from
            # the sharded parameters and inputs.
            with nn.logical_axis_rules(()):
                exe = build().lower(*args).compile()
            seconds = time.perf_counter() - t0
            _COMPILED[key] = exe
            self.stats["compiles"] += 1
            self.stats["compile_seconds"] += seconds
            self.stats["programs"].append((shape_key, round(seconds, 3)))
            log.info("compiled %s in %.2f s", shape_key, seconds)
        return exe

    def _put(self, rows, *arrays):
        """Host arrays [rows, ...] as global arrays split over the batch axes where rows divide."""
        out = []
        for a in arrays:
            a = np.asarray(a)
            spec = logical_to_mesh(("batch",) + (None,) * (a.ndim - 1), a.shape, self.mesh)
            out.append(jax.make_array_from_callback(a.shape, NamedSharding(self.mesh, spec), lambda idx, a=a: a[idx]))
        return out

    def _replicated_sharding(self):
        return NamedSharding(self.mesh, P())

    def _replicated(self, *trees):
        sharding = self._replicated_sharding()
        return [jax.tree.map(lambda a: jax.make_array_from_callback(np.shape(a), sharding,
                                                                    lambda idx, a=a: np.asarray(a)[idx]), t)
                for t in trees]

    def _state_shardings(self):
        """The cache lies where XLA puts it; what the host reads comes back replicated."""
        rep = self._replicated_sharding()
        return {"cache": None, "token": rep, "pos": rep, "start": rep, "index": rep, "out": rep, "done": rep, "n": rep}


def _cut_at_stop(ids: np.ndarray, stop_ids) -> np.ndarray:
    hits = np.flatnonzero(np.isin(ids, np.asarray(stop_ids, np.int64)))
    return ids[:hits[0]] if hits.size else ids


def _mesh_of(params) -> Mesh:
    for leaf in jax.tree.leaves(params):
        if isinstance(getattr(leaf, "sharding", None), NamedSharding):
            return leaf.sharding.mesh
    device = next((d for leaf in jax.tree.leaves(params) for d in getattr(leaf, "devices", lambda: ())()),
                  jax.local_devices()[0])
    return Mesh(np.asarray([device]).reshape((1,) * len(MESH_AXES)), MESH_AXES)


def _place(params, cfg, mesh: Mesh):
    """Parameters already laid out on `mesh` stay where they are (a training run's live state);
    anything else is put there by the rules table, as training would lay it out."""

    def on_mesh(x):
        return isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh

    if all(on_mesh(x) for x in jax.tree.leaves(params)):
        return params
    from kinoe_jax.inference.loading import param_shardings

    def put(x, sharding):
        if on_mesh(x):
            return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, params, param_shardings(cfg, mesh))


def _layout_key(params):
    leaves, treedef = jax.tree.flatten(params)
    return treedef, tuple((x.shape, str(x.dtype), x.sharding) for x in leaves)
