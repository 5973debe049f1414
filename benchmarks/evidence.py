"""Do DIA and SSIA help where there is headroom? Two tasks, six arms, ten seeds, paired CIs.

The older ``benchmarks/accuracy.py`` (ResNet-20 on 8x8 digits) saturates at ~99%: no headroom,
no signal. This benchmark tests the papers' claims on two tasks a small CNN does *not* solve
(``benchmarks/common/evidence_tasks.py``): cluttered digits (2-D) and MNIST-1D (1-D, ``(B, C, L)``).

Arms (per task, same data, recipe, seeds and base-network initialisation per seed; only the
attention differs):

* ``baseline``, ``dia``, ``ssia``, ``dia+ssia``, ``se-per-block`` - the fxattn options of
  ``benchmarks/accuracy.py`` (``se-per-block`` is ``DIA(module="se", share="none")``: one
  independent SE module per residual block, i.e. an SE-ResNet);
* ``cbam`` (2-D only) - timm's ``CbamModule`` in every block's attention slot (CBAM-ResNet),
  passed through the same ``fxattn.transform(dia=False, ssia=False)`` pipeline.

Protocol: the learning rate is chosen ONCE per task, on the baseline, by validation accuracy
(grid ``Task.lr_grid``, widened on the 1-3-10 sequence while the best lr is at an end of it, so
the choice is bracketed; sweep seed 100, not used later); every arm then trains with it. Test
accuracy is the final epoch's (no selection on the test set). For each arm the paired (by seed)
difference to the baseline gets a two-sided 95% t-interval and a paired t-test; the p-values of
the arms of a task are Holm-corrected. A difference is called significant when its Holm p < 0.05
(equivalently, at least, its CI excludes 0).

Each trained model's lean graph is exported to ONNX (fxattn.export_onnx, verified in
onnxruntime) and evaluated on the test set in onnxruntime; DIA models are also exported with
``dia_weights="int8"`` and ``"int4"`` and evaluated the same way (paired change vs fp32 ONNX).
The attention-correlation diagnostic runs on the test set of every trained DIA model. Latency:
the seed-0 models exported again with fxattn's default exporter, onnxruntime 1 thread, batch 1,
interleaved.

Resumable and deterministic: each run writes
``benchmarks/results/evidence_runs/<task>_<arm>_s<seed>.json`` (single-threaded, deterministic
algorithms, fixed seeds) and a checkpoint under ``--cache``; a rerun trains only what is missing
or was made by other code (``recipe_fingerprint``).

    python benchmarks/evidence.py                    # full run: 122 runs (sweep included)
    python benchmarks/evidence.py --report-only      # tables of the seeds cached so far

Cost, measured on 2 cores under a load average of 15-30: a cluttered-digits run 100-250 s wall,
an MNIST-1D run 70-350 s (seed 0 exports with the dynamo exporter) - hours for the full run at
that load; the script prints its estimate from the runs it has cached.
    python benchmarks/evidence.py --tasks mnist1d --seeds 0 --epochs 1 --out /tmp/smoke
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.common

from accuracy import ARMS as FXATTN_ARMS  # noqa: E402
from accuracy import accuracy, fit  # noqa: E402

import fxattn  # noqa: E402
from benchmarks.common.evidence_tasks import TASKS, Split, Task  # noqa: E402
from fxattn.analysis.graph import count_parameters  # noqa: E402
from fxattn.bench import interleaved  # noqa: E402
from fxattn.capture import ExampleInputs  # noqa: E402
from fxattn.export.runtime import ort_feed, ort_session  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ARMS: dict[str, dict[str, Any]] = {**FXATTN_ARMS, "cbam": {"dia": False, "ssia": False,
                                                          "block": "cbam"}}
ARMS_2D_ONLY = ("cbam",)  # timm's CBAM is 2-D
LOWP_MODES = ("int8", "int4")
SWEEP_SEEDS = (100,)
#: arms whose DIA weights are also evaluated as int8 / int4 (the DIA-LSTM arms)
LOWP_ARMS = ("dia", "dia+ssia")
#: seed whose exports are timed
LATENCY_SEED = 0
#: the sweep widens its grid (x ~3.16 per step, the 1-3-10 sequence) while its best lr is at an
#: end, at most this many steps per end
SWEEP_EXTENSIONS = 3
#: wall seconds of one run per task on the loaded 2-core machine, before any run is cached
GUESS_SECONDS = {"cluttered": 170.0, "mnist1d": 100.0}


def arms_for(task: Task) -> list[str]:
    return [arm for arm in ARMS if task.dim == 2 or arm not in ARMS_2D_ONLY]


def has_dia(arm: str) -> bool:
    return ARMS[arm]["dia"] is not False


@lru_cache(maxsize=1)
def recipe_fingerprint() -> str:
    """A hash of the code a run's numbers depend on: the tasks (data and network), the
    training loop, the arms and this module's build / train functions, plus fxattn's version.

    A cached run made by other code is redone: the task configuration alone does not catch a
    changed training loop (cached sweeps of an older loop once survived a rerun that way).
    """
    import accuracy as accuracy_module

    from benchmarks.common import evidence_tasks

    parts = [inspect.getsource(evidence_tasks), inspect.getsource(accuracy_module.fit),
             inspect.getsource(accuracy_module.accuracy), inspect.getsource(build),
             inspect.getsource(train_run), json.dumps(ARMS, sort_keys=True, default=str),
             fxattn.__version__]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- one run


@lru_cache(maxsize=2)
def task_data(name: str) -> dict[str, Split]:
    """Generated once per worker process (the generators are deterministic)."""
    return TASKS[name].data()


def build(task: Task, arm: str, seed: int, example: torch.Tensor) -> fxattn.AttentionGraphModule:
    """The arm's network; the base network's weights depend on the seed only, not the arm."""
    torch.manual_seed(seed)
    model = task.model()
    options = ARMS[arm]
    torch.manual_seed(10_000 + seed)  # attention modules: same init in every arm that has them
    if options.get("block") == "cbam":
        from timm.layers.cbam import CbamModule

        for block in model.blocks():
            block.attention = CbamModule(block.bn2.num_features, rd_ratio=0.25)
    dia = fxattn.DIA(**options["dia"]) if options["dia"] is not False else False
    ssia = fxattn.SSIA(**options["ssia"]) if options["ssia"] is not False else False
    return fxattn.transform(model, example, dia=dia, ssia=ssia)


def unbuildable(task: Task, arms: list[str]) -> dict[str, str]:
    """Arms that ``fxattn.transform`` refuses on ``task``'s network, with its message."""
    example = task_data(task.name)["train"][0][:2]
    refused = {}
    for arm in arms:
        try:
            build(task, arm, 0, example)
        except fxattn.FxAttnError as exc:
            refused[arm] = f"{type(exc).__name__}: {exc}"
    return refused


