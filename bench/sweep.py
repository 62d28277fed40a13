"""Sweeps: a grid of latency, memory and profile cases from a TOML file (or flags), measured one
by one into a results store that survives crashes and resumes.

    spec = load("bench/sweeps/cpu.toml")
    jobs = plan(grids(spec, "cpu.toml"))        # every case validated before any is measured
    for row in run(jobs, Store("/tmp/cpu_sweep.jsonl", "runtime")):
        ...

A sweep file holds grid keys (`KEYS`; each documented there) at the top level and optionally
`[[grid]]` tables: without `[[grid]]` the top level is the one grid; with them each table is a
grid whose keys replace the top level's (the top level then holds shared defaults, e.g.
`repeats`). A grid is the product models × resolutions × frames × batch × dtype × backend ×
mode × measure × compile × cuda_graphs; keys that take a list also take a single value. Memory
rows measure eager steps, so a grid's memory cases drop its compile and cuda_graphs options.
An unknown key, a value not allowed or a case that cannot be built (a resolution the windows do
not divide, say) raises ValueError naming the grid, the key and what is allowed, before anything
is measured. Integer keys take integers only (not 2.0, not true), within TOML's 64-bit range. A
spec built from command-line flags (`ptdit bench`) passes `names`, the flag of each key, and its
errors name the flags instead.

`run` measures the cases not already in the store (`KEY` columns; with `retry_failed`, also
those whose latest row failed with an 'error: …' status), appending each row as it finishes
(bench.store: a crash, SIGKILL or Ctrl-C loses no finished row; a rerun resumes). Cases
run smallest first within a group (`GROUP`: model, overrides, setup); once a case of a group
runs out of memory (status 'oom'), its larger cases (more tokens × forward batch) are not run but
written as rows whose status says 'skipped: …' and names the case that ran out. A tqdm bar on a
terminal shows the case, the ETA and the last result.
"""

import contextlib
import difflib
import re
import sys
import tomllib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ptdit import Workload
from ptdit.attention import BACKENDS
from ptdit.checks import is_int
from ptdit.workload import DEFAULT_TEXT_TOKENS

from . import latency, memory, profile
from .latency import DTYPES, MODES, Case
from .rows import device_label
from .store import Store, check_writable, row_key

MEASUREMENTS = ("latency", "memory", "profile")
REQUIRED = object()


@dataclass(frozen=True)
class Key:
    """A sweep-file key: what it means, its default, and which values are allowed."""
    doc: str
    default: object
    allowed: str
    check: Callable[[object], bool]
    many: bool = True      # a list of values; a single value stands for a list of one
    flag: str = ""         # how `ptdit bench` takes it (bench/cli.py builds its flags from KEYS)


INT_MAX = 2**63 - 1   # TOML integers are 64-bit; tomllib reads larger ones all the same


def _positive(v) -> bool:
    return is_int(v) and 0 < v <= INT_MAX


def _resolution(v) -> bool:
    """A side, or a [height, width] pair (the CLI's HxW), in pixels."""
    return _positive(v) or (isinstance(v, (list, tuple)) and len(v) == 2
                            and all(_positive(x) for x in v))


