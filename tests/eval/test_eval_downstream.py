"""The downstream evaluation the training loop calls: datasets named in gin, the keys it logs,
and multiple-choice answers by log-likelihood checked against a plain forward pass."""

import gin
import jax
import numpy as np
import pytest

from kinoe_jax.eval import dumps
from kinoe_jax.eval.downstream import downstream_eval
from kinoe_jax.models import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=4000, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_seq_len=128)


@pytest.fixture(scope="module")
def params():
    import flax.linen as nn
    import jax.numpy as jnp

    def init():
        p = Transformer(CFG).init(jax.random.PRNGKey(2), jnp.zeros((1, 8), jnp.int32))["params"]
        return jax.tree.map(lambda x: x * 8 if x.ndim > 1 else x, nn.meta.unbox(p))  # decisive logits

    return jax.jit(init)()


def test_datasets_and_sizes_come_from_gin(params):
    gin.parse_config(["downstream_eval.datasets = ['kinoe_nli', 'kinoe_arith']", "downstream_eval.max_samples = 4",
                      "downstream_eval.max_new_tokens = 4"])
    out = downstream_eval(CFG, params)
    assert set(out) == {"downstream/kinoe_nli/exact_match", "downstream/kinoe_nli/choice_accuracy",
                        "downstream/kinoe_arith/exact_match_figure", "downstream/average"}
    assert all(0.0 <= v <= 1.0 for v in out.values())
    assert out["downstream/average"] == pytest.approx(np.mean([v for k, v in out.items() if k != "downstream/average"]))
    # A choice accuracy over 4 samples is a multiple of 1/4.
    assert out["downstream/kinoe_nli/choice_accuracy"] * 4 == pytest.approx(round(out["downstream/kinoe_nli/choice_accuracy"] * 4))


def test_choices_are_picked_by_their_log_likelihood(params):
    from kinoe_jax.data.vocab import get_vocabulary
    from kinoe_jax.eval.generation import choice_accuracy, prompt_ids
    from kinoe_jax.inference import Engine

    samples = dumps.resolve(["kinoe_word_mc"])[0][1]["samples"][:6]
    vocab = get_vocabulary()
    model = Transformer(CFG)
    forward = jax.jit(lambda t: jax.nn.log_softmax(model.apply({"params": params}, t)[0], axis=-1))
    hits = []
    for s in samples:
        context = prompt_ids(s, vocab, chat_template=False)
        totals = []
        for choice in s["choices"]:
            seq = context + list(vocab.encode(choice))
            logp = np.asarray(forward(np.asarray([seq + [0] * (128 - len(seq))])))[0]
            totals.append(sum(logp[t - 1, seq[t]] for t in range(len(context), len(seq))))
        hits.append(s["choices"][int(np.argmax(totals))] == s["gold"])
    assert choice_accuracy(Engine(CFG, params), samples) == pytest.approx(np.mean(hits))


def test_unknown_dataset_is_named():
    with pytest.raises(dumps.DumpError, match="no_such_set: neither a built-in dataset"):
        dumps.resolve(["no_such_set"])


def test_loss_plot_shows_downstream_scores_beside_the_loss(tmp_path):
    import json

    import matplotlib.image

    from kinoe_jax.training.metrics_writer import plot_loss

    widths = {}
    for name, every in (("plain", 0), ("with_downstream", 5)):
        work = tmp_path / name
        work.mkdir()
        rows = [{"step": s, "loss": 5.0 - s / 10} for s in range(1, 11)]
        for r in rows:
            if every and r["step"] % every == 0:
                r.update({"downstream/kinoe_nli/choice_accuracy": r["step"] / 20, "downstream/average": r["step"] / 30})
        (work / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        widths[name] = matplotlib.image.imread(plot_loss(str(work))).shape[1]
    assert widths["with_downstream"] > 1.8 * widths["plain"]