def _onnx_eval(path: Path, images: torch.Tensor) -> np.ndarray:
    session = ort_session(str(path), threads=1)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: chunk.numpy()})[0]
                           for chunk in images.split(256)])


def evaluate_onnx(lean: torch.nn.Module, arm: str, test: Split, stem: Path,
                  exporter: str) -> dict[str, Any]:
    """The fp32 export (verified) and, for the DIA-LSTM arms, its int8 / int4 DIA-weight
    versions, each scored on the test set in onnxruntime.

    The low-precision files are made by :func:`fxattn.export.lowp.apply_dia_weights` - the rewrite
    ``export_onnx(dia_weights=...)`` applies after exporting - on copies of the fp32 file, so
    one export serves all three modes.
    """
    from fxattn.export.lowp import apply_dia_weights

    images, labels = test
    fp32 = stem.with_name(f"{stem.name}_fp32.onnx")
    report = fxattn.export_onnx(lean, fp32, images[:2], exporter=exporter)
    reference = _onnx_eval(fp32, images)
    out: dict[str, Any] = {"fp32": {
        "test_acc": float((reference.argmax(1) == labels.numpy()).mean()),
        "file_bytes": report.file_bytes, "nodes": report.nodes, "exporter": report.exporter,
        "verify_max_abs_error": report.max_abs_error}}
    for mode in LOWP_MODES if arm in LOWP_ARMS else ():
        path = stem.with_name(f"{stem.name}_{mode}.onnx")
        shutil.copyfile(fp32, path)
        note = apply_dia_weights(path, mode)
        logits = _onnx_eval(path, images)
        out[mode] = {"test_acc": float((logits.argmax(1) == labels.numpy()).mean()),
                     "note": note,
                     "max_abs_logit_change": float(np.abs(logits - reference).max()),
                     "prediction_agreement": float((logits.argmax(1)
                                                    == reference.argmax(1)).mean())}
    return out