KEYS: dict[str, Key] = {
    "models": Key("model names, as `ptdit models` lists them", REQUIRED,
                  "registry names (`ptdit models`)", lambda v: isinstance(v, str), flag="--model"),
    "resolutions": Key("image sizes in pixels: a side, or [height, width] (latent = px / 8)",
                       REQUIRED, "positive 64-bit integers (pixels), or [height, width] pairs "
                       "of them", _resolution, flag="--resolution"),
    "frames": Key("latent frames of video latents (B, 4, F, H, W); omitted: images", [None],
                  "positive 64-bit integers (latent frames)", _positive, flag="--frames"),
    "batch": Key("requested batch sizes (cfg runs the model at twice this)", [1],
                 "positive 64-bit integers", _positive, flag="--batch-size"),
    "dtype": Key("model and input dtype", ["float32"], ", ".join(DTYPES),
                 lambda v: v in DTYPES, flag="--dtype"),
    "backend": Key("attention backend", ["sdpa"], ", ".join(BACKENDS), lambda v: v in BACKENDS,
                   flag="--backend"),
    "mode": Key("forward (no_grad), cfg (guided: batch doubled) or train (forward, MSE, "
                "backward, AdamW step)", ["forward"], ", ".join(MODES), lambda v: v in MODES,
                flag="--mode"),
    "measure": Key("which rows each case gets", ["latency"], ", ".join(MEASUREMENTS),
                   lambda v: v in MEASUREMENTS, flag="MEASUREMENT"),
    "compile": Key("torch.compile the model (latency rows; compile time in compile_s)", [False],
                   "true, false", lambda v: isinstance(v, bool), flag="--compile"),
    "cuda_graphs": Key("replay the step as a CUDA graph (latency rows on cuda)", [False],
                       "true, false", lambda v: isinstance(v, bool), flag="--cuda-graphs"),
    "device": Key("where cases run (cuda: the current GPU, chosen by CUDA_VISIBLE_DEVICES)",
                  "cpu", "cpu, cuda", lambda v: v in latency.DEVICES, many=False, flag="--device"),
    "repeats": Key("timed steps per latency row", 10, "a positive 64-bit integer", _positive,
                   many=False, flag="--repeats"),
    "warmup": Key("untimed steps before them", 2, "a non-negative 64-bit integer",
                  lambda v: is_int(v) and 0 <= v <= INT_MAX, many=False, flag="--warmup"),
    "text_tokens": Key("T5 caption tokens of text models", DEFAULT_TEXT_TOKENS,
                       "a positive 64-bit integer", _positive, many=False, flag="--text-tokens"),
    "overrides": Key("config fields set on every model of the grid, e.g. {depth = 2}", {},
                     "a table of config fields", lambda v: isinstance(v, dict), many=False,
                     flag="--override"),
}
FILE_KEYS = (*KEYS, "grid")   # grid: [[grid]] tables, each a grid over the top-level defaults
SMOKE = {"depth": 1, "hidden_size": 64, "num_heads": 4}   # `smoke`'s tiny models

# the columns that name one row in a store, and the cases that share an out-of-memory limit
KEY = ("measurement", "model", "overrides", "resolution", "latent_frames", "batch",
       "text_tokens", "window", "mode", "dtype", "backend", "device", "compile", "cuda_graphs")
GROUP = ("model", "overrides", "text_tokens", "mode", "dtype", "backend", "device", "compile",
         "cuda_graphs")


#################################################################################
#                                Sweep files                                    #
#################################################################################

def load(path: str | Path) -> dict:
    """A sweep file's contents; ValueError if it is missing or not TOML."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"sweep file {str(path)!r} does not exist; give a TOML file such as "
                         "bench/sweeps/cpu.toml")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"sweep file {path} is not valid TOML: {err}") from None


def _unknown(keys: Iterable[str], allowed: Iterable[str], where: str) -> None:
    for key in keys:
        if key not in allowed:
            near = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ValueError(f"{where}unknown key {key!r}{hint}; allowed keys: "
                             f"{', '.join(allowed)}")


def _label(key: str, names: dict[str, str] | None) -> str:
    """How messages call `key`: its flag where the spec came from flags, else 'key KEY'."""
    return names[key] if names and key in names else f"key {key!r}"


def _values(key: str, value, where: str, names: dict[str, str] | None = None):
    """A key's value checked, a list for list keys."""
    spec, label = KEYS[key], _label(key, names)
    values = value if spec.many and isinstance(value, list) else [value]
    if spec.many and not values:
        raise ValueError(f"{where}{label} is an empty list; allowed: {spec.allowed}")
    for v in values:
        if not spec.check(v):
            raise ValueError(f"{where}{label}: {v!r} is not allowed; allowed: {spec.allowed}")
    return values if spec.many else value


