"""The engine on parameters that span two processes (fsdp=8 over 2 x 4 simulated CPU devices,
gloo collectives on localhost) gives exactly what one process with all 8 devices gives, and
every process gets the whole result.

The file is also the worker: `python tests/e2e/test_inference_multihost.py PROCESS_ID COUNT PORT OUT`.
"""

import json
import os
import subprocess
import sys

import pytest

from paths import REPO, TESTS
from ports import free_port


def _work(process_id: int, count: int, port: int, out: str) -> None:
    import jax

    if count > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"localhost:{port}", count, process_id)
    import flax.linen as nn
    import jax.numpy as jnp
    import numpy as np

    from kinoe_jax.inference.texts import generate_text
    from kinoe_jax.inference import Engine
    from kinoe_jax.inference.loading import param_shardings
    from kinoe_jax.models import ModelConfig, Transformer
    from kinoe_jax.parallel.mesh import make_mesh

    cfg = ModelConfig(vocab_size=4000, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_seq_len=64)
    mesh = make_mesh(data=1, fsdp=8)

    def init():
        params = Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
        return jax.tree.map(lambda x: x * 6 if x.ndim > 1 else x, nn.meta.unbox(params))

    params = jax.jit(init, out_shardings=param_shardings(cfg, mesh))()  # born sharded, as in training
    rng = np.random.default_rng(0)
    prompts = [[3] + rng.integers(11, 4000, n).tolist() for n in (3, 10, 1, 25, 7, 18, 30, 5, 6)]
    engine = Engine(cfg, params, batch_size=4)
    greedy = engine.generate(prompts, 8, stop_strings=("の",))
    sampled = engine.generate(prompts, 6, temperature=1.0, top_k=50, seed=1)
    ll = engine.loglikelihood([(p[:2], p[2:]) for p in prompts if len(p) > 2])
    result = {"process_count": jax.process_count(), "greedy": [[c.ids, c.text, c.finish_reason] for c in greedy],
              "sampled": [c.ids for c in sampled], "loglikelihood": [x.logprob for x in ll],
              "sample": generate_text(cfg, params, "日本", max_new_tokens=4)}
    with open(f"{out}.{process_id}.json", "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False)


@pytest.mark.slow
def test_two_processes_generate_what_one_does(tmp_path):
    def launch(count):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // count}",
                   TF_CPP_MIN_LOG_LEVEL="2",
                   PYTHONPATH=os.pathsep.join([REPO, TESTS]))  # the worker is this file: it imports paths too
        port = free_port()
        return [subprocess.Popen([sys.executable, __file__, str(i), str(count), str(port), str(tmp_path / f"n{count}")],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for i in range(count)]

    procs = launch(1) + launch(2)
    for p in procs:
        out, _ = p.communicate(timeout=400)
        assert p.returncode == 0, out[-3000:]
    one = json.loads((tmp_path / "n1.0.json").read_text(encoding="utf-8"))
    two = [json.loads((tmp_path / f"n2.{i}.json").read_text(encoding="utf-8")) for i in range(2)]
    assert one["process_count"] == 1 and two[0]["process_count"] == 2
    assert two[0] == two[1]  # every process holds the whole, identical result
    for key in ("greedy", "sampled", "sample"):
        assert two[0][key] == one[key], key
    assert any(r[2] == "stop_string" for r in one["greedy"])
    assert two[0]["loglikelihood"] == pytest.approx(one["loglikelihood"], rel=1e-5)


if __name__ == "__main__":
    _work(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
