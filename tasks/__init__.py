"""bertflow stages: one thin module per dvc.yaml stage (bertflow/stages.py lists them), and the CLI.

Each stage module reads its inputs, calls the library (bertflow/), writes its outputs atomically and
returns its figures from one edge function ``run(params, paths) -> dict``; it is reached from the
``bertflow`` CLI (``tasks.cli``), which is what dvc.yaml calls. No stage imports another stage.
"""