def grids(spec: dict, source: str | None = None, names: dict[str, str] | None = None
          ) -> list[dict]:
    """The grids of a sweep file's contents, each with every key (defaults filled in) checked;
    ValueError naming the source (a file name, say), the grid and the key otherwise. `names`:
    the flag of each key, for a spec built from command-line flags (`ptdit bench`): messages
    then name the flags, here and in `plan`."""
    source = f"{source}: " if source else ""
    _unknown(spec, FILE_KEYS, source)
    tables = spec.get("grid", [{}])
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict)
                                                             for t in tables):
        raise ValueError(f"{source}key 'grid' must be [[grid]] tables (an array of tables)")
    top = {k: v for k, v in spec.items() if k != "grid"}
    out = []
    for number, table in enumerate(tables, 1):
        where = source + (f"[[grid]] {number}: " if "grid" in spec else "")
        _unknown(table, KEYS, where)
        merged = {**top, **table}
        grid = {}
        for key, spec_key in KEYS.items():
            if key in merged:
                grid[key] = _values(key, merged[key], where, names)
            elif spec_key.default is REQUIRED:
                raise ValueError(f"{where}{_label(key, names)} is required: {spec_key.doc}")
            else:
                grid[key] = spec_key.default
        grid["where"], grid["names"] = where, names
        out.append(grid)
    return out


def smoke(grids: list[dict]) -> list[dict]:
    """The same grids on the CPU in seconds: tiny models (`SMOKE` overrides) at one small size
    (the smallest resolution, at most 256 px; the smallest frame count, at most 4), the
    smallest batch, one repeat, no warm-up, eager."""
    out = []
    for grid in grids:
        frames = grid["frames"]
        out.append({**grid, "device": "cpu", "repeats": 1, "warmup": 0, "compile": [False],
                    "cuda_graphs": [False], "overrides": {**grid["overrides"], **SMOKE},
                    "resolutions": [min(*grid["resolutions"], 256)],
                    "frames": frames if frames == [None] else [min(*frames, 4)],
                    "batch": [min(grid["batch"])]})
    return out


#################################################################################
#                                   Jobs                                        #
#################################################################################

@dataclass(frozen=True)
class Job:
    """One row to make: a case and what to measure of it."""
    measurement: str
    case: Case
    repeats: int
    warmup: int

    def fields(self) -> dict:
        """The case's columns, as its row will hold them (KEY and GROUP among them)."""
        c = self.case
        return {"measurement": self.measurement, **c.columns(), "dtype": c.dtype,
                "backend": c.backend, "device": device_label(c.device)}

    def key(self) -> tuple:
        return row_key(self.fields(), KEY)

    def measure(self) -> list[dict]:
        """The job's rows: one, or a profile's category and operator rows."""
        if self.measurement == "memory":
            return [memory.measure(self.case)]
        if self.measurement == "profile":
            return profile.profile(self.case, steps=self.repeats, warmup=self.warmup)
        return [latency.measure(self.case, self.repeats, self.warmup)]


@contextlib.contextmanager
def _named(grid: dict, **given):
    """Where the spec came from flags, a ValueError raised inside is prefixed with the flags of
    the case that failed (e.g. '--model DiT-S/2 --resolution 250: …')."""
    try:
        yield
    except ValueError as err:
        names = grid["names"]
        if not names:
            raise
        flags = []
        for key, value in given.items():
            if value is None or value is False or value == {} or (
                    key == "text_tokens" and value == KEYS[key].default):
                continue
            if key == "overrides":
                value = " ".join(f"{k}={v}" for k, v in value.items())
            flag = names.get(key, key)
            flags.append(flag if value is True else f"{flag} {value}")
        raise ValueError(f"{' '.join(flags)}: {err}") from None


