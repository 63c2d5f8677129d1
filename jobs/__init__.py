"""Ray Jobs that measure ADORE and its baselines at scale.

    python jobs/eval_all.py --preset smoke --out out/eval/smoke     # a local Ray, or inside `ray job submit`
    adore report out/eval/smoke                                    # markdown table + PNG plots

Modules, one idea each:
  grid.py      the configuration (presets / YAML) and its expansion into cells with stable ids
  sources.py   text and prompt sources (the shipped Austen slice, or the user's txt / JSONL / Parquet)
  tasks/       what one cell measures: throughput, ppl (streamed perplexity), fidelity (BLEU, ROUGE-L,
               BERTScore F1 against full attention's generations)
  runner.py    runs one cell in a worker process (caches the loaded model between cells) -> a row
  schema.py    the Parquet schema of a row (documented in SCHEMA.md)
  store.py     one Parquet file per cell, written atomically; resume = skip the finished ones
  fanout.py    spreads cells over Ray actors (one GPU or CPU slot each) with a live progress bar
  report/      the markdown summary and the plots, `adore report DIR`
"""
