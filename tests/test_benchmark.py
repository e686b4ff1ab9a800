"""tools/benchmark.py without running a benchmark: the interleaving, the report and the flags."""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_tool", os.path.join(ROOT, "tools", "benchmark.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_interleaved_alternates_and_counts(bench):
    calls = []
    times = bench._interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b", "b", "a", "a", "b"]  # the order flips every round
    assert sorted(times) == ["a", "b"] and all(len(v) == 3 and min(v) >= 0 for v in times.values())


def test_markdown_reports_ratios_as_torch_over_ours(bench):
    model = dict(size="mid", params=15.7e6, tokens=1280, batch=2,
                 forward=dict(torch_s=1.0, jax_s=0.5, ratio=2.0, compile_s=3.0, floor_s=0.4),
                 train_step=dict(torch_s=2.4, jax_s=1.6, ratio=1.5, compile_s=9.0, floor_s=1.2),
                 check=dict(forward_max_abs_err=2e-6, forward_max_abs=1.5, torch_losses=[1.25, 1.2],
                            jax_losses=[1.25, 1.2]))
    samp = dict(rows=[dict(steps=4, batch=16, torch_videos_per_s=10.0, jax_videos_per_s=40.0, ratio=4.0,
                           compile_s=2.0, max_abs_err=1e-5)])
    stages = [dict(stage="on_policy", batch=16, compile_s=60.0,
                   steps={"generator": dict(jax_s=2.0), "critic": dict(jax_s=0.7)})]
    table = bench.markdown({"model": [model], "sampling": samp, "stages": stages})
    assert "| mid | 15.7M | 1280 (2) | forward | 1.000 | 0.500 | **2.00x** | 3.0 | 0.400 |" in table
    assert "| mid | 15.7M | 1280 (2) | train step (MSE, AdamW) | 2.400 | 1.600 | **1.50x** | 9.0 | 1.200 |" in table
    assert "first losses 1.25 vs 1.25 / 1.2 vs 1.2" in table
    assert "| 4 steps | 16 | 10.0 | 40.0 | **4.00x** | 2.0 | 1.0e-05 |" in table
    assert "| on_policy | critic | 16 | 0.700 | 60.0 |" in table


def test_unknown_section_or_size_is_an_error(bench):
    with pytest.raises(SystemExit, match="unknown sections"):
        bench.main(["--sections", "model,speed"])
    with pytest.raises(SystemExit, match="unknown sizes"):
        bench.main(["--sizes", "7b"])
    assert set(bench.SIZES) >= {"toy", "mid", "1.3b"}
    mid = bench.SIZES["mid"]  # the issue-12 size, exactly
    assert mid["config"]["num_layers"] == 6 and mid["config"]["num_attention_heads"] == 6
    assert mid["config"]["attention_head_dim"] == 64 and mid["config"]["ffn_dim"] == 1536
    assert mid["config"]["text_dim"] == 512 and mid["batch"] == 2 and mid["video"] == (5, 32, 32)
    assert mid["config"]["in_channels"] == 16 and mid["text_len"] == 64 and bench._tokens(mid) == 1280


def test_model_flops_count_every_matmul_of_our_forward(bench):
    """The roofline's numerator: the formula equals the dot FLOPs of our traced forward (layer
    scan and attention's query blocks counted per iteration), for the tiny and the mid size."""
    import jax
    import numpy as np

    from anyflow_jax.models.wan import WanTransformer3D
    from anyflow_jax.parallel.aot import jaxpr_dot_flops
    for name in ("tiny", "mid"):
        size = bench.SIZES[name]
        model = WanTransformer3D(**size["config"], scan_layers=True, attention_impl="xla")
        inputs = bench._model_inputs(name)
        f = size["video"][0]
        t = np.repeat(inputs["tau"][:, None], f, axis=1)
        params = model.abstract_params()
        jaxpr = jax.make_jaxpr(lambda p, x, tt, c: model.apply({"params": p}, x, tt, None, c))(
            params, inputs["x"], t, inputs["ctx"])
        assert bench.model_flops(name) == jaxpr_dot_flops(jaxpr.jaxpr), name