def _grid_jobs(grid: dict) -> Iterator[Job]:
    for model in grid["models"]:
        for res in grid["resolutions"]:
            for frames in grid["frames"]:
                for batch in grid["batch"]:
                    with _named(grid, models=model, resolutions=res, frames=frames, batch=batch,
                                text_tokens=grid["text_tokens"], overrides=grid["overrides"]):
                        work = Workload(model, tuple(res) if isinstance(res, list) else res,
                                        frames, batch, grid["text_tokens"],
                                        overrides=grid["overrides"])
                    yield from _setups(work, grid)


def _setups(work: Workload, grid: dict) -> Iterator[Job]:
    for dtype in grid["dtype"]:
        for backend in grid["backend"]:
            for mode in grid["mode"]:
                for measurement in grid["measure"]:
                    eager = measurement == "memory"
                    for compiled in [False] if eager else grid["compile"]:
                        for graphs in [False] if eager else grid["cuda_graphs"]:
                            with _named(grid, models=work.name, mode=mode, dtype=dtype,
                                        backend=backend, device=grid["device"],
                                        compile=compiled, cuda_graphs=graphs):
                                case = Case(work, mode, dtype, backend, grid["device"],
                                            compiled, graphs)
                            yield Job(measurement, case, grid["repeats"], grid["warmup"])


def plan(grids: list[dict]) -> list[Job]:
    """Every case of every grid, built (so validated) before anything runs; duplicates
    dropped; smallest first within each group, groups in the order they first appear."""
    jobs = {}
    for grid in grids:
        try:
            for job in _grid_jobs(grid):
                jobs.setdefault(job.key(), job)
        except ValueError as err:
            raise ValueError(f"{grid['where']}{err}") from None
    first: dict[tuple, int] = {}
    for job in jobs.values():
        first.setdefault(_group(job.fields()), len(first))
    return sorted(jobs.values(), key=lambda j: (first[_group(j.fields())], j.case.size))


#################################################################################
#                                    Runs                                       #
#################################################################################

def _group(fields: dict) -> tuple:
    return row_key(fields, GROUP)


def failed(row: dict) -> bool:
    """Whether `row` is a failed case ('error: …'; 'oom' and 'skipped: …' rows are results)."""
    return str(row.get("status", "")).startswith("error")


def _size(fields: dict) -> int:
    return fields["tokens"] * fields["forward_batch"]


def _describe(fields: dict) -> str:
    return (f"the {fields['measurement']} case {fields['model']} at {fields['resolution']} px, "
            f"{fields['latent_frames']} latent frame(s), batch {fields['batch']}")


def _summary(row: dict) -> str:
    if row["status"] != "ok":
        return row["status"][:40]
    if row["measurement"] == "memory":
        return f"{row['peak_mib']:.0f} MiB peak"
    if row["measurement"] == "profile":
        return f"{row['step_ms']:.4g} ms profiled"
    return f"{row['latency_ms_median']:.4g} ms"


def _skipped(job: Job, oom: dict) -> dict:
    reason = (f"skipped: {_describe(oom)} ran out of memory (status oom) and this case is "
              f"larger ({job.case.size} > {_size(oom)} tokens × forward batch)")
    return {**latency.head(job.case, job.measurement), "status": reason}


def stored_keys(store: Store, retry_failed: bool = False) -> set[tuple]:
    """The `KEY` values of the cases in `store` that a run skips: every stored case, less (with
    `retry_failed`) those whose latest row failed ('error: …')."""
    keys = store.done(KEY)
    if retry_failed:
        keys -= {key for key, row in store.latest(KEY).items() if failed(row)}
    return keys


