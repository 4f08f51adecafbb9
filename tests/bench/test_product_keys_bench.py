"""``somoe bench layer|train --router product``: rows assembled from child processes, by hand."""

from somoe.bench import product_keys


def test_rows_keep_each_rows_fastest_round_and_ratios_to_cpu_some(monkeypatch):
    calls = []
    ms = {("cpu_some", None): [100.0, 90.0], ("cpu_some_pk", 1024): [120.0, 130.0],
          ("cpu_some_pk", 1_048_576): [150.0, 140.0]}
    rss = {("cpu_some", None): 900.0, ("cpu_some_pk", 1024): 1000.0, ("cpu_some_pk", 1_048_576): 1200.0}

    def child(kind, preset, experts, dtype, reps, threads):
        calls.append((preset, experts))
        round_ = sum(1 for c in calls if c == (preset, experts)) - 1
        return {"ms": ms[(preset, experts)][round_], "peak_rss_mb": rss[(preset, experts)] + round_}

    monkeypatch.setattr(product_keys, "_child", child)
    rows = product_keys.bench_product("train", (1024, 1_048_576), rounds=2)
    assert calls[:3] == calls[3:] == [("cpu_some", None), ("cpu_some_pk", 1024), ("cpu_some_pk", 1_048_576)]  # interleaved
    assert [r["ms"] for r in rows] == [90.0, 120.0, 140.0]
    assert [r["ratio_ms"] for r in rows] == [1.0, 120.0 / 90.0, 140.0 / 90.0]
    assert [r["num_experts"] for r in rows] == [128, 1024, 1_048_576]
    assert [r["router"] for r in rows] == ["exhaustive", "product", "product"]
    assert rows[2]["rss_vs_smallest"] == 1201.0 / 1001.0 and "rss_vs_smallest" not in rows[0]
