"""Write the documentation's benchmark pages from the kept results in benchmarks/results/.

Every figure on these pages is read here from a kept file (a benchmark's own report.md, a
JSON file, a summary) or copied from one (the notes and plots kept beside the cells, the
benchmark's configuration); none is typed. Each page says what machine its file records and
when; where a file records no date, the page says so and gives the day it was committed.

mkdocs-gen-files runs this script at build time (see mkdocs.yml) and the pages never exist on
disk. To look at them without building the site:

    python docs/gen_benchmarks.py --out /tmp/benchmark-pages
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = ROOT / "benchmarks"
PREFIX = "benchmarks"  # where the pages go in the site
GIB = 1024 ** 3
MIB = 1024 ** 2

# Keys a result file may use for when it ran; none of today's files has one.
DATE_KEYS = ("date", "datetime", "timestamp", "started", "finished", "created", "time")


# ---------------------------------------------------------------------------------------
# Writing


class Writer:
    """Pages and copied files, either into the mkdocs build or into a folder."""

    def __init__(self, out: Path | None = None):
        self.out = out
        self.pages: list[tuple[str, str, str]] = []  # (path, title, summary)

    def _open(self, path: str, mode: str):
        if self.out is None:
            import mkdocs_gen_files

            return mkdocs_gen_files.open(path, mode)
        target = self.out / path
        target.parent.mkdir(parents=True, exist_ok=True)
        return open(target, mode, encoding=None if "b" in mode else "utf-8")

    def page(self, name: str, title: str, summary: str, body: str) -> None:
        path = f"{PREFIX}/{name}.md"
        with self._open(path, "w") as f:
            f.write(f"# {title}\n\n{body.strip()}\n")
        self.pages.append((path, title, summary))

    def copy(self, source: Path, name: str) -> str:
        """Copy a kept file (a plot) next to the pages; its path relative to them."""
        rel = f"{name}/{source.name}"
        with self._open(f"{PREFIX}/{rel}", "wb") as f:
            f.write(source.read_bytes())
        return rel


# ---------------------------------------------------------------------------------------
# Formatting


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def num(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:,.1f} ms"


def secs(seconds) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.2f} s" if seconds < 100 else f"{seconds:,.0f} s"


def duration(seconds) -> str:
    return ms(seconds) if seconds is not None and seconds < 1 else secs(seconds)


def gib(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def mib(n) -> str:
    return "-" if n is None else f"{n / MIB:,.0f} MiB"


def command(cmd) -> str:
    """A recorded command, less the output path it wrote to (a path on the machine that ran
    it)."""
    if not cmd:
        return ""
    words = list(cmd) if isinstance(cmd, list) else str(cmd).split()
    kept, dropped = [], False
    for i, word in enumerate(words):
        if word == "--out" or (i and words[i - 1] == "--out"):
            dropped = True
            continue
        kept.append(word)
    note = " (its `--out` left out)" if dropped else ""
    return f"Command recorded in the file{note}:\n\n```bash\n{' '.join(kept)}\n```\n"


def demote(markdown: str) -> str:
    """Drop a document's title and move its other headings one level down, leaving fenced
    code alone."""
    out, fenced, titled = [], False, False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            if line.startswith("# ") and not titled:
                titled = True
                continue
            line = "#" + line
        out.append(line)
    return "\n".join(out).strip("\n") + "\n"


def with_plots(markdown: str, folder: Path, name: str, w: Writer) -> str:
    """Copy the plots a kept markdown file shows and point its image links at the copies."""

    def swap(m: re.Match) -> str:
        source = folder / m.group(2)
        if not source.is_file():
            return m.group(0)
        return f"![{m.group(1)}]({w.copy(source, name)})"

    return re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", swap, markdown)


def kept_on(path: Path) -> str:
    """When ``path`` was first committed, as the repository's history says (a sentence), or
    nothing outside a git checkout: the date of a file that records none of its own."""
    try:
        out = subprocess.run(["git", "log", "--diff-filter=A", "--format=%cs", "--", str(path)],
                             capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return f" It was committed on {out[-1]}." if out else ""


def provenance(data: dict, path: Path) -> str:
    """What a JSON result file records about where and when it ran."""
    facts = []
    for key, label in (("device", "device"), ("machine", "machine"), ("processor", "processor"),
                       ("cores", "cores"), ("threads", "threads"), ("torch", "torch"),
                       ("noise_backend", "noise backend")):
        value = data.get(key)
        if value not in (None, ""):
            facts.append(f"{label} {value}")
    dates = [f"{k} {data[k]}" for k in DATE_KEYS if data.get(k)]
    where = "; ".join(facts) if facts else "nothing about the machine"
    when = "; ".join(dates) if dates else "no date"
    return f"`{rel(path)}` records {where}, and {when}.{kept_on(path) if not dates else ''}\n"


def report_machine(report: str) -> str | None:
    """The environment a `zoptim bench` report states in its command line."""
    m = re.search(r"^Command: `[^`]*`; (.+)$", report, re.MULTILINE)
    return m.group(1).rstrip(".") if m else None


def config_section(name: str) -> str:
    config = CONFIGS / f"{name}.toml"
    if not config.is_file():
        return ""
    return (f"## Configuration\n\n`{rel(config)}`, as kept:\n\n```toml\n"
            f"{config.read_text(encoding='utf-8').rstrip()}\n```\n")


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------
# Folders: a benchmark's report, the notes kept with its cells, its plots, its configuration

FOLDERS = {
    # name: (title, summary)
    "mr_minilm": ("Movie reviews on MiniLM: the headline",
                  "MeZO, ZO-Muon (4 and 2 directions a step), GRZO and AdamW on "
                  "all-MiniLM-L6-v2 and `mr`, every learning rate tuned on a grid."),
    "mr_minilm_short": ("Movie reviews on MiniLM: the short run",
                        "The headline's comparison at a fifth of its budget: MeZO, ZO-Muon "
                        "and AdamW."),
    "mr_minilm_screen": ("Movie reviews on MiniLM: a screen of the newer methods",
                         "One seed: ZO-Muon with and without momentum, ZO-MOPI, FZOO and "
                         "GRZO at several learning rates, against MeZO."),
    "mr_minilm_candidates": ("Movie reviews on MiniLM: the screen's leaders on three seeds",
                             "ZO-Muon, FZOO and GRZO at their screened learning rates."),
    "mr_minilm_ablations_screen": ("Movie reviews on MiniLM: ZO-Muon's ablation screen",
                                   "One of ZO-Muon's settings changed at a time (rank, "
                                   "directions, resampling, bf16 weights), three seeds."),
    "mr_minilm_ablations": ("Movie reviews on MiniLM: ZO-Muon's ablations at the full budget",
                            "2 and 1 directions a step against the default ZO-Muon and MeZO."),
    "mr_smollm2_proxy": ("SmolLM2: the decoder proxy",
                         "MeZO, ZO-Muon, GRZO and FZOO on SmolLM2-135M-Instruct with "
                         "prompt-based classification of `mr`, three seeds, tuned grids."),
    "mr_smollm2_cpu": ("SmolLM2: MeZO's table on a CPU",
                       "Zero-shot, in-context learning, MeZO, ZO-Muon, linear probing and "
                       "AdamW on SmolLM2-135M-Instruct and `mr`, one seed."),
    "reuters_smollm2_cpu": ("SmolLM2: Reuters topics (generation)",
                            "SmolLM2 names the topic of a Reuters newswire article, scored by "
                            "exact match of its greedy answer."),
    "countdown_smollm2_cpu": ("SmolLM2: Countdown (reward-only fine-tuning)",
                              "ES, EGGROLL and GRPO (TRL) on the ES paper's Countdown reward, "
                              "at equal generations."),
    "mnist5k_efficientnet": ("Image models: EfficientNet-Lite0 on MNIST-5k",
                             "Every parameter of EfficientNet-Lite0 with a fresh head, eight "
                             "zeroth-order methods beside AdamW and a linear probe."),
    "calibration": ("lr = \"auto\" against tuned grids",
                    "The calibrated learning rates of the kept benchmarks' tuned rows, "
                    "against the grids' choices, and runs trained at them."),
    "fidelity_minilm": ("Estimator fidelity: MiniLM",
                        "How each method's step agrees with backpropagation on MiniLM."),
    "fidelity_eps": ("Estimator fidelity: MiniLM across eps",
                     "MeZO's and ZO-Muon's update directions against backpropagation at "
                     "several perturbation scales."),
    "fidelity_smollm2": ("Estimator fidelity: SmolLM2",
                         "How each method's step agrees with backpropagation on the decoder."),
    "fidelity_smollm2_variants": ("Estimator fidelity: SmolLM2, ZO-Muon's variants",
                                  "ZO-Muon's rank and directions on the decoder."),
}


def folder_page(name: str, folder: Path, title: str, summary: str, w: Writer) -> None:
    parts = [f"{summary}\n", f"Kept results: `{rel(folder)}/`.\n"]
    main = next((folder / f for f in ("report.md", "fidelity.md") if (folder / f).is_file()),
                None)
    if main is not None:
        text = main.read_text(encoding="utf-8")
        machine = report_machine(text)
        if machine:
            parts.append(f"Where it ran, as its report records: {machine}. The report records "
                         f"no date.{kept_on(main)}\n")
        else:
            parts.append(f"`{rel(main)}` records no machine and no date.{kept_on(main)}\n")
        body = with_plots(demote(text), folder, name, w)
        plots = [p for p in sorted(folder.glob("*.png")) if f"({name}/{p.name})" not in body]
        body += "".join(f"\n![{p.name}]({w.copy(p, name)})\n" for p in plots)
        parts.append(f"## {'Report' if main.name == 'report.md' else 'Measurements'}\n\n"
                     f"From `{rel(main)}`, the benchmark's own output.\n\n{body}")
    notes = folder / "README.md"
    if notes.is_file():
        parts.append(f"## Notes kept with the results\n\nFrom `{rel(notes)}`.\n\n"
                     f"{with_plots(demote(notes.read_text(encoding='utf-8')), folder, name, w)}")
    parts.append(config_section(name))
    w.page(name, title, summary, "\n".join(p for p in parts if p))


def train_defaults_page(folder: Path, w: Writer) -> None:
    name = "train_smollm2_defaults"
    summary_path = folder / "summary.json"
    s = load(summary_path)
    before, after = s.get("before", {}), s.get("after", {})
    cal = s.get("calibration") or {}
    rows = [["before (zero-shot)", num(before.get("dev_acc"), 3), num(before.get("test_acc"), 3),
             "", ""],
            ["after", num(after.get("dev_acc"), 3), num(after.get("test_acc"), 3),
             after.get("steps", ""), after.get("queries", "")]]
    body = [
        "`zoptim train` on SmolLM2-135M-Instruct with every default.\n",
        f"Kept results: `{rel(folder)}/`. Where it ran, as `summary.json` records: "
        f"{'; '.join(s.get('machines') or ['not recorded'])}. It records no date."
        f"{kept_on(summary_path)}\n",
        command(s.get("command")),
        f"## Scores\n\nFrom `{rel(summary_path)}` (metric: {s.get('metric', 'not recorded')}).\n",
        table(["model", "dev", "test", "steps", "queries"], rows),
    ]
    extra = []
    if "skipped_steps" in after:
        extra.append(f"steps skipped by the guard: {after['skipped_steps']}")
    if "wall_s" in s:
        extra.append(f"wall time: {secs(s['wall_s'])}")
    if extra:
        body.append("; ".join(extra).capitalize() + ".\n")
    if cal:
        settings = ", ".join(f"`{k}` = {v:.3g}" for k, v in (cal.get("settings") or {}).items())
        body.append(f"## Calibration\n\nThe rates chosen before the first step: {settings}; "
                    f"{cal.get('queries', '?')} queries ({cal.get('draws', '?')} draws), "
                    f"{num(100 * cal['share'], 1) if 'share' in cal else '?'}% of the run's.\n")
    notes = folder / "README.md"
    if notes.is_file():
        body.append(f"## Notes kept with the results\n\nFrom `{rel(notes)}`.\n\n"
                    f"{demote(notes.read_text(encoding='utf-8'))}")
    w.page(name, "SmolLM2: zoptim train with every default",
           "The default fine-tune on the decoder: zero-shot and fine-tuned scores, the "
           "calibrated rates.", "\n".join(body))


# ---------------------------------------------------------------------------------------
# Single JSON files


def step_cost_page(w: Writer) -> list[Path]:
    files = sorted(RESULTS.glob("step_cost_*.json"))
    body = ["`python -m zoptim.bench.step_cost` times a forward pass, a reference-style MeZO "
            "step (`torch.normal` noise four times a step), zoptim's MeZO and ZO-Muon steps "
            "(in place and batched) and, on a CPU, the stacked forward pass of batched queries "
            "without any perturbation; each step's cost is given over the forward passes it "
            "evaluates. Compare figures of one file: each file is one run.\n"]
    for path in files:
        d = load(path)
        notes = []
        if d.get("random_weights"):
            notes.append("random weights")
        if "freed_memory_kept" in d:
            notes.append("freed memory kept by the C allocator" if d["freed_memory_kept"]
                         else "the system allocator (`--system-allocator`)")
        if "before_fusing" in path.stem:
            notes.append("kept from before the noise of every tensor was drawn in one "
                         "fused kernel")
        rows = [[r["method"], ms(r.get("step_s")), r.get("forwards", ""), num(r.get("ratio"))]
                for r in d.get("rows", [])]
        body.append(
            f"## `{path.name}`\n\n{provenance(d, path)}\n"
            f"{d.get('model', '?')} ({d.get('parameters', 0):,} parameters), batch "
            f"{d.get('batch', '?')} x {d.get('tokens', '?')} tokens; one forward pass took "
            f"{ms(d.get('forward_s'))}" + (f"; {', '.join(notes)}" if notes else "") + ".\n\n"
            + table(["step", "time", "forward passes", "step / its forward passes"], rows)
            + "\n" + command(d.get("command")))
    w.page("step_cost", "Step cost", "A step's time over the forward passes it evaluates, "
           "on CPUs and on a GPU.", "\n".join(body))
    return files


def launches_page(w: Writer) -> list[Path]:
    files = sorted(RESULTS.glob("launches_*.json"))
    data = {p: load(p) for p in files}
    body = ["`python -m zoptim.bench.launches` counts, with `torch.profiler`, the `aten::` calls "
            "of one step of MeZO, ZO-Muon in place and ZO-Muon batched on BERT encoders of "
            "MiniLM's widths with 2, 6 and 12 layers (random weights), minus those of the "
            "forward passes the step evaluates, and fits the slope per added layer: on a GPU "
            "every call is a launch, whatever its size. \"All\" counts nested calls too. It "
            "also times the step at a tiny batch, where overhead dominates, over its forward "
            "passes.\n"]
    methods = []
    for d in data.values():
        for m in d.get("slopes", {}):
            if m not in methods:
                methods.append(m)
    header = ["extra calls per added layer (top-level / all)"] + [f"`{p.name}`" for p in files]
    rows = []
    for m in methods:
        row = [m]
        for d in data.values():
            s = d.get("slopes", {}).get(m)
            row.append("-" if s is None else
                       f"{s['extra_calls']:,.0f} / {s['extra_calls_all']:,.0f}")
        rows.append(row)
    body.append("## Calls per added layer\n\n" + table(header, rows))
    layers = sorted({r["layers"] for d in data.values() for r in d.get("rows", [])})
    for n in layers:
        rows = []
        for m in methods:
            row = [m]
            for d in data.values():
                r = next((r for r in d.get("rows", []) if r["method"] == m and r["layers"] == n),
                         None)
                row.append("-" if r is None else num(r.get("step_over_floor"), 1))
            rows.append(row)
        batch = {(d.get("batch"), d.get("tokens")) for d in data.values()}
        shape = ", ".join(f"{b} x {t} tokens" for b, t in sorted(batch, key=str))
        body.append(f"## Step over its forward passes, {n} layers ({shape})\n\n"
                    + table(["method"] + [f"`{p.name}`" for p in files], rows))
    body.append("## The files\n")
    for p, d in data.items():
        bits = [provenance(d, p).rstrip()]
        if "foreach" in d:
            bits.append(f"`foreach` {str(d['foreach']).lower()}.")
        if d.get("rank"):
            bits.append(f"ZO-Muon rank {d['rank']}.")
        if d.get("note"):
            bits.append(f"Its note: {d['note']}.")
        body.append(f"- `{p.name}`: " + " ".join(bits))
    w.page("launches", "Operator calls", "The calls a step adds per layer beyond its forward "
           "passes, and the step's overhead at a tiny batch.", "\n".join(body) + "\n")
    return files


def opt_shapes_page(w: Writer) -> list[Path]:
    files = sorted(RESULTS.glob("opt_shapes_*.json"))
    body = ["`python -m zoptim.bench.opt_shapes` builds OPT models of the given shapes with "
            "random weights and prints, for MeZO and ZO-Muon, a step's time over its forward "
            "passes and its peak memory over inference's (`--device cpu --shapes tiny` runs the "
            "same code anywhere).\n"]
    for path in files:
        d = load(path)
        note = ("Kept from before the noise of every tensor was drawn in one Triton launch.\n"
                if "before_fusing" in path.stem else "")
        body.append(f"## `{path.name}`\n\n{provenance(d, path)}\n{note}")
        for rec in d.get("records", []):
            rows = [[r["method"], ms(r.get("step_s")), r.get("evaluations", ""),
                     num(r.get("step_over_evaluations")), gib(r.get("peak_bytes")),
                     num(r.get("peak_over_inference"))] for r in rec.get("rows", [])]
            body.append(
                f"### OPT-{rec.get('shape', '?')}, {rec.get('dtype', '?')}, batch "
                f"{rec.get('batch', '?')} x {rec.get('tokens', '?')} tokens\n\n"
                f"{rec.get('parameters', 0):,} parameters; one forward pass "
                f"{ms(rec.get('forward_s'))}; inference's peak "
                f"{gib(rec.get('inference_peak_bytes'))}.\n\n"
                + table(["method", "step", "forward passes", "step / its forward passes",
                         "peak", "peak / inference's"], rows))
        body.append(command(d.get("command")))
    w.page("opt_shapes", "OPT shapes on a GPU", "MeZO's and ZO-Muon's step time and peak "
           "memory on OPT-1.3B's shape in fp16.", "\n".join(body))
    return files


def offload_page(w: Writer) -> list[Path]:
    files = sorted(RESULTS.glob("offload_*.json"),
                   key=lambda p: float(re.sub(r"[^0-9.]", "", p.stem.split("_")[1]) or 0))
    rows, notes = [], []
    for path in files:
        d = load(path)
        for r in d.get("records", []):
            ratio = r.get("offload_time_ratio")
            rows.append([
                f"OPT-{r.get('shape', '?')}", f"{r.get('parameters', 0):,}",
                gib(r.get("offloaded_peak_bytes")),
                gib(r.get("resident_peak_bytes")) if "resident_peak_bytes" in r else "not run",
                duration(r.get("offloaded_step_s")),
                duration(r.get("resident_step_s")) if "resident_step_s" in r else "-",
                num(ratio)])
            notes.append(f"- `{path.name}` ({d.get('method', '?')}, {r.get('dtype', '?')}, batch "
                         f"{r.get('batch', '?')} x {r.get('tokens', '?')} tokens): "
                         + provenance(d, path))
    body = ("`python -m zoptim.bench.offload --shapes ...` prints MeZO's peak GPU memory and "
            "step time with the model's blocks streamed from CPU memory (`Offload`), and "
            "resident where the model fits. Peaks are in GiB (2^30 bytes).\n\n"
            + table(["shape", "parameters", "offloaded peak", "resident peak",
                     "offloaded step", "resident step", "offloaded / resident"], rows)
            + "\n" + "\n".join(notes) + "\n")
    w.page("offload", "Offloading", "Peak GPU memory and step time of MeZO offloaded and "
           "resident, on OPT shapes.", body)
    return files


def scaling_page(w: Writer) -> list[Path]:
    path = RESULTS / "scaling_cpu.json"
    d = load(path)
    rows = [[r.get("world"), r.get("mode"), r.get("threads_per_rank"), num(r.get("queries_per_s")),
             f"{r.get('bytes_per_step', 0):,.0f}", num(r.get("speedup"))]
            for r in d.get("rows", [])]
    body = (f"`python -m zoptim.bench.scaling` prints queries per second against world size for "
            f"perturbation and data parallelism on gloo, and the bytes all-reduced per step.\n\n"
            f"{provenance(d, path)}\nBatch {d.get('batch', '?')} x {d.get('tokens', '?')} "
            f"tokens.\n\n"
            + table(["world", "mode", "threads a rank", "queries / s", "bytes all-reduced a step",
                     "speed-up"], rows) + "\n" + command(d.get("command")))
    w.page("scaling", "Scaling across processes", "Queries per second against world size, "
           "perturbation and data parallelism.", body)
    return [path]


def memory_page(w: Writer) -> list[Path]:
    path = RESULTS / "memory_cpu.json"
    d = load(path)
    rows = [[r.get("name"), mib(r.get("params")), mib(r.get("state")), mib(r.get("transient")),
             mib(r.get("total")), num(r.get("vs_inference"))] for r in d.get("rows", [])]
    body = (f"`python -m zoptim.bench.memory` prints, for all-MiniLM-L6-v2, the memory a step "
            f"holds: parameters, optimizer state and gradients, and the step's transient peak "
            f"from the allocator.\n\n{provenance(d, path)}\nBatch {d.get('batch', '?')} x "
            f"{d.get('tokens', '?')} tokens.\n\n"
            + table(["step", "parameters", "state", "transient", "total", "total / inference's"],
                    rows) + "\n" + command(d.get("command")))
    w.page("memory", "Memory", "The memory a step holds on all-MiniLM-L6-v2, zeroth order "
           "against backpropagation.", body)
    return [path]


def generation_page(w: Writer) -> list[Path]:
    path = RESULTS / "generation_cpu.json"
    d = load(path)
    rows = [["model", d.get("model")], ["prompts", d.get("examples")],
            ["prompt tokens, mean", num(d.get("prompt_tokens_mean"), 1)],
            ["new tokens, at most", d.get("max_new_tokens")], ["batch", d.get("batch_size")],
            ["decoding with the KV cache", secs(d.get("cached_s"))],
            ["without the cache (timed on fewer prompts, scaled)",
             secs(d.get("uncached_s_scaled"))],
            ["without / with the cache", num(d.get("cache_speedup"), 1)]]
    body = ("A generation task's evaluation decodes greedily, batched with the KV cache; "
            "`python -m zoptim.bench.generation` times it against decoding without the cache.\n\n"
            f"{provenance(d, path)}\n" + table(["", "value"], rows)
            + "\n" + command(d.get("command")))
    w.page("generation", "Generation time", "Greedy decoding of a dev set with and without the "
           "KV cache.", body)
    return [path]


def population_page(w: Writer) -> list[Path]:
    path = RESULTS / "population_cpu.json"
    d = load(path)
    sec = d.get("seconds", {})
    per = d.get("per_member_over_one_batch", {})
    frac = d.get("fraction_of_batched_inference", {})
    rows = [[k, secs(v), num(per.get(k)) if k in per else "",
             f"{100 * frac[k]:.0f}%" if k in frac else ""] for k, v in sec.items()]
    body = ("`python -m zoptim.bench.population` times one step of a population (ES with dense "
            "members, in place; EGGROLL with low-rank members as slices of one stacked batch) "
            "against greedy inference of the same prompts, once as one batch and once stacked "
            "once per member.\n\n"
            f"{provenance(d, path)}\n{d.get('members', '?')} members x {d.get('prompts', '?')} "
            f"prompts ({num(d.get('prompt_tokens'), 1)} prompt tokens on average), "
            f"{d.get('max_new_tokens', '?')} new tokens, EGGROLL rank {d.get('rank', '?')}; one "
            "timing each.\n\n"
            + table(["", "time", "time a member over one batch's inference",
                     "throughput, as a share of batched inference's"], rows)
            + "\n" + command(d.get("command")))
    w.page("population", "Population cost (ES, EGGROLL)", "A step of ES and of EGGROLL against "
           "greedy inference of the same prompts.", body)
    return [path]


def nondiff_page(w: Writer) -> list[Path]:
    path = RESULTS / "nondiff_cpu.json"
    d = load(path)
    nets = []
    for r in d.get("rows", []):
        for k, v in r.items():
            if isinstance(v, dict) and k not in nets:
                nets.append(k)
    rows = []
    for r in d.get("rows", []):
        row = [r.get("method")]
        for n in nets:
            v = r.get(n)
            row.append("-" if not v else f"{v['test_accuracy']:.3f} ({v.get('queries', '?'):,} "
                       f"queries, {secs(v.get('seconds'))})")
        rows.append(row)
    body = ("`python -m zoptim.bench.nondiff` trains a tanh, a hard-threshold and an int8 network "
            "with each method, with AdamW through surrogate gradients as the ceiling, and prints "
            "the test accuracy.\n\n"
            f"{provenance(d, path)}\nData: {d.get('data', 'not recorded')}.\n\n"
            + table(["method"] + [f"{n}: test accuracy" for n in nets], rows)
            + "\n" + command(d.get("command")))
    w.page("nondiff", "Non-differentiable networks", "Test accuracy on a tanh, a hard-threshold "
           "and an int8 network.", body)
    return [path]


def generic_json_page(path: Path, w: Writer) -> None:
    """A result file no page above knows: its scalar fields, as recorded."""
    d = load(path)

    def flat(x, prefix=""):
        if isinstance(x, dict):
            for k, v in x.items():
                yield from flat(v, f"{prefix}{k}.")
        elif isinstance(x, list) and x and all(isinstance(i, (dict, list)) for i in x):
            for i, v in enumerate(x):
                yield from flat(v, f"{prefix}{i}.")
        else:
            yield prefix.rstrip("."), x

    rows = [[f"`{k}`", json.dumps(v) if not isinstance(v, str) else v] for k, v in flat(d)]
    w.page(path.stem, f"`{path.name}`", "A kept result file, its fields as recorded.",
           provenance(d, path) + "\n" + table(["field", "value"], rows))


# ---------------------------------------------------------------------------------------


def main(out: Path | None = None) -> Writer:
    w = Writer(out)
    shown: set[Path] = set()
    for fn in (step_cost_page, launches_page, opt_shapes_page, offload_page, scaling_page,
               memory_page, generation_page, population_page, nondiff_page):
        shown.update(fn(w) or [])
    for name, (title, summary) in FOLDERS.items():
        folder = RESULTS / name
        if folder.is_dir():
            folder_page(name, folder, title, summary, w)
            shown.add(folder)
    if (RESULTS / "train_smollm2_defaults").is_dir():
        train_defaults_page(RESULTS / "train_smollm2_defaults", w)
        shown.add(RESULTS / "train_smollm2_defaults")
    others = [p for p in sorted(RESULTS.iterdir()) if p not in shown]
    for p in others:
        if p.suffix == ".json":
            generic_json_page(p, w)
        elif p.is_dir():
            folder_page(p.name, p, f"`{p.name}`", "A kept benchmark folder.", w)
    index = ["Every page here is written when the site is built, by `docs/gen_benchmarks.py`, "
             "from the files kept in `benchmarks/results/`: the benchmarks' own reports, their "
             "JSON files, and the notes and plots kept beside their cells. No figure is typed "
             "by hand. Each page names the files it reads and what they record about the "
             "machine and the date. [Running benchmarks](../guides/benchmarks.md) says how "
             "each was run and how to read it.\n"]
    index.append(table(["page", "what it measures"],
                       [[f"[{t}]({Path(p).name})", s] for p, t, s in w.pages]))
    with w._open(f"{PREFIX}/index.md", "w") as f:
        f.write("# Benchmark results\n\n" + "\n".join(index))
    return w


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--out":
        written = main(Path(sys.argv[2]))
        print(f"{len(written.pages)} pages written to {sys.argv[2]}/{PREFIX}/")
    else:
        sys.exit("usage: python docs/gen_benchmarks.py --out FOLDER")
else:
    main()