def run(jobs: list[Job], store: Store | None = None, progress: bool | None = None,
        retry_failed: bool = False) -> Iterator[dict]:
    """The rows of `jobs` not yet in `store`, each appended to it as it finishes (then
    yielded, as stored). Larger cases of a group that ran out of memory (here or in an earlier
    run) are skipped rows. `retry_failed`: also measure again the cases whose latest stored row
    failed ('error: …'). `progress`: a tqdm bar (default: only when stderr is a terminal)."""
    stored = store.rows() if store is not None else []
    done = stored_keys(store, retry_failed) if store is not None else set()
    ooms: dict[tuple, dict] = {}

    def note(row: dict) -> None:   # an oom row of a known size (not one written by hand)
        if row.get("status") == "oom" and is_int(row.get("tokens")) and is_int(
                row.get("forward_batch")):
            group = _group(row)
            if group not in ooms or _size(row) < _size(ooms[group]):
                ooms[group] = row
    for row in stored:
        note(row)

    todo = [job for job in jobs if job.key() not in done]
    disable = not sys.stderr.isatty() if progress is None else not progress
    with tqdm(total=len(todo), unit="case", disable=disable, dynamic_ncols=True) as bar:
        for job in todo:
            bar.set_description(f"{job.measurement} {job.case.label}")
            oom = ooms.get(_group(job.fields()))
            larger = oom is not None and job.case.size > _size(oom)
            rows = [_skipped(job, oom)] if larger else job.measure()
            if store is not None:
                rows = [store.append(row) for row in rows]
            for row in rows:
                note(row)
            bar.set_postfix_str(f"last: {_summary(rows[0])}")
            bar.update()
            yield from rows


def device_slug(jobs: list[Job]) -> str:
    """The jobs' device label as a folder name, e.g. 'nvidia-h100-80gb-hbm3'; ValueError when
    they span several devices."""
    labels = {job.fields()["device"] for job in jobs}
    if len(labels) != 1:
        raise ValueError(f"{{device}} names one device; these cases run on "
                         f"{len(labels)}: {', '.join(sorted(labels)) or 'none'}")
    return re.sub(r"[^a-z0-9]+", "-", labels.pop().lower()).strip("-")


def stored_rows(jobs: list[Job], store: Store) -> list[dict]:
    """The latest stored rows of each job, in the jobs' order (those that have any): one row,
    or the category and operator rows of its latest profile."""
    latest: dict[tuple, list[dict]] = {}
    for row in store.rows():
        key = row_key(row, KEY)
        one_profile = (row.get("level") and key in latest
                       and latest[key][-1].get("time_utc") == row.get("time_utc"))
        if one_profile:
            latest[key].append(row)
        else:
            latest[key] = [row]
    return [row for job in jobs for row in latest.get(job.key(), [])]


def counts(rows: Iterable[dict]) -> dict[str, int]:
    """Rows per status kind: ok, oom, skipped, error."""
    out = dict.fromkeys(("ok", "oom", "skipped", "error"), 0)
    for row in rows:
        kind = str(row.get("status")).split(":")[0]
        out[kind] = out.get(kind, 0) + 1
    return out


def estimate_tflop(jobs: list[Job]) -> float:
    """The closed-form TFLOP of every step the jobs run (warm-up included), for sizing."""
    steps = {"latency": lambda j: j.repeats + j.warmup, "memory": lambda j: 2,
             "profile": lambda j: j.repeats + j.warmup}
    return sum(latency.costs(j.case)["step_gflops"] * steps[j.measurement](j)
               for j in jobs) / 1e3


#################################################################################
#                     The two commands: `ptdit bench`, `ptdit sweep`           #
#################################################################################

EXIT_RULE = ("Exit status: 1 when some row has an 'error: …' status, else 0 ('oom' and "
             "'skipped: …' rows are results); 2 for bad input, before anything is measured.")


def exit_status(rows: Iterable[dict]) -> int:
    """EXIT_RULE's status of a run's rows."""
    return 1 if any(failed(row) for row in rows) else 0


def set_threads(threads: int | None) -> None:
    """torch's CPU intra-op threads (None: leave torch's default)."""
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be a positive integer, got {threads}")
        torch.set_num_threads(threads)


