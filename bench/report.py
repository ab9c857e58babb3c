"""Result rows, the stdout table, the JSON results file and the generated block of docs/benchmarks.md."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BEGIN = "<!-- bench:latest:{setting}:begin (written by python -m bench.run --docs; do not edit by hand) -->"
END = "<!-- bench:latest:{setting}:end -->"


@dataclass
class Row:
    """One line of the table: a measured value, its reference measured in the same run, and the goal."""

    id: str                       # stable key, e.g. "build.oci"
    what: str                     # what was measured, for humans
    value: float | None = None
    unit: str = ""
    reference: str = ""           # what the value is compared with
    ref_value: float | None = None
    ref_unit: str = ""
    ratio: float | None = None    # value / ref_value unless said otherwise in `note`
    goal: str = ""                # the goal, for humans ("" when there is none)
    met: bool | None = None       # None: no goal, or not measured
    miss: str = ""                # by how much a goal is missed
    runs: list[float] = field(default_factory=list)   # every run's value (the value is their median)
    note: str = ""
    skipped: str = ""             # why it was not measured (then value is None)


def check_at_least(row: Row, minimum: float) -> Row:
    """Goal: ratio >= minimum (throughput against the limit)."""
    row.goal = f">= {minimum:.2f} x"
    if row.ratio is not None:
        row.met = row.ratio >= minimum
        if not row.met:
            row.miss = f"{(minimum - row.ratio) * 100:.0f} points short (needs {minimum / row.ratio:.2f}x faster)"
    return row


def check_below(row: Row, limit: float, unit: str) -> Row:
    """Goal: value < limit (peak RSS)."""
    row.goal = f"< {limit:g} {unit}"
    if row.value is not None:
        row.met = row.value < limit
        if not row.met:
            row.miss = f"{row.value - limit:.1f} {unit} over"
    return row


def check_at_most(row: Row, limit: float, unit: str) -> Row:
    """Goal: value <= limit (overheads in %)."""
    row.goal = f"<= {limit:g} {unit}"
    if row.value is not None:
        row.met = row.value <= limit
        if not row.met:
            row.miss = f"{row.value - limit:.2f} {unit} over"
    return row


def check_ratio_at_most(row: Row, limit: float) -> Row:
    """Goal: ratio <= limit (a size or a time against a reference of the same run)."""
    row.goal = f"<= {limit:.2f} x"
    if row.ratio is not None:
        row.met = row.ratio <= limit
        if not row.met:
            row.miss = f"{(row.ratio - limit) * 100:.0f} points over"
    return row


def _num(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("%",):
        return f"{value:.2f} %"
    if unit == "count":
        return f"{value:.0f}"
    if abs(value) >= 100:
        return f"{value:,.0f} {unit}".strip()
    return f"{value:.2f} {unit}".strip() if abs(value) < 10 else f"{value:.1f} {unit}".strip()


def cells(row: Row) -> list[str]:
    if row.skipped:
        return [row.what, "skipped", row.skipped, "", row.goal, ""]
    status = "" if row.met is None else ("ok" if row.met else f"MISSED: {row.miss}")
    ref = row.reference + (f": {_num(row.ref_value, row.ref_unit)}" if row.ref_value is not None else "")
    ratio = "" if row.ratio is None else f"{row.ratio:.2f} x"
    return [row.what, _num(row.value, row.unit), ref, ratio, row.goal, status]


HEADER = ["measurement", "result (median)", "reference (same run)", "ratio", "goal", "status"]


def text_table(rows: list[Row]) -> str:
    table = [HEADER] + [cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    out = []
    for n, line in enumerate(table):
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def markdown_table(rows: list[Row]) -> str:
    def esc(text: str) -> str:
        return text.replace("|", "\\|")
    out = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(esc(c) for c in cells(r)) + " |" for r in rows]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------------
# Results file


def result_doc(rows: list[Row], *, setting: str, date: str, machine: dict[str, Any],
               data: dict[str, Any], conditions: dict[str, Any]) -> dict[str, Any]:
    return {"date": date, "setting": setting, "machine": machine, "data": data, "conditions": conditions,
            "rows": [asdict(r) for r in rows]}


def append_result(out_dir: Path, doc: dict[str, Any]) -> Path:
    """Append one run to ``<out_dir>/<date>-<setting>.json`` (a JSON list, one entry per run)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{doc['date'][:10]}-{doc['setting']}.json"
    runs: list[Any] = []
    if path.exists():
        try:
            loaded = json.loads(path.read_text())
            runs = loaded if isinstance(loaded, list) else [loaded]
        except ValueError as exc:
            raise ValueError(f"{path} is not JSON ({exc}); move it away, results are appended to it") from None
    runs.append(doc)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(runs, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def rows_from_doc(doc: dict[str, Any]) -> list[Row]:
    return [Row(**r) for r in doc["rows"]]


# ----------------------------------------------------------------------------------------------------------
# docs/benchmarks.md


def docs_block(doc: dict[str, Any], results_file: str) -> str:
    rows = rows_from_doc(doc)
    m, d, c = doc["machine"], doc["data"], doc["conditions"]
    missed = [r for r in rows if r.met is False]
    lines = [
        f"Latest run: **{doc['date']}**, setting **{doc['setting']}** ({results_file}), commit "
        f"`{(m.get('git_commit') or '?')[:12]}`.",
        "",
        f"Machine: {m['cores']} cores ({m['cpu_model']}, SHA-NI: {'yes' if m.get('sha_ni') else 'no'}), "
        f"{(m.get('memory_bytes') or 0) / 2**30:.1f} GiB RAM, kernel {m['kernel']}, {m.get('os')}, "
        f"Python {m['python']}, {m.get('openssl')}, Docker engine {m.get('docker_server') or 'none'}.",
        "",
        f"Data: {d['images']} images of release {d['release']} ({d['components']} components on {d['bases']} "
        f"base images), {d['unique_blobs']} unique blobs, {d['unique_bytes'] / 1e6:,.1f} MB unique "
        f"({d['unique_layer_bytes'] / 1e6:,.1f} MB of layers); {d['per_image_bytes'] / 1e6:,.1f} MB if every "
        f"image is carried whole.",
        "",
        f"Conditions: page cache **{c['cache']}**; each value is the median of {c['repeat']} runs "
        f"(every run is in the JSON); load average (1/5/15 min) {_load(c, 'before')} before, "
        f"{_load(c, 'after')} after: other work shared the {m['cores']} cores. Code: {_code(c)}.",
        "",
        markdown_table(rows),
        "",
    ]
    if missed:
        lines.append("Goals missed in this run (why, and the fix: see the analysis below):")
        lines += [f"- **{r.what}**: {r.miss}." for r in missed]
    else:
        lines.append("Every goal measured in this run was met.")
    return "\n".join(lines)


def _code(conditions: dict[str, Any]) -> str:
    code = conditions.get("code") or {}
    if not code:
        return "not recorded"
    modified = code["after"].get("product_files_modified") or []
    text = code["note"]
    return text + (f"; uncommitted changes in {', '.join(modified)}" if modified else "")


def _load(conditions: dict[str, Any], when: str) -> str:
    values = (conditions.get("load_average") or {}).get(when) or []
    return "/".join(f"{v:.1f}" for v in values) or "?"


def update_docs(path: Path, block: str, setting: str) -> None:
    """Replace the generated block of this setting in ``path`` (between its markers), keeping the
    hand-written text around it; append the block when the file has none yet."""
    text = path.read_text() if path.exists() else ""
    begin, end = BEGIN.format(setting=setting), END.format(setting=setting)
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    new = f"{begin}\n{block}\n{end}"
    if pattern.search(text):
        text = pattern.sub(lambda _: new, text)
    else:
        text = (text.rstrip() + "\n\n" if text else "# Benchmarks\n\n") + new + "\n"
    path.write_text(text)
