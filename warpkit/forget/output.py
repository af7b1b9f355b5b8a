"""The files and the table of a Fuse-to-Forget run:

- forget.json: ``rows`` (one per point and probe set), ``summary`` (kept / forgotten), ``fisher``,
  ``probe_sets``, ``per_text`` (each text's ℓ_θ(x) and exact match), ``settings``;
- forget.csv: the rows, `summary.COLUMNS` (lists as JSON);
- forget_<fusion>.png for each interpolation path (metrics against α), forget_bars.png (individual vs fused).

Each file appears whole or not at all (`warpkit._util.files.staged_files`); other files in the folder are
left alone. `check_output_dir` refuses, before any work, an output_dir that is a file or cannot be written.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from warpkit._util.files import staged_files
from warpkit.forget.plot import plot_bars, plot_path
from warpkit.forget.run import ForgetResult
from warpkit.forget.summary import COLUMNS
from warpkit.merge.output import check_writable_parent

__all__ = ["check_output_dir", "print_forget", "write_forget"]


def check_output_dir(output_dir: str | Path) -> None:
    """Refuse an output_dir that is a file, or that cannot be created or written."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"output_dir={out} is a file; warpkit forget writes forget.json, forget.csv and PNGs into a "
            "folder. Remove the file or choose another output_dir (CLI: --output_dir)."
        )
    if not out.exists():
        check_writable_parent(out, "output_dir")
    elif not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"output_dir={out} is read-only for this user; choose another output_dir.")


def write_forget(result: ForgetResult, output_dir: str | Path, *, plot: bool = True) -> list[Path]:
    """Write forget.json, forget.csv and (``plot``) the PNGs into ``output_dir``; the paths written."""
    out = Path(output_dir)
    names = ["forget.json", "forget.csv"]
    with staged_files(out) as tmp:
        doc = {
            "rows": result.rows, "summary": result.summary, "fisher": result.fisher,
            "probe_sets": result.probe_sets, "settings": result.settings, "per_text": result.per_text,
        }  # fmt: skip
        (tmp / "forget.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
        _write_csv(result, tmp / "forget.csv")
        if plot:
            names += _plots(result, tmp)
    return [out / n for n in names]


def _write_csv(result: ForgetResult, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in result.rows:
            writer.writerow({k: json.dumps(row[k]) if isinstance(row[k], list) else row[k] for k in COLUMNS})


def _plots(result: ForgetResult, tmp: Path) -> list[str]:
    title = result.settings.get("title") or "Fuse to Forget"
    names = []
    for fusion in result.settings["fusions"]:
        if fusion["path"] is None:
            continue
        rows = [r for r in result.rows if r["fusion"] == fusion["name"]]
        name = f"forget_{fusion['name']}.png"
        a, b = fusion["path"]["models"]
        plot_path(rows, tmp / name, title=f"{title}: path {fusion['name']} ({a} → {b})", ends=(a, b))
        names.append(name)
    plot_bars(result.rows, tmp / "forget_bars.png", title=f"{title}: individual vs fused models")
    return [*names, "forget_bars.png"]


def _num(x: float | None, width: int = 9) -> str:
    return f"{x:>{width}.4g}" if x is not None else " " * (width - 1) + "-"


def print_forget(result: ForgetResult) -> None:
    """The table `warpkit forget` prints: each point's ALR and log-likelihood per probe set, the verdicts,
    the Fisher overlaps."""
    print(f"{'point':<28} {'probe set':<18} {'ALR':>9} {'± s.e.':>9} {'LL/token':>9} {'gain':>9} {'acc':>9}")
    for r in result.rows:
        print(
            f"{r['point']:<28} {r['probe_set']:<18} {_num(r['alr'])} {_num(r['alr_stderr'])} "
            f"{_num(r['ll_mean'])} {_num(r['ll_gain_mean'])} {_num(r['accuracy'])}"
        )
    for s in result.summary:
        kept = "" if s["kept_fraction"] is None else f", kept fraction {s['kept_fraction']:.2f}"
        delta = "" if s["delta_alr"] is None else f", ALR {s['alr_seen']:.4g} -> {s['alr_fused']:.4g}"
        print(f"{s['point']} on {s['probe_set']} ({s['knowledge']}): {s['verdict']}{kept}{delta}")
    for f in result.fisher:
        (a, b), (p, q) = f["models"], f["probe_sets"]
        on = p if p == q else f"{p} / {q}"
        print(f"Fisher overlap {a} / {b} on {on} ({f['num_texts']} texts): {f['overlap']:.4f}")
