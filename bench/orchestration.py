"""Orchestration overhead: the same tiny retraining job run by the library directly and through the Prefect flow.

    python bench/orchestration.py [--repeats 3] [--steps 2] [--images 8] [--size 64]

Both variants run in this one process, on the same local data and the same MLflow store (SQLite in a temporary
folder), with the same recipe (random-init ``atto`` with a small decoder, the tiny settings of the pipeline tests):

    direct  ``ddcolor.pipeline.run_pipeline(cfg, source, work_dir=..., force=True)``: ingest -> validate ->
            fingerprint -> train -> evaluate -> gate/register/promote -> colorize, plain function calls.
    flow    ``flows.train_ddcolor.train_ddcolor(..., force=True)``: the same steps as Prefect tasks (retries,
            state reporting, task-run records, the summary / sample-grid artifacts), on Prefect's ephemeral
            local server (no ``PREFECT_API_URL``; a temporary PREFECT_HOME).

``force=True`` makes every run train (the skip-if-unchanged rule would otherwise skip after the first). One untimed
warm-up of each variant comes first: imports, MLflow's schema migration, the first ingest (later ingests find
every image already there, in both variants) and the ephemeral Prefect server's start (reported separately: it is
paid once per process, or never with a real server). Then the variants alternate (direct, flow, direct, ...) so
that drift on a shared machine hits both; the table shows the median and the fastest wall time of ``--repeats``
runs each, and the time outside the steps: wall time minus the steps' own wall time (``PipelineResult.seconds``
for direct, the task runs' start-to-end times recorded by the Prefect server for the flow). On a machine shared
with other jobs the wall times swing by several x (the 2-thread torch steps stall when another process takes a
core), the outside-the-steps time hardly at all: it is the number to judge the orchestration by.

Not measured here: a deployment run through a worker adds the worker's polling interval and a fresh flow-run
process (imports: seconds; see tests/flows/test_e2e_deployment.py). Target: flow <= 1.10 x direct. Not a test.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tiny_sections(steps: int, size: int) -> dict[str, dict]:
    """The tests' tiny recipe (``ddcolor/configs/tiny.yaml``) with `steps` and `size` px, as params.yaml sections
    (the flow's parameters; flattened for `load_config`)."""
    from ddcolor.recipes import recipe_sections

    sections = recipe_sections("tiny")
    sections["data"]["size"] = sections["eval"]["image_size"] = size
    sections["train"]["max_steps"] = steps
    return sections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each variant (median)")
    parser.add_argument("--steps", type=int, default=2, help="training steps per run")
    parser.add_argument("--images", type=int, default=8, help="sample images in the dataset")
    parser.add_argument("--size", type=int, default=64, help="training / evaluation resolution, px")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ddcolor-bench-orch-"))
    # Before Prefect / MLflow are imported: they read their settings from the environment once.
    for name in [k for k in os.environ if k.startswith("PREFECT_")]:
        del os.environ[name]
    os.environ.update(
        PREFECT_HOME=str(tmp / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}",
        MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false",
        GX_ANALYTICS_ENABLED="false",
    )
    logging.basicConfig(level=logging.WARNING)

    import prefect
    import torch
    from procstats import machine

    from ddcolor.config import load_config
    from ddcolor.data.samples import write_samples
    from ddcolor.pipeline import run_pipeline, section_overrides
    from flows.train_ddcolor import train_ddcolor

    sections = tiny_sections(args.steps, args.size)
    sections["data"].update(source=str(tmp / "raw"), shards_uri=str(tmp / "shards"))
    write_samples(tmp / "raw", args.images)
    cfg = load_config(None, section_overrides(**sections))
    tracking_uri = os.environ["MLFLOW_TRACKING_URI"]

    steps: dict[str, list[dict[str, float]]] = {"direct": [], "flow": []}

    def direct(i: int) -> float:
        start = time.perf_counter()
        result = run_pipeline(cfg, work_dir=tmp / f"direct-{i}", force=True, progress=False, tracking_uri=tracking_uri)
        took = time.perf_counter() - start
        assert result.status in {"promoted", "not_promoted"}, result.reason
        if i >= 0:
            steps["direct"].append(dict(result.seconds))
        return took

    def flow(i: int) -> float:
        start = time.perf_counter()
        state = train_ddcolor(
            config_path=None, work_dir=str(tmp / f"flow-{i}"), force=True, return_state=True, **sections
        )
        took = time.perf_counter() - start
        assert state.is_completed(), state.message
        if i >= 0:
            steps["flow"].append(task_seconds(state.state_details.flow_run_id))
        return took

    def task_seconds(flow_run_id) -> dict[str, float]:
        """Wall seconds of each task of the flow run (start to end as the Prefect server recorded them)."""
        from prefect import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        out: dict[str, float] = {}
        for run in runs:
            if run.start_time and run.end_time:
                name = run.name.rsplit("-", 1)[0]  # "train-3f2" -> "train"
                out[name] = out.get(name, 0.0) + (run.end_time - run.start_time).total_seconds()
        return out

    threads = torch.get_num_threads()
    print(f"# {machine('cpu')}; python {platform.python_version()}, torch {torch.__version__}")
    print(f"# prefect {prefect.__version__} (ephemeral server), MLflow on SQLite; torch threads {threads}")
    print(
        f"# job: {args.images} images at {args.size} px, atto (small decoder, random init), {args.steps} training "
        f"steps, eval on 4 val images, register + promote + ONNX export, colorize the sample photos; force=True"
    )
    warm_direct = direct(-1)
    warm_flow = flow(-1)  # includes starting the ephemeral Prefect server
    print(f"# warm-up (untimed): direct {warm_direct:.1f} s, flow {warm_flow:.1f} s (incl. ephemeral server start)")
    times: dict[str, list[float]] = {"direct": [], "flow": []}
    for i in range(args.repeats):
        times["direct"].append(direct(i))
        times["flow"].append(flow(i))
    base, best = statistics.median(times["direct"]), min(times["direct"])
    # Outside-the-steps time of each run (wall minus the steps' own wall time): the orchestration itself, far less
    # sensitive than the wall time to other jobs on a shared machine slowing the compute down.
    glue = {k: [w - sum(s.values()) for w, s in zip(times[k], steps[k], strict=True)] for k in times}
    print()
    print("| variant | median wall s | min wall s | runs, s | median vs direct | min vs direct | outside steps s |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for name, values in times.items():
        med, low = statistics.median(values), min(values)
        runs = ", ".join(f"{v:.2f}" for v in values)
        print(
            f"| {name} | {med:.2f} | {low:.2f} | {runs} | {med / base:.3f}x | {low / best:.3f}x | "
            f"{statistics.median(glue[name]):.2f} |"
        )
    names = list(dict.fromkeys([*steps["direct"][0], *steps["flow"][0]]))
    print("\n| step | direct median s | flow task median s | difference s |")
    print("|---|---:|---:|---:|")
    for name in names:
        d = statistics.median(r.get(name, 0.0) for r in steps["direct"])
        f = statistics.median(r.get(name, 0.0) for r in steps["flow"])
        print(f"| {name} | {d:.2f} | {f:.2f} | {f - d:+.2f} |")
    overhead = statistics.median(times["flow"]) / base - 1
    extra = statistics.median(glue["flow"]) - statistics.median(glue["direct"])
    best_overhead = min(times["flow"]) / best - 1
    print(f"\norchestration overhead: median wall {100 * overhead:+.1f}%, best run {100 * best_overhead:+.1f}%")
    print(
        f"outside the steps: flow {extra:+.2f} s per run vs direct = {100 * extra / best:+.1f}% of the fastest direct "
        f"run (target < 10%: {'OK' if extra / best < 0.10 else 'OVER'})"
    )


if __name__ == "__main__":
    main()
