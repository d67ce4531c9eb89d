"""`python -m ml <step>`: the pipeline's steps as a CLI, for pods and for people.

Each step reads the references it needs from JSON files (the previous steps' output, or inline
JSON: how the training pod gets its window) and prints its result as JSON on stdout (`--output
PATH`: to a file too); logs go to stderr. A training run records its result in MLflow too
(`ml.pipeline.trained_by`). Settings come from the env vars, as in Airflow (README.md); a
step's per-run knobs are options derived from them (`ml.knobs`), e.g. `--epochs`,
`--force-deploy`/`--no-force-deploy`. MLflow is `MLFLOW_TRACKING_URI`.

    python -m ml window --end 2026-03-10 --output window.json
    python -m ml validate --window window.json
    python -m ml train --window window.json --epochs 20 --output trained.json
    python -m ml evaluate --window window.json --trained trained.json --output evaluation.json
    python -m ml register --window window.json --trained trained.json \
        --evaluation evaluation.json --output version.json
    python -m ml gate --version version.json --evaluation evaluation.json

Exit codes: 0 done, 1 failed, 2 bad input (invalid data, bad arguments), 3 the gate rejected.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import date
from pathlib import Path
from typing import Any

from ml import pipeline
from ml.knobs import add_cli_options, cli_overrides
from ml.settings import DataSettings, GateSettings, RegistrySettings, TrainingSettings, tracking_uri

EXIT_BAD_INPUT = 2
EXIT_REJECTED = 3

# The settings fields each step takes as options (everything else from the env vars).
WINDOW_KNOBS = ("window_days",)
TRAIN_KNOBS = ("epochs", "learning_rate", "batch_size")
GATE_KNOBS = ("max_rmse", "min_r2", "max_regression", "force_deploy")


def _read(ref: str) -> dict[str, Any]:
    """A step's JSON result: a file path, or the JSON itself (how a pod gets it from XCom)."""
    text = ref if ref.lstrip().startswith("{") else Path(ref).read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not a JSON step result: {ref[:80]!r}: {exc}") from exc


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ml", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="step", required=True)

    def step(name: str, help_: str, *refs: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        for ref in refs:
            what = f"JSON file (or inline JSON) from the {ref} step"
            p.add_argument(f"--{ref}", required=True, help=what)
        p.add_argument("--output", help="also write the JSON result to this file")
        return p

    window = step("window", "list (and for the built-in source, write) the window's partitions")
    end = "window end, exclusive (YYYY-MM-DD)"
    window.add_argument("--end", type=date.fromisoformat, required=True, help=end)
    add_cli_options(window, DataSettings, *WINDOW_KNOBS)
    step("validate", "validate every partition of the window", "window")
    train = step("train", "train and log to MLflow", "window")
    add_cli_options(train, TrainingSettings, *TRAIN_KNOBS)
    train.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    step("evaluate", "score the new model and the champion on the holdout", "window", "trained")
    step("register", "register the model version", "window", "trained", "evaluation")
    gate = step("gate", "decide; exit 3 when rejected", "version", "evaluation")
    add_cli_options(gate, GateSettings, *GATE_KNOBS)
    return parser


def run(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    data, registry = DataSettings(), RegistrySettings()
    uri = tracking_uri()
    if args.step == "window":
        return pipeline.load_window(cli_overrides(data, args, *WINDOW_KNOBS), args.end), 0
    if args.step == "validate":
        return pipeline.validate_window(_read(args.window), data), 0
    if args.step == "train":
        training = cli_overrides(TrainingSettings(), args, *TRAIN_KNOBS)
        tags = dict(t.split("=", 1) for t in args.tag)
        window = _read(args.window)
        return pipeline.train(window, data, training, registry, tracking_uri=uri, tags=tags), 0
    if args.step == "evaluate":
        window, trained = _read(args.window), _read(args.trained)
        return pipeline.evaluate(window, trained, data, registry, tracking_uri=uri), 0
    if args.step == "register":
        refs = _read(args.window), _read(args.trained), _read(args.evaluation)
        return pipeline.register(*refs, registry, tracking_uri=uri), 0
    if args.step == "gate":
        gate = cli_overrides(GateSettings(), args, *GATE_KNOBS)
        decision = pipeline.gate(
            _read(args.version), _read(args.evaluation), gate, registry, tracking_uri=uri
        )
        return decision, 0 if decision["passed"] else EXIT_REJECTED
    raise AssertionError(args.step)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from pydantic import ValidationError

    from ml.data import DataNotFoundError, DataValidationError

    try:
        result, code = run(args)
    except (DataValidationError, DataNotFoundError, ValidationError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    text = json.dumps(result, indent=2, default=str)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    print(text)
    return code


if __name__ == "__main__":
    sys.exit(main())