def run_flags(spec: dict, store: str | Path | None = None, retry_failed: bool = False,
              threads: int | None = None) -> list[dict]:
    """`ptdit bench`: the cases of one grid given as flags (`spec`: sweep keys -> values; its
    errors name the flags, KEYS[key].flag), measured, and appended to `store` (a path: checked
    and locked; the cases it holds are not measured again, and the rows returned include
    them). KeyboardInterrupt passes through, every finished row stored."""
    set_threads(threads)
    measurement = spec.get("measure")
    eager_only = [f for f, on in (("--compile", spec.get("compile")),
                                  ("--cuda-graphs", spec.get("cuda_graphs"))) if on]
    if measurement == "memory" and eager_only:
        many = len(eager_only) > 1
        raise ValueError(f"memory rows measure eager steps; {' and '.join(eager_only)} "
                         f"appl{'y' if many else 'ies'} to latency and profile rows only: drop "
                         f"{'them' if many else 'it'}, or measure latency")
    if retry_failed and store is None:
        raise ValueError("--retry-failed measures the failed cases of --store again; give "
                         "--store")
    names = {key: k.flag for key, k in KEYS.items()}
    names["measure"] = "the measurement"
    jobs = plan(grids(spec, names=names))
    if store is None:
        return list(run(jobs))
    store = Store(check_writable(store, "--store"), "runtime")
    with store.lock():
        for _ in run(jobs, store, retry_failed=retry_failed):
            pass
    return stored_rows(jobs, store)          # a resumed run shows the earlier rows too


@dataclass
class SweepResult:
    """What `run_file` did: the jobs, the store, the text to print, the exit status."""
    store: Store
    text: str
    status: int
    report: str | None = None


def run_file(file: str | Path, out: str, *, quick: bool = False, dry_run: bool = False,
             report: str | None = None, retry_failed: bool = False,
             threads: int | None = None) -> SweepResult:
    """`ptdit sweep`: a sweep file's cases (with `quick`, their `smoke` version) into the store
    `out` —
    checked, then locked while measuring — and its runtime report into `report`; '{device}' in
    either path becomes the device's name. `dry_run` lists the cases and measures nothing.
    KeyboardInterrupt passes through, every finished row stored."""
    from .markdown import rows_table
    from .store import check_writable_folder

    set_threads(threads)
    cases = grids(load(file), str(file))
    jobs = plan(smoke(cases) if quick else cases)
    paths = [out] + ([report] if report else [])
    if any("{device}" in p for p in paths):
        slug = device_slug(jobs)
        paths = [p.replace("{device}", slug) for p in paths]
    out, report = paths[0], (paths[1] if report else None)
    store = Store(check_writable(out, "--out"), "runtime")
    if report:
        check_writable_folder(report, "--report")
    if dry_run:   # nothing is measured or written
        done = stored_keys(store, retry_failed)
        listed = [{**job.fields(), "stored": job.key() in done} for job in jobs]
        text = (rows_table(listed, "table") + f"\n{len(jobs)} cases, "
                f"{sum(row['stored'] for row in listed)} already in {out}; the timed steps' "
                f"closed-form work: {estimate_tflop(jobs):.4g} TFLOP")
        return SweepResult(store, text, 0)
    with store.lock():
        new = list(run(jobs, store, retry_failed=retry_failed))
    measured = {row_key(row, KEY) for row in new}   # a profile case writes several rows
    per_case = {row_key(row, KEY): row for row in stored_rows(jobs, store)}
    tally = counts(per_case.values())
    kept = sum(failed(row) for key, row in per_case.items() if key not in measured)
    text = (f"{len(jobs)} cases of {file}: {len(measured)} measured now, "
            f"{len(jobs) - len(measured)} already stored; "
            + ", ".join(f"{n} {status}" for status, n in tally.items())
            + (f"; {kept} failed case{'s' * (kept != 1)} not retried (--retry-failed measures "
               "them again)" if kept else "") + f"; store: {store.path}")
    return SweepResult(store, text, 1 if tally["error"] else 0, report)