def train_run(task_name: str, arm: str, seed: int, lr: float, epochs: int, sweep: bool,
              cache: Path) -> dict[str, Any]:
    """Train one (task, arm, seed) and measure everything per-seed; return its record."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    task = replace(TASKS[task_name], epochs=epochs)
    data = task_data(task_name)
    (train_x, train_y), (val_x, val_y), test = data["train"], data["val"], data["test"]
    net = build(task, arm, seed, train_x[:2])
    start = time.perf_counter()
    curves = fit(net, train_x, train_y, epochs=task.epochs, batch=task.batch, lr=lr,
                 momentum=task.momentum, weight_decay=task.weight_decay,
                 generator=torch.Generator().manual_seed(seed),
                 evaluate=lambda: accuracy(net, val_x, val_y))
    curves["val_acc"] = curves.pop("eval_acc")
    seconds = time.perf_counter() - start
    lean = fxattn.strip_ssia(net)
    record: dict[str, Any] = {
        "task": task_name, "arm": arm, "seed": seed, "lr": lr, "epochs": task.epochs,
        "sweep": sweep, "options": ARMS[arm], "task_config": task.to_dict(),
        "val_acc": curves["val_acc"][-1],
        "test_acc": accuracy(net, *test),
        "train_seconds": round(seconds, 1),
        "parameters": count_parameters(lean),
        "training_parameters": count_parameters(net),
        "dia_sites": len(net.plan.sites) if has_dia(arm) else 0,
        "ssia_pairs": len(net.plan.active_pairs) if ARMS[arm]["ssia"] is not False else 0,
        "curves": {k: [round(v, 6) for v in vs] for k, vs in curves.items()},
        "torch": torch.__version__,
        "recipe_fingerprint": recipe_fingerprint(),
    }
    if sweep:
        return record
    cache.mkdir(parents=True, exist_ok=True)
    stem = cache / f"{task_name}_{_slug(arm)}_s{seed}"
    torch.save(net.state_dict(), stem.with_suffix(".pt"))
    # fxattn's default exporter for the timed seed (what a user deploys); elsewhere the
    # TorchScript one: the same numbers for ~10x less CPU on these small models
    exporter = "auto" if seed == LATENCY_SEED else "torchscript"
    record["onnx"] = evaluate_onnx(lean, arm, test, stem, exporter)
    if has_dia(arm):
        record["correlation"] = fxattn.attention_correlation(net.eval(), test[0]).to_dict()
    record["seconds_total"] = round(time.perf_counter() - start, 1)
    return record


def _slug(arm: str) -> str:
    return arm.replace("+", "_")


def run_path(runs: Path, task: str, arm: str, seed: int, sweep_lr: float | None = None) -> Path:
    name = f"sweep_{task}_lr{sweep_lr:g}_s{seed}" if sweep_lr is not None else \
        f"{task}_{_slug(arm)}_s{seed}"
    return runs / f"{name}.json"


def _load(path: Path, lr: float, epochs: int) -> dict[str, Any] | None:
    """A cached run, unless it was made with another recipe or other code (then it is
    redone)."""
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    task = json.loads(json.dumps(replace(TASKS[record["task"]], epochs=epochs).to_dict()))
    same = (record["lr"] == lr and record["epochs"] == epochs
            and record.get("task_config") == task
            and record.get("recipe_fingerprint") == recipe_fingerprint())
    return record if same else None


def next_lr(lr: float, up: bool) -> float:
    """The neighbour of ``lr`` on the 1-3-10 grid (0.03, 0.1, 0.3, 1, 3, ...)."""
    exponent = np.floor(np.log10(lr) + 1e-9)
    one = lr / 10**exponent < 2  # lr is 1 x 10^k (else 3 x 10^k)
    factor = (3.0 if one else 10.0) if up else (0.3 if one else 1.0)
    return float(f"{factor * 10**exponent:.6g}")


def _mean_val(records: list[dict[str, Any]]) -> dict[float, float]:
    """Mean validation accuracy per lr of sweep records."""
    by_lr: dict[float, list[float]] = {}
    for r in records:
        by_lr.setdefault(r["lr"], []).append(r["val_acc"])
    return {lr: float(np.mean(values)) for lr, values in by_lr.items()}


def choose_lr(task: Task, runs: Path, workers: int, report_only: bool
              ) -> tuple[float, list[dict[str, Any]]]:
    """The baseline's best lr by mean validation accuracy over ``SWEEP_SEEDS``, on
    ``task.lr_grid`` widened step by step while the best is at an end of the grid (so the
    chosen lr is bracketed by two worse ones, or the widening limit is reported)."""
    grid = sorted(task.lr_grid)
    for _ in range(2 * SWEEP_EXTENSIONS + 1):
        paths = {(lr, seed): run_path(runs, task.name, "baseline", seed, lr)
                 for lr in grid for seed in SWEEP_SEEDS}
        if not report_only:
            jobs = [(task.name, "baseline", seed, lr, task.epochs, True, path, None)
                    for (lr, seed), path in paths.items()
                    if _load(path, lr, task.epochs) is None]
            run_jobs(jobs, workers, _estimate(runs, jobs, workers))
        loaded = [_load(path, lr, task.epochs) for (lr, _), path in paths.items()]
        records = [r for r in loaded if r is not None]
        if len(records) < len(loaded):  # --report-only on an unfinished sweep
            break
        means = _mean_val(records)
        best = max(means, key=means.get)
        if len(grid) - len(task.lr_grid) >= 2 * SWEEP_EXTENSIONS:
            break
        if best == grid[-1]:
            grid.append(next_lr(grid[-1], up=True))
        elif best == grid[0]:
            grid.insert(0, next_lr(grid[0], up=False))
        else:
            break
    means = _mean_val(records)
    best = max(means, key=means.get) if means else max(task.lr_grid)
    print(f"{task.name}: lr {best:g} (validation accuracy "
          f"{ {f'{k:g}': round(v, 4) for k, v in sorted(means.items())} })", flush=True)
    return best, records


def _job(task: str, arm: str, seed: int, lr: float, epochs: int, sweep: bool,
         path: Path, cache: Path) -> str:
    record = train_run(task, arm, seed, lr, epochs, sweep, cache)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)  # a run counts as done only once complete
    return (f"{task} {arm} seed {seed} lr {lr:g}: val {record['val_acc']:.4f} test "
            f"{record['test_acc']:.4f} ({record.get('seconds_total', record['train_seconds'])} s)")


def run_jobs(jobs: list[tuple], workers: int, estimate: float) -> None:
    """Run the missing jobs on ``workers`` single-threaded processes, printing progress."""
    if not jobs:
        return
    print(f"{len(jobs)} runs to do, expected ~{estimate / 60:.0f} min on {workers} worker(s)",
          flush=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_job, *job) for job in jobs]
        for done, future in enumerate(as_completed(futures), 1):
            print(f"[{time.perf_counter() - start:6.0f} s {done}/{len(jobs)}] "
                  f"{future.result()}", flush=True)


def _estimate(runs: Path, jobs: list[tuple], workers: int) -> float:
    """Seconds: the mean time of cached runs of the same task, else ``GUESS_SECONDS``."""
    per_task: dict[str, list[float]] = {}
    for path in runs.glob("*.json"):
        record = json.loads(path.read_text())
        per_task.setdefault(record["task"], []).append(
            record.get("seconds_total", record["train_seconds"]))
    total = sum(np.mean(per_task[j[0]]) if j[0] in per_task else GUESS_SECONDS[j[0]]
                for j in jobs)
    return total / max(1, min(workers, len(jobs)))


# --------------------------------------------------------------------------- statistics


def paired(values: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Mean paired difference with a two-sided 95% t-interval and the paired t-test p."""
    from scipy import stats

    diff = np.asarray(values, dtype=float) - np.asarray(reference, dtype=float)
    n = len(diff)
    mean = float(diff.mean())
    if n < 2:
        return {"mean": mean, "ci95": [float("nan")] * 2, "p": float("nan"), "n": n}
    sem = float(diff.std(ddof=1) / np.sqrt(n))
    half = float(stats.t.ppf(0.975, n - 1) * sem)
    p = float(stats.ttest_rel(values, reference).pvalue) if sem > 0 else \
        (1.0 if mean == 0 else 0.0)
    return {"mean": mean, "sd": float(diff.std(ddof=1)), "ci95": [mean - half, mean + half],
            "p": p, "n": n}


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values (family: the arms compared within one task)."""
    items = sorted(((p, k) for k, p in pvalues.items() if p == p))
    adjusted, running = {}, 0.0
    for rank, (p, key) in enumerate(items):
        running = max(running, min(1.0, (len(items) - rank) * p))
        adjusted[key] = running
    return adjusted


# --------------------------------------------------------------------------- after training


def measure_latency(task: Task, arms: list[str], cache: Path, runs: int) -> dict[str, Any]:
    """Time the ``LATENCY_SEED`` exports of every arm (fxattn's default exporter; DIA's int8 /
    int4 files too) in onnxruntime, 1 thread, batch 1, interleaved."""
    sessions = {}
    for arm in arms:
        for mode in ("fp32", *(LOWP_MODES if arm in LOWP_ARMS else ())):
            path = cache / f"{task.name}_{_slug(arm)}_s{LATENCY_SEED}_{mode}.onnx"
            sessions[arm if mode == "fp32" else f"{arm} {mode}"] = ort_session(str(path), 1)
    one = ExampleInputs.from_user(task_data(task.name)["test"][0][:1])
    feeds = {key: ort_feed(s, one) for key, s in sessions.items()}
    stats = interleaved({key: (lambda s=s, f=feeds[key]: s.run(None, f))
                         for key, s in sessions.items()}, runs=runs, warmup=20)
    return {key: {"p50_ms": stats[key].p50_ms, "p90_ms": stats[key].p90_ms}
            for key in sessions}


def _correlation(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """The attention-correlation diagnostic over seeds (mean r per stage, mean ± std)."""
    r_mean = np.array([r["correlation"]["mean_pearson"] for r in rs], dtype=float)
    stages = np.array([[s["mean_off_diagonal"] for s in r["correlation"]["stages"]]
                       for r in rs], dtype=float)
    ddof = 1 if len(rs) > 1 else 0
    return {"mean_r": float(np.nanmean(r_mean)), "mean_r_std": float(np.nanstd(r_mean, ddof=ddof)),
            "stage_mean_r": np.nanmean(stages, 0).round(4).tolist(),
            "stage_std_r": np.nanstd(stages, 0, ddof=ddof).round(4).tolist()}


def summarise(task: Task, records: list[dict[str, Any]], sweep: list[dict[str, Any]],
              lr: float, latency: dict[str, Any]) -> dict[str, Any]:
    by_arm = {arm: sorted((r for r in records if r["arm"] == arm), key=lambda r: r["seed"])
              for arm in arms_for(task)}
    by_arm = {arm: rs for arm, rs in by_arm.items() if rs}
    base = by_arm["baseline"]
    base_acc = np.array([r["test_acc"] for r in base])
    arms: dict[str, Any] = {}
    for arm, rs in by_arm.items():
        if [r["seed"] for r in rs] != [r["seed"] for r in base]:
            raise SystemExit(f"{task.name} {arm}: seeds differ from the baseline's")
        acc = np.array([r["test_acc"] for r in rs])
        entry: dict[str, Any] = {
            "seeds": [r["seed"] for r in rs],
            "test_acc": acc.tolist(),
            "test_acc_mean": float(acc.mean()),
            "test_acc_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "parameters": rs[0]["parameters"],
            "training_parameters": rs[0]["training_parameters"],
            "dia_sites": rs[0]["dia_sites"],
            "ssia_pairs": rs[0]["ssia_pairs"],
            "train_seconds_mean": float(np.mean([r["train_seconds"] for r in rs])),
            "ort_p50_ms": latency.get(arm, {}).get("p50_ms"),
            "onnx_fp32_test_acc_mean": float(np.mean([r["onnx"]["fp32"]["test_acc"]
                                                      for r in rs])),
            "onnx_fp32_max_abs_error": max(r["onnx"]["fp32"]["verify_max_abs_error"]
                                           for r in rs),
        }
        if arm != "baseline":
            entry["vs_baseline"] = paired(acc, base_acc)
        if has_dia(arm):
            entry["correlation"] = _correlation(rs)
        if arm in LOWP_ARMS:
            fp32 = np.array([r["onnx"]["fp32"]["test_acc"] for r in rs])
            entry["lowp"] = {}
            for mode in LOWP_MODES:
                low = np.array([r["onnx"][mode]["test_acc"] for r in rs])
                entry["lowp"][mode] = {
                    "test_acc_mean": float(low.mean()),
                    "vs_fp32": paired(low, fp32),
                    "max_abs_logit_change": max(r["onnx"][mode]["max_abs_logit_change"]
                                                for r in rs),
                    "prediction_agreement_min": min(r["onnx"][mode]["prediction_agreement"]
                                                    for r in rs),
                    "ort_p50_ms": latency.get(f"{arm} {mode}", {}).get("p50_ms"),
                }
        arms[arm] = entry
    adjusted = holm({arm: e["vs_baseline"]["p"] for arm, e in arms.items()
                     if "vs_baseline" in e})
    for arm, p in adjusted.items():
        verdict = arms[arm]["vs_baseline"]
        verdict["p_holm"] = p
        verdict["significant"] = bool(p < 0.05)
        verdict["ci_excludes_0"] = bool(verdict["ci95"][0] > 0 or verdict["ci95"][1] < 0)
    sweep_table: dict[str, list[float]] = {}
    for r in sweep:
        sweep_table.setdefault(f"{r['lr']:g}", []).append(r["val_acc"])
    return {"task": task.to_dict(), "lr": lr, "lr_sweep_val_acc": sweep_table,
            "latency": latency, "arms": arms}


def _pp(x: float) -> str:
    return f"{x * 100:+.2f}"


def task_markdown(summary: dict[str, Any]) -> list[str]:
    task, arms = summary["task"], summary["arms"]
    base = arms["baseline"]
    n = len(base["seeds"])
    sweep = ", ".join(f"lr {lr}: {np.mean(v) * 100:.2f}%" for lr, v in
                      summary["lr_sweep_val_acc"].items())
    lines = [
        f"#### {task['title']}",
        "",
        f"Data: {task['recipe']}.",
        "",
        f"Network: residual CNN, {task['dim']}-D, widths {list(task['widths'])}, "
        f"{task['blocks']} blocks per stage, stem stride {task['stem_stride']}. Recipe (every "
        f"arm): {task['epochs']} epochs, batch {task['batch']}, SGD + Nesterov (momentum "
        f"{task['momentum']}, weight decay {task['weight_decay']}), cosine schedule, lr "
        f"{summary['lr']:g} chosen on the baseline by validation accuracy (sweep, seeds "
        f"{list(SWEEP_SEEDS)}: {sweep}"
        + ("; the best is the largest lr of the grid" if summary["lr"] == max(
            float(k) for k in summary["lr_sweep_val_acc"]) else "")
        + f"). {n} seeds per "
        f"arm ({base['seeds']}"
        + (f", of the {len(summary['seeds_planned'])} planned: the run was cut short"
           if n < len(summary.get("seeds_planned", base["seeds"])) else "")
        + "); test accuracy of the final epoch.",
        "",
        "| arm | test acc. (%) mean ± std | Δ vs baseline (pp) [95% CI] | Holm p | "
        "significant | params (deployed) | ORT p50 (ms) | attention r |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, e in arms.items():
        v = e.get("vs_baseline")
        delta = "-" if v is None else \
            f"{_pp(v['mean'])} [{_pp(v['ci95'][0])}, {_pp(v['ci95'][1])}]"
        p = "-" if v is None else f"{v['p_holm']:.3f}"
        sig = "-" if v is None else ("**yes**" if v["significant"] else "no")
        lat = "-" if e["ort_p50_ms"] is None else f"{e['ort_p50_ms']:.3f}"
        corr = f"{e['correlation']['mean_r']:.3f}" if "correlation" in e else "-"
        lines.append(f"| {arm} | {e['test_acc_mean'] * 100:.2f} ± {e['test_acc_std'] * 100:.2f}"
                     f" | {delta} | {p} | {sig} | {e['parameters']:,} | {lat} | {corr} |")
    lowp = [(arm, e) for arm, e in arms.items() if "lowp" in e]
    if lowp:
        lines += ["", "Low-precision DIA weights (`export_onnx(dia_weights=...)`), test set in "
                  "onnxruntime, paired by seed against the same model's fp32 ONNX export:", "",
                  "| arm | fp32 ONNX acc. (%) | mode | Δ acc. (pp) [95% CI] | "
                  "min. prediction agreement | max abs logit change | ORT p50 (ms) |",
                  "|---|---|---|---|---|---|---|"]
        for arm, e in lowp:
            for mode, m in e["lowp"].items():
                v = m["vs_fp32"]
                lat = "-" if m["ort_p50_ms"] is None else f"{m['ort_p50_ms']:.3f}"
                lines.append(
                    f"| {arm} | {e['onnx_fp32_test_acc_mean'] * 100:.2f} | {mode} | "
                    f"{_pp(v['mean'])} [{_pp(v['ci95'][0])}, {_pp(v['ci95'][1])}] | "
                    f"{m['prediction_agreement_min'] * 100:.2f}% | "
                    f"{m['max_abs_logit_change']:.3g} | {lat} |")
    lines += ["", "Attention correlation (mean Pearson r between the blocks of a stage, test "
              "set, mean ± std over seeds): " + "; ".join(
                  f"`{arm}` " + ", ".join(f"{m:.3f} ± {s:.3f}" for m, s in zip(
                      e["correlation"]["stage_mean_r"], e["correlation"]["stage_std_r"],
                      strict=True))
                  for arm, e in arms.items() if "correlation" in e), ""]
    for arm, reason in summary.get("not_run", {}).items():
        lines.append(f"Not run: `{arm}` - fxattn refused this network ({reason}).")
    lines += ["", f"![{task['name']}](evidence_{task['name']}.png)", ""]
    return lines


def verdict_lines(summaries: dict[str, Any]) -> list[str]:
    """One plain sentence per task: which differences are significant (Holm p < 0.05)."""
    lines = []
    for s in summaries.values():
        sig = [(arm, e["vs_baseline"]) for arm, e in s["arms"].items()
               if "vs_baseline" in e and e["vs_baseline"]["significant"]]
        rest = [arm for arm, e in s["arms"].items()
                if "vs_baseline" in e and not e["vs_baseline"]["significant"]]
        said = "; ".join(f"`{arm}` {_pp(v['mean'])} pp [{_pp(v['ci95'][0])}, "
                         f"{_pp(v['ci95'][1])}]" for arm, v in sig) or "none"
        lines.append(f"- **{s['task']['title']}**: significant vs baseline: {said}. "
                     f"Not significant: {', '.join(f'`{a}`' for a in rest) or 'none'}.")
    return lines


def plot_task(summary: dict[str, Any], records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = summary["arms"]
    names = list(arms)
    figure, (ax_acc, ax_diff, ax_curve) = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, arm in enumerate(names):
        acc = np.array(arms[arm]["test_acc"]) * 100
        ax_acc.scatter(np.full(len(acc), i) + np.linspace(-0.15, 0.15, len(acc)), acc, s=12,
                       alpha=0.6)
        ax_acc.errorbar(i, acc.mean(), yerr=acc.std(ddof=1), fmt="k_", capsize=6)
        if "vs_baseline" in arms[arm]:
            v = arms[arm]["vs_baseline"]
            ax_diff.errorbar(i, v["mean"] * 100, yerr=[[(v["mean"] - v["ci95"][0]) * 100],
                                                       [(v["ci95"][1] - v["mean"]) * 100]],
                             fmt="o", capsize=6, color="C3" if v["significant"] else "C0")
        rs = [r for r in records if r["arm"] == arm]
        val = np.array([r["curves"]["val_acc"] for r in rs]) * 100
        ax_curve.plot(np.arange(1, val.shape[1] + 1), val.mean(0), label=arm)
    ax_diff.axhline(0, color="grey", lw=1)
    for ax in (ax_acc, ax_diff):
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.grid(alpha=0.3)
    ax_acc.set(ylabel="test accuracy (%)", title="per seed (dots), mean ± std")
    ax_diff.set(ylabel="Δ test accuracy vs baseline (pp)",
                title="paired difference, 95% CI (red: Holm p < 0.05)")
    ax_curve.set(xlabel="epoch", ylabel="validation accuracy (%)",
                 title="validation accuracy (mean over seeds)")
    ax_curve.grid(alpha=0.3)
    ax_curve.legend(fontsize=8)
    figure.suptitle(summary["task"]["title"], fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--epochs", type=int, default=None, help="override every task's epochs "
                        "(smoke runs)")
    parser.add_argument("--lr", type=float, default=None, help="skip the sweep (smoke runs)")
    parser.add_argument("--workers", type=int, default=2, help="processes (1 thread each)")
    parser.add_argument("--latency-runs", type=int, default=300)
    parser.add_argument("--report-only", action="store_true", help="train nothing: report "
                        "the seeds whose runs are all cached (an interrupted run)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--cache", type=Path, default=Path("out/evidence-cache"),
                        help="checkpoints and ONNX files (not committed)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs = args.out / "evidence_runs"
    runs.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    start = time.perf_counter()
    tasks = {name: replace(TASKS[name], epochs=args.epochs or TASKS[name].epochs)
             for name in args.tasks}

    # 1. the learning rate, once per task, on the baseline, by validation accuracy
    lrs: dict[str, float] = {}
    sweeps: dict[str, list[dict[str, Any]]] = {}
    if args.lr is None:
        for t in tasks.values():
            lrs[t.name], sweeps[t.name] = choose_lr(t, runs, args.workers, args.report_only)
    else:
        lrs = {name: args.lr for name in tasks}
        sweeps = {name: [] for name in tasks}

    # 2. every arm with that learning rate (an arm fxattn cannot build on a task is reported)
    not_run = {t.name: unbuildable(t, [a for a in args.arms if a in arms_for(t)])
               for t in tasks.values()}
    # seed-major, so that an interrupted run leaves complete, paired seeds behind
    plan = [(t, arm, seed) for seed in args.seeds for t in tasks.values() for arm in args.arms
            if arm in arms_for(t) and arm not in not_run[t.name]]
    jobs = [(t.name, arm, seed, lrs[t.name], t.epochs, False,
             run_path(runs, t.name, arm, seed), args.cache) for t, arm, seed in plan
            if _load(run_path(runs, t.name, arm, seed), lrs[t.name], t.epochs) is None]
    if not args.report_only:
        run_jobs(jobs, args.workers, _estimate(runs, jobs, args.workers))

    # 3. latency of the seed's exports, statistics, tables, figures (complete seeds only)
    summaries, incomplete = {}, {}
    for t in tasks.values():
        arms = [arm for arm in args.arms if arm in arms_for(t) and arm not in not_run[t.name]]
        cached = {(arm, seed): _load(run_path(runs, t.name, arm, seed), lrs[t.name], t.epochs)
                  for tt, arm, seed in plan if tt is t}
        seeds = [s for s in args.seeds if all(cached[a, s] is not None for a in arms)]
        if len(seeds) < 2:
            done = sorted(f"{a} s{s}: test {r['test_acc'] * 100:.1f}%"
                          for (a, s), r in cached.items() if r is not None)
            incomplete[t.name] = {"title": t.title, "lr": lrs[t.name],
                                  "lr_sweep_val_acc": {f"{r['lr']:g}": [r["val_acc"]]
                                                       for r in sweeps[t.name]},
                                  "complete_seeds": seeds, "runs_done": done,
                                  "runs_planned": len(cached)}
            print(f"{t.name}: {len(seeds)} complete seed(s) - no statistics")
            continue
        records = [cached[a, s] for a in arms for s in seeds]
        if args.latency_runs == 0 or LATENCY_SEED not in seeds or not all(
                (args.cache / f"{t.name}_{_slug(a)}_s{LATENCY_SEED}_fp32.onnx").exists()
                for a in arms):
            print(f"{t.name}: latency not measured (--latency-runs 0, or the seed-"
                  f"{LATENCY_SEED} ONNX files are not in {args.cache})")
            latency = {}
        else:
            latency = measure_latency(t, arms, args.cache, args.latency_runs)
        summaries[t.name] = summarise(t, records, sweeps[t.name], lrs[t.name], latency)
        summaries[t.name]["not_run"] = not_run[t.name]
        summaries[t.name]["seeds_planned"] = args.seeds
        plot_task(summaries[t.name], records, args.out / f"evidence_{t.name}.png")
    load_end = os.getloadavg()
    machine = {"cpus": os.cpu_count(), "loadavg_start": list(load_start),
               "loadavg_end": list(load_end), "torch": torch.__version__,
               "wall_seconds_this_invocation": round(time.perf_counter() - start, 1)}
    command = "python benchmarks/evidence.py" + (" " + " ".join(argv) if argv else "")
    lines = ["# Evidence: does DIA / SSIA help where there is headroom?", "",
             f"Generated by `{command}`. Machine: {machine['cpus']} CPUs, load average "
             f"{load_start[0]:.1f} at start, {load_end[0]:.1f} at end of this invocation "
             "(training runs are single-threaded with deterministic algorithms, so load "
             "changes only their time). Significance: paired t-test by seed, Holm-corrected "
             "over the arms of a task, p < 0.05; the CI is the paired difference's two-sided "
             "95% t-interval.", "", "#### Verdict", "", *verdict_lines(summaries), ""]
    for name, info in incomplete.items():
        lines.insert(-1, f"- **{info['title']}**: not finished - {len(info['runs_done'])} of "
                     f"{info['runs_planned']} runs done ({'; '.join(info['runs_done']) or 'none'}"
                     f"), {len(info['complete_seeds'])} complete seed(s): no statistics, no "
                     "claim. lr "
                     f"{info['lr']:g} from the baseline sweep (validation accuracy " + ", ".join(
                         f"lr {k}: {np.mean(v) * 100:.1f}%"
                         for k, v in info["lr_sweep_val_acc"].items())
                     + f"). Resume with `python benchmarks/evidence.py --tasks {name}`.")
    for summary in summaries.values():
        lines += task_markdown(summary)
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "evidence.json").write_text(json.dumps(
        {"command": command, "machine": machine, "seeds": args.seeds,
         "sweep_seeds": list(SWEEP_SEEDS), "tasks": summaries, "incomplete": incomplete},
        indent=1))
    (args.out / "evidence.md").write_text(text + "\n")
    print(text)
    print(f"done in {time.perf_counter() - start:.0f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
