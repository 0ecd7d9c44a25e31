"""bertflow stages: one module per stage (ingest, tokenizer, pretrain_data, ...) plus shared pieces.

Each stage module has pure functions at the top, one edge function ``run(params, paths) -> dict``
that reads inputs and writes outputs atomically, and is reached from the ``bertflow`` CLI
(``tasks.cli``), which is what dvc.yaml calls.
"""
