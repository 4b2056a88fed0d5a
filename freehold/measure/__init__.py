"""Measure: the numbers behind owning open weights.

- `bench_server.run_bench` / `loadgen`: load-test any OpenAI-compatible server (vLLM's
  `bench serve` metrics, closed-loop sweeps and gamma/Poisson arrivals); `serving_stats` summarises.
- `workloads.run_conversations`: multi-turn and agent conversations (a shared prefix, growing
  history) for `bench --url --workload`, with the cached share by turn.
- `bench_engine.run_engine_bench`: llama-bench-style pp / tg / aggregate tg tok/s of the
  engine itself, for `freehold bench MODEL`.
- `eval.evaluate`: perplexity, KL divergence and top-1 agreement against a reference model.
- `cost_report.build_report` (on `cost_formulas`, `hardware`, `prices`, `measurements`): $ per
  1M tokens here against API price sheets.
- `savings.build_savings`: the server's usage ledger priced here and on each API.
- `report`: self-contained HTML reports with embedded charts; `tables`: terminal tables.
"""
